"""Stop a run cleanly when asked to: SIGTERM and SIGUSR1 (a scheduler's notice, Slurm's
`--signal`), SIGINT (Ctrl-C).

The handler only records the signal. After every step the ranks agree on it (one small
allreduce, trainer.loop), so all of them stop after the same step and write a checkpoint
there. The process then exits with PREEMPTED (sysexits' EX_TEMPFAIL: try again later), which
mpi/slurm.sbatch answers by requeueing the job, and `train.resume=auto` continues it; after
Ctrl-C with INTERRUPTED, the shell's status for it. A second signal acts at once, as if no
handler were set (Ctrl-C: KeyboardInterrupt), so a rank stuck in a collective can still be
stopped.
"""

import signal

PREEMPTED = 75
INTERRUPTED = 130
_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_received = 0  # the first signal's number; 0 while none came


def install():
    for signum in _SIGNALS:
        signal.signal(signum, _record)


def _record(signum, frame):
    global _received
    _received = _received or signum
    for each in _SIGNALS:  # the next one: now
        signal.signal(each, signal.default_int_handler if each == signal.SIGINT
                      else signal.SIG_DFL)


def received():
    """The number of the first signal this process got, 0 if none."""
    return _received


def exit_status(signum):
    return INTERRUPTED if signum == signal.SIGINT else PREEMPTED


def name(signum):
    return signal.Signals(signum).name
