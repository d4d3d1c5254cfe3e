"""What started this process: a Horovod/MPI launcher, or a plain shell. Imports nothing heavy."""

import os
import select
import signal
import stat
import threading
import time

# Set by the launchers: horovodrun --gloo (HOROVOD_RANK), OpenMPI's mpirun, which horovodrun
# --mpi uses (OMPI_COMM_WORLD_RANK), MPICH/Intel MPI (PMI_RANK), srun --mpi=pmix (PMIX_RANK).
RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
# The process count the same launchers announce (srun's PMIx has none of its own: Slurm's).
SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def launched():
    """True when a Horovod or MPI launcher started this process."""
    return any(v in os.environ for v in RANK_VARS)


def launched_size():
    """How many processes the launcher started (1 without a launcher), before Horovod starts."""
    if not launched():
        return 1
    return next((int(os.environ[v]) for v in SIZE_VARS if os.environ.get(v, "").isdigit()), 1)


def plain_env():
    """This process's environment without what launchers set, for a child that must run as
    one plain process (not as a second copy of this rank)."""
    prefixes = ("HOROVOD_", "OMPI_", "PMIX_", "PMI_", "OPAL_", "PRTE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def exit_with_launcher(grace_seconds=120):
    """Under a launcher, stop this process once its standard output or error hangs up: the
    launcher that reads them is gone.

    horovodrun starts a remote rank as `ssh HOST CMD`. When it ends a job (Ctrl-C, another rank
    failed) it sends its local ranks SIGTERM but only kills the ssh clients of the remote ones;
    sshd then closes their pipes, and nothing else tells them. So a rank whose output hangs up
    takes it as that SIGTERM: with hvd_llama.preemption installed, every rank still stops after
    the same step with a checkpoint. What it prints from then on goes to /dev/null. A rank that
    cannot stop so (waiting in hvd.init, or in a collective that never completes) exits after
    `grace_seconds` with status 129, as SIGHUP would end it. A pipe whose reader is gone reports
    POLLERR, a terminal that hung up POLLHUP; a file reports neither."""
    fds = [fd for fd in (1, 2) if _is_stream(fd)]
    if not launched() or not fds:
        return

    def watch():
        poller = select.poll()
        for fd in fds:
            poller.register(fd, 0)  # no events asked for: only errors and hang-ups come back
        while True:
            for fd, events in poller.poll():
                if events & (select.POLLERR | select.POLLHUP):
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    for out in (1, 2):
                        os.dup2(devnull, out)
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(grace_seconds)
                    os._exit(129)
                poller.unregister(fd)  # POLLNVAL: closed by this process; nothing to watch

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def _is_stream(fd):
    try:
        mode = os.fstat(fd).st_mode
    except OSError:  # not open
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)
