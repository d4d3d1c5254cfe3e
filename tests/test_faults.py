"""Faults injected into real runs: a rank killed with SIGKILL, a preemption signal, weights
that diverge between ranks, a rank that stops arriving at the collectives.

Each multi-process run here is a real horovodrun or mpirun job of the micro config; the
killed and signalled processes are found by their environment (HOROVOD_RANK under Gloo,
OMPI_COMM_WORLD_RANK under MPI) and signalled from the test, as a node's failure or a
scheduler would.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import (ENV, HOROVODRUN, MICRO, REPO, assert_one_line_error, assert_trains_like,
                      read_until, run, stopped_after_step_2, train_args)
from hvd_llama import checkpoint, config, preemption


def rank_pids(marker):
    """{rank: pid} of the training processes whose command line holds `marker`."""
    pids = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        except OSError:  # gone meanwhile
            continue
        rank = env.get(b"HOROVOD_RANK", env.get(b"OMPI_COMM_WORLD_RANK"))
        if rank is not None:
            pids[int(rank)] = int(pid)
    return pids


def start(cmd, env=None):
    return subprocess.Popen(cmd, cwd=REPO, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def signal_when(job, pid, signum, pattern):
    """Send `signum` to process pid() once the job printed `pattern`; wait for the job's end
    (at most 60 s): its output, seconds from the signal to the end."""
    seen = []
    read_until(job, pattern, seen)
    os.kill(pid(), signum)
    sent = time.monotonic()
    seen.append(job.communicate(timeout=60)[0])
    return "".join(seen), time.monotonic() - sent


def python_pid(marker):
    """The pid of the one `python -m hvd_llama.train` whose command line holds `marker`."""
    [pid] = [int(p) for p in filter(str.isdigit, os.listdir("/proc"))
             if b"-m\0hvd_llama.train\0" in _cmdline(p) and marker.encode() in _cmdline(p)]
    return pid


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def launcher(controller):
    return [HOROVODRUN, "-np", "2", "-H", "localhost:2", f"--{controller}", sys.executable]


def test_a_crash_in_a_save_then_a_preemption_lose_no_work(one_process, tmp_path, cache_dir):
    """From the one-process run's step-2 checkpoint, resumed at dist.zero=1 under horovodrun
    --gloo, rank 1 dies in the step-4 save with its share written and rank 0 in the barrier:
    step 2 stays the latest complete checkpoint (rank 0, failing in the barrier, removes the
    partial one).
    Resumed (train.resume=auto) under horovodrun --mpi, then SIGTERM to rank 0: both ranks
    stop after the same step, with a checkpoint of it, exit status 75 through mpirun. Resumed
    again (Gloo), the run ends exactly where the uninterrupted one-process run ends (losses of
    all 5 steps and final weights). (A rank killed: under Gloo, bench/faults.py's test in `make
    test-bench`; under MPI, the mpirun.sh test below; a node lost, then resumed:
    test_two_nodes.py. A preemption under Gloo: bench/faults.py's test.)"""
    out = stopped_after_step_2(one_process, str(tmp_path))
    run_dir = os.path.join(out, "run")
    args = train_args(out, cache_dir, "train.checkpoint_every=2", "train.resume=auto")
    slow = {"STEP_SECONDS": "0.5"}  # the signal lands mid-run

    crashed = run([*launcher("gloo"), *args, "dist.zero=1"], check=False,
                  env={"CRASH_IN_SAVE_RANK": "1"})
    assert crashed.returncode != 0
    assert os.listdir(checkpoint.directory(run_dir)) == ["step-00000002"]  # rank 0: no partial

    job = start([*launcher("mpi"), *args], slow)
    text, seconds = signal_when(job, lambda: rank_pids(out)[0], signal.SIGTERM, r"step 3/5 \|")
    assert job.returncode == preemption.PREEMPTED, text[-3000:]
    assert re.search(r"stopped after step (\d+) on SIGTERM", text), text[-3000:]
    stopped = int(re.search(r"stopped after step (\d+) on SIGTERM", text).group(1))
    assert stopped in (3, 4)  # the step the signal came in, or the one after
    assert checkpoint.latest(run_dir).endswith(f"step-{stopped:08d}")
    assert not os.path.exists(os.path.join(run_dir, "saved_model"))
    assert not [n for n in os.listdir(checkpoint.directory(run_dir)) if "partial" in n]

    run([*launcher("gloo"), *args])
    assert_trains_like(out, one_process)  # steps 1-5 logged once each, final weights


def test_a_rank_killed_under_mpirun_sh_ends_the_job_with_one_line(tmp_path, cache_dir):
    """Rank 1 killed (SIGKILL) under mpi/mpirun.sh (plain mpirun, hvd_llama.train's CLI):
    mpirun names the rank and node and stops the survivor at once."""
    run_dir = str(tmp_path / "run")
    job = start(["bash", "mpi/mpirun.sh", "-H", "localhost:2", MICRO, f"run.dir={run_dir}",
                 f"data.cache_dir={cache_dir}", "train.steps=500", "train.log_every=1",
                 "train.checkpoint_every=2"])
    text, seconds = signal_when(job, lambda: rank_pids(run_dir)[1], signal.SIGKILL,
                                r"step 3/500 \|")
    assert job.returncode != 0 and seconds < 60
    assert re.search(r"process rank 1 with PID \d+ on node \S+ exited on signal 9", text), text
    assert "Traceback" not in text
    assert rank_pids(run_dir) == {}
    checkpoint.load_latest(run_dir)  # whole and readable


def test_ranks_whose_weights_diverged_are_named_and_nothing_is_saved(tmp_path, cache_dir):
    out = str(tmp_path)
    proc = run([*launcher("mpi"), *train_args(out, cache_dir, steps=2)], check=False,
               env={"PERTURB_RANK": "1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(r"step 2: the ranks' weights have diverged \(rank 0: checksum \w+; "
                     r"rank 1: checksum \w+\); checkpoint 2 not written", text), text[-3000:]
    assert not os.path.exists(checkpoint.directory(os.path.join(out, "run")))


def test_a_rank_that_stops_arriving_is_named_and_the_job_ends(tmp_path, cache_dir):
    """Rank 1 sleeps before its third step (its Horovod thread alive): after
    dist.stall_warning_seconds (1) Horovod's stall inspector names it as missing from the
    allreduce rank 0 waits in, and after dist.stall_shutdown_seconds (2) the job ends."""
    out = str(tmp_path)
    began = time.monotonic()
    proc = run([*launcher("gloo"), *train_args(out, cache_dir, "dist.stall_warning_seconds=1",
                                               "dist.stall_shutdown_seconds=2")],
               check=False, env={"STALL_RANK": "1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.monotonic() - began < 120
    assert re.search(r"waiting for remainder of ranks for more than 1 seconds", text), text
    assert re.search(r"Missing ranks:\s*\n\S*1!?: \[", text), text[-3000:]  # "!": shut down
    assert "a collective failed: another rank died, hung up or stalled" in text


def test_slurm_requeue_then_ctrl_c_and_a_damaged_checkpoint(tmp_path, cache_dir):
    """mpi/slurm.sbatch under Slurm's time-limit signal (USR1 to the batch script): the rank
    writes a checkpoint of its step and exits 75, the script requeues the job. That checkpoint
    is then truncated and a killed save's leftovers lie beside it: the requeued job says it
    passes over the damaged one, resumes from the one before, and its first save removes the
    leftovers. Ctrl-C (SIGINT) to it: a checkpoint again, exit 130, no traceback, no requeue.
    Slurm and Apptainer are not on this machine: stand-ins on PATH run the command as srun and
    `apptainer exec` would, and record `scontrol requeue`."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    for name, body in [("srun", 'while [ "${1#-}" != "$1" ]; do shift; done; exec "$@"'),
                       ("apptainer", 'shift 2; shift; exec "$@"'),  # exec --nv IMAGE CMD...
                       ("scontrol", f'echo "$@" >> {log}')]:
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "hvd_llama.sif").write_text("")
    run_dir = str(tmp_path / "run")
    env = {"PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "IMAGE": str(tmp_path / "hvd_llama.sif"), "NODES": "1", "TASKS_PER_NODE": "1",
           "SLURM_JOB_ID": "42"}
    job_script = ["bash", "mpi/slurm.sbatch", MICRO, f"run.dir={run_dir}",
                  f"data.cache_dir={cache_dir}", "train.log_every=1",
                  "train.checkpoint_every=2", "train.eval_every=0", "train.steps=100000"]

    job = start(job_script, env)
    text, _ = signal_when(job, lambda: job.pid, signal.SIGUSR1, r"step 3/100000 \|")
    assert job.returncode == preemption.PREEMPTED, text[-3000:]
    assert log.read_text() == "requeue 42\n"
    stopped = int(re.search(r"stopped after step (\d+) on SIGUSR1", text).group(1))
    newest = checkpoint.latest(run_dir)
    assert newest.endswith(f"step-{stopped:08d}") and stopped in (3, 4)

    data = os.path.join(newest, "state.data-00000-of-00001")
    os.truncate(data, os.path.getsize(data) - 1)
    gone = 99999999  # a pid no process has
    leftovers = [f"{newest}.partial-ranks", f"{newest}.partial-{gone}", f"{newest}.old-{gone}"]
    for path in leftovers:
        os.makedirs(path)
    job = start(job_script, env)  # the requeued job
    text, _ = signal_when(job, lambda: python_pid(run_dir), signal.SIGINT,
                          r"step 6/100000 \|")
    assert f"passing over checkpoint {newest}: {data}: checkpoint file is" in text
    assert f"moved {newest} to {newest}.damaged-" in text  # kept, out of the way
    assert "this run: steps 3..100000" in text  # from step 2's checkpoint
    assert job.returncode == preemption.INTERRUPTED and "Traceback" not in text
    stopped = int(re.search(r"stopped after step (\d+) on SIGINT", text).group(1))
    assert checkpoint.latest(run_dir).endswith(f"step-{stopped:08d}")
    assert not any(os.path.exists(path) for path in leftovers)
    assert log.read_text() == "requeue 42\n"


def kill_when_written(cmd, partial_dir, pattern):
    """Start cmd, SIGKILL it once an entry of `partial_dir` matches `pattern`."""
    job = start(cmd)
    deadline = time.monotonic() + 120
    while not any(re.match(pattern, n) for n in os.listdir(partial_dir)):
        assert job.poll() is None, job.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    job.kill()
    job.communicate()


def test_an_export_or_a_prepare_killed_mid_write_leaves_no_half_output(
        one_process, tmp_path):
    """SIGKILL while the SavedModel, or the prepared dataset, is being written: no version
    (dataset) appears, and the next export (prepare) writes it and removes the leftover."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(os.path.join(one_process, "run"), run_dir)
    exports = os.path.join(run_dir, "saved_model")
    export = [sys.executable, "-m", "hvd_llama.export", run_dir]
    kill_when_written(export, exports, r"2\.partial-\d+$")
    assert sorted(os.listdir(exports))[0] == "1" and "2" not in os.listdir(exports)
    run(export)
    assert sorted(os.listdir(exports)) == ["1", "2"]

    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("argparse.py", "typing.py", "inspect.py", "pathlib.py"):
        shutil.copyfile(os.path.join(os.path.dirname(os.__file__), name), texts / f"{name}.txt")
    prepare = [sys.executable, "-m", "hvd_llama.prepare", "--input", str(texts / "*.txt"),
               "--output", str(tmp_path / "ds"), "--vocab-size", "1000", "--workers", "1"]
    kill_when_written(prepare, tmp_path, r"ds\.partial-\d+$")
    assert not os.path.exists(tmp_path / "ds")
    run(prepare)
    assert os.path.isfile(tmp_path / "ds" / "manifest.json")
    assert [n for n in os.listdir(tmp_path) if n.startswith("ds")] == ["ds"]


@contextlib.contextmanager
def small_disk(path, size):
    """A tmpfs of `size` mounted at `path` for the block (root only: skipped otherwise)."""
    os.makedirs(path)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                                            "tmpfs", path]).returncode != 0:
        pytest.skip("mounting a small filesystem needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=True)


def fill(disk, leave):
    """Write a file that leaves `leave` bytes free on `disk`; its path."""
    stat = os.statvfs(disk)
    filler = os.path.join(disk, "filler")
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(stat.f_bavail * stat.f_frsize - leave, 0))
    return filler


def test_a_full_or_read_only_disk_names_the_path_and_keeps_the_last_output(
        one_process, tmp_path, cache_dir):
    """A read-only run dir: the export says which path it could not write. A full one: the
    checkpoint at step 4 fails with one line and the step-2 one stays the latest, whole. A
    prepare onto a full disk leaves no dataset and no leftover."""
    with small_disk(str(tmp_path / "disk"), "48m") as disk:
        run_dir = os.path.join(stopped_after_step_2(one_process, disk), "run")
        subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        export = run([sys.executable, "-m", "hvd_llama.export", run_dir], check=False)
        assert_one_line_error(export, f"{run_dir}/saved_model/1", "Read-only file system")
        subprocess.run(["mount", "-o", "remount,rw", disk], check=True)

        resume = [sys.executable, "-m", "hvd_llama.train", "--config", MICRO,
                  *train_args(disk, cache_dir, "train.resume=true",
                              "train.checkpoint_every=2", "train.jit_compile=false")[3:]]
        filler = fill(disk, leave=1 << 20)  # room for log lines, not for a checkpoint
        full = run(resume, check=False)
        assert_one_line_error(full, f"{run_dir}/checkpoints/step-00000004",
                              "No space left on device")
        assert os.listdir(checkpoint.directory(run_dir)) == ["step-00000002"]
        assert checkpoint.resume_point(config.load(MICRO, resume[5:]))["step"] == 2  # whole
        os.remove(filler)

        texts = tmp_path / "texts"
        texts.mkdir()
        for name in ("argparse.py", "typing.py", "inspect.py"):
            shutil.copyfile(os.path.join(os.path.dirname(os.__file__), name),
                            texts / f"{name}.txt")
        fill(disk, leave=64 << 10)
        prepare = run([sys.executable, "-m", "hvd_llama.prepare", "--input",
                       str(texts / "*.txt"), "--output", f"{disk}/ds", "--vocab-size", "1000"],
                      check=False)
        assert_one_line_error(prepare, f"{disk}/ds", "No space left on device")
        assert not [n for n in os.listdir(disk) if n.startswith("ds")]


def test_rank_0_killed_at_each_point_of_a_save_keeps_the_last_checkpoint(
        one_process, tmp_path, cache_dir):
    """The one process (rank 0, which writes its share, merges and renames) dies after
    merging the shares, then with everything written but the rename: each time step 2 stays
    the latest whole checkpoint and the partial step 3 is passed over; the next run cleans it
    up at its first save and ends where the uninterrupted run ends. (Rank 1 dying after its
    share: test_a_killed_rank_then_a_preemption_lose_no_work.)"""
    out = stopped_after_step_2(one_process, str(tmp_path))
    run_dir = os.path.join(out, "run")
    args = train_args(out, cache_dir, "train.checkpoint_every=2", "train.jit_compile=false",
                      "train.resume=true")
    for point in ("merge", "rename"):
        crashed = run([sys.executable, *args, "train.checkpoint_every=1"], check=False,
                      env={"CRASH_IN_SAVE_RANK": "0", "CRASH_AT": point})
        assert crashed.returncode == 3, crashed.stdout + crashed.stderr
        assert sorted(os.listdir(checkpoint.directory(run_dir))) == [
            "step-00000002", "step-00000003.partial-ranks"], point
        assert checkpoint.resume_point(config.load(MICRO, args[3:]))["step"] == 2
    run([sys.executable, *args])
    assert sorted(os.listdir(checkpoint.directory(run_dir))) == [  # the partial one: gone
        "step-00000002", "step-00000004", "step-00000005"]
    assert_trains_like(out, one_process)
