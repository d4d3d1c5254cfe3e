"""Reliability benchmark (make bench-faults): faults injected into real 2-process runs of
configs/micro.yaml on this host, under horovodrun with each controller, and what they cost:

  sigkill   rank 1 killed (SIGKILL) after step K: seconds until the whole job has ended, its
            exit status, whether a line names the rank and host; work lost = steps since the
            last checkpoint (train.checkpoint_every)
  sigusr1   rank 1 sent SIGUSR1 (a scheduler's notice) after step K: seconds until the job
            has ended with its checkpoint written, steps run after the signal, work lost 0
            when the checkpoint is at the last step run
  sigstop   rank 1 frozen (SIGSTOP: the process and its Horovod thread) after step K:
            seconds until the job has ended (Gloo's timeout; MPI waits, so it is cut at
            --freeze-limit seconds and reported as not detected)

Writes bench/results/<date>-<host>-faults.json and .md and replaces the table in
BENCHMARKS.md.

    .venv/bin/python bench/faults.py [--controllers gloo mpi] [--faults sigkill sigusr1 sigstop]
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from steps import REPO, cpu, publish

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"
SIGNALS = {"sigkill": signal.SIGKILL, "sigusr1": signal.SIGUSR1, "sigstop": signal.SIGSTOP}
AFTER = 20  # the step after which the fault comes
EVERY = 8  # train.checkpoint_every


def rank_pid(marker, rank):
    """The pid of rank `rank` of the training processes whose command line holds `marker`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"HOROVOD_RANK={rank}".encode() in env or \
                f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(pid)
    raise RuntimeError(f"no rank {rank} of {marker} running")


def inject(controller, fault, cache_dir, freeze_limit):
    run_dir = tempfile.mkdtemp(prefix="faults-")
    cmd = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", "2", "-H",
           "localhost:2", f"--{controller}", sys.executable, "-m", "hvd_llama.train",
           "--config", os.path.join(REPO, "configs", "micro.yaml"), f"run.dir={run_dir}",
           f"data.cache_dir={cache_dir}", "train.steps=100000", "train.log_every=1",
           f"train.checkpoint_every={EVERY}", "train.eval_every=0"]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    out = []
    for line in job.stdout:
        out.append(line)
        if f"step {AFTER}/100000 |" in line:
            break
    victim = rank_pid(run_dir, 1)
    os.kill(victim, SIGNALS[fault])
    sent = time.monotonic()
    try:
        out.append(job.communicate(timeout=freeze_limit)[0])
        seconds, detected = time.monotonic() - sent, True
    except subprocess.TimeoutExpired:
        seconds, detected = time.monotonic() - sent, False
        os.kill(victim, signal.SIGCONT)
        job.kill()
        subprocess.run(["pkill", "-9", "-f", run_dir])
        job.communicate()
    text = "".join(out)
    logged = [int(s) for s in re.findall(r"step (\d+)/100000 \|", text)]
    stopped = re.search(r"stopped after step (\d+)", text)
    last_ckpt = max([int(n[5:]) for n in os.listdir(os.path.join(run_dir, "checkpoints"))
                     if re.fullmatch(r"step-\d{8}", n)], default=0)
    last_step = int(stopped.group(1)) if stopped else max(logged, default=0)
    named = bool(re.search(r"rank 1 (on host|with PID \d+ on node) \S+", text))
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"controller": controller, "fault": fault, "detected": detected,
            "seconds_to_end": round(seconds, 2), "exit_status": job.returncode,
            "rank_and_host_named": named, "steps_after_fault": last_step - AFTER,
            "checkpoint_step": last_ckpt, "work_lost_steps": last_step - last_ckpt}


def table(result):
    lines = [f"Measured {result['date']} on {result['host']}, {result['cpus']} x {cpu()}: "
             f"configs/micro.yaml, 2 processes, fault after step {AFTER}, "
             f"train.checkpoint_every={EVERY}.", "",
             "| controller | fault | job ended after | exit status | rank and host named "
             "| steps after the fault | work lost (steps) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ended = f"{r['seconds_to_end']:.1f} s" if r["detected"] else \
            f"not ended in {r['seconds_to_end']:.0f} s"
        lines.append(f"| {r['controller']} | {r['fault']} | {ended} | {r['exit_status']} | "
                     f"{'yes' if r['rank_and_host_named'] else 'no'} | "
                     f"{r['steps_after_fault']} | {r['work_lost_steps']} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controllers", nargs="+", default=["gloo", "mpi"])
    parser.add_argument("--faults", nargs="+", default=list(SIGNALS), choices=list(SIGNALS))
    parser.add_argument("--freeze-limit", type=float, default=90.0,
                        help="seconds to wait for a job with a frozen rank to end")
    parser.add_argument("--cache-dir", default="~/.cache/hvd_llama")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--benchmarks", default=os.path.join(REPO, "BENCHMARKS.md"),
                        help="the file whose table to replace ('' for none)")
    args = parser.parse_args()
    rows = [inject(c, f, args.cache_dir, args.freeze_limit)
            for c in args.controllers for f in args.faults]
    publish(rows, AFTER, "faults", table, args.results, args.benchmarks or None, BEGIN, END)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
