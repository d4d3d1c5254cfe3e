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
  elastic   (Gloo only) rank 1 of an elastic job (dist.elastic, a host each: localhost and
            127.0.0.1) killed (SIGKILL) after step K: seconds until rank 0 trains on alone
            (the job survives; it is then stopped); work lost = steps since the last commit
            (dist.commit_every = train.checkpoint_every)

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
SIGNALS = {"sigkill": signal.SIGKILL, "sigusr1": signal.SIGUSR1, "sigstop": signal.SIGSTOP,
           "elastic": signal.SIGKILL}
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
    hosts, elastic = ["-H", "localhost:2"], []
    if fault == "elastic":  # two hosts to Horovod: it leaves out the dead rank's for good
        discover = os.path.join(run_dir, "hosts.sh")
        with open(discover, "w") as f:
            f.write("#!/bin/sh\necho localhost:1\necho 127.0.0.1:1\n")
        os.chmod(discover, 0o755)
        hosts = ["--min-np", "1", "--max-np", "2", "--host-discovery-script", discover]
        elastic = ["dist.elastic=true", f"dist.commit_every={EVERY}"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", "2", *hosts,
           f"--{controller}", sys.executable, "-m", "hvd_llama.train",
           "--config", os.path.join(REPO, "configs", "micro.yaml"), f"run.dir={run_dir}",
           f"data.cache_dir={cache_dir}", "train.steps=100000", "train.log_every=1",
           f"train.checkpoint_every={EVERY}", "train.eval_every=0", *elastic]
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
    if fault == "elastic":
        return _survived(job, out, sent, run_dir)
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
    return {"controller": controller, "fault": fault, "detected": detected, "survived": False,
            "seconds_to_end": round(seconds, 2), "exit_status": job.returncode,
            "rank_and_host_named": named, "steps_after_fault": last_step - AFTER,
            "checkpoint_step": last_ckpt, "work_lost_steps": last_step - last_ckpt}


def _survived(job, out, sent, run_dir):
    """The elastic job after the kill: until rank 0 trains on alone from its last commit."""
    for line in job.stdout:
        out.append(line)
        restart = re.search(r"elastic: 1 process\(es\) .* from step (\d+)", line)
        if restart:
            break
    else:
        raise RuntimeError("the elastic job ended instead of going on:\n" + "".join(out)[-3000:])
    seconds = time.monotonic() - sent
    job.kill()
    subprocess.run(["pkill", "-9", "-f", run_dir])
    job.communicate()
    shutil.rmtree(run_dir, ignore_errors=True)
    logged = [int(s) for s in re.findall(r"step (\d+)/100000 \|", "".join(out))]
    commit = int(restart.group(1)) - 1
    return {"controller": "gloo", "fault": "elastic", "detected": True, "survived": True,
            "seconds_to_end": round(seconds, 2), "exit_status": None,
            "rank_and_host_named": False, "steps_after_fault": max(logged) - AFTER,
            "checkpoint_step": commit, "work_lost_steps": max(logged) - commit}


def table(result):
    lines = [f"Measured {result['date']} on {result['host']}, {result['cpus']} x {cpu()}: "
             f"configs/micro.yaml, 2 processes, fault after step {AFTER}, "
             f"train.checkpoint_every={EVERY} (elastic: dist.commit_every={EVERY}).", "",
             "| controller | fault | job ended after | exit status | rank and host named "
             "| steps after the fault | work lost (steps) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["survived"]:
            ended = f"survived: went on without it after {r['seconds_to_end']:.1f} s"
            status, named = "-", "-"
        else:
            ended = f"{r['seconds_to_end']:.1f} s" if r["detected"] else \
                f"not ended in {r['seconds_to_end']:.0f} s"
            status, named = r["exit_status"], "yes" if r["rank_and_host_named"] else "no"
        lines.append(f"| {r['controller']} | {r['fault']} | {ended} | {status} | {named} | "
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
            for c in args.controllers for f in args.faults
            if not (f == "elastic" and c != "gloo")]  # Horovod's elastic mode is Gloo's
    publish(rows, AFTER, "faults", table, args.results, args.benchmarks or None, BEGIN, END)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
