"""Strategies benchmark (make bench-strategies): dist.strategy horovod, mirrored and hybrid on
this host, one after another in one invocation, for each config, at the same global batch:

  horovod   1 process (one replica: the reference for per-device speed)
  horovod   2 processes under horovodrun (Gloo): the default layout for 2 replicas
  mirrored  1 process over 2 devices (logical CPU devices without GPUs)
  hybrid    1 process over 2 devices under horovodrun -np 1: one host's share of a cluster
  hybrid    2 processes x 2 devices under horovodrun: two "hosts" on one, 4 replicas

Each row is `python -m hvd_llama.bench` in a fresh process: tokens/s, the step split into
compute (forward, backward and the in-process mean), allreduce and the update, and peak RSS.
Writes bench/results/<date>-<host>-strategies.json and .md and replaces the table in
BENCHMARKS.md.

    .venv/bin/python bench/strategies.py [--configs configs/tiny.yaml configs/small.yaml]
"""

import argparse
import json
import os
import sys

from steps import REPO, hvd_llama_bench, publish

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- strategies:begin -->", "<!-- strategies:end -->"
DEVICES = 2  # per process, for mirrored and hybrid
# (strategy, processes, launched, overrides)
VARIANTS = [("horovod", 1, False, []),
            ("horovod", 2, True, []),
            ("mirrored", 1, False, [f"dist.logical_cpus={DEVICES}"]),
            ("hybrid", 1, True, [f"dist.logical_cpus={DEVICES}"]),
            ("hybrid", 2, True, [f"dist.logical_cpus={DEVICES}"])]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=[
        os.path.join(REPO, "configs", name) for name in ("tiny.yaml", "small.yaml")])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--benchmarks", default=os.path.join(REPO, "BENCHMARKS.md"))
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        for strategy, processes, launched, overrides in VARIANTS:
            b = hvd_llama_bench(["--config", config, "--steps", str(args.steps),
                                 f"dist.strategy={strategy}", *overrides],
                                processes, "gloo" if launched else None, launch=launched)
            rows.append({"config": os.path.relpath(config, REPO), "strategy": strategy,
                         "processes": processes, "devices_per_process": b["devices_per_process"],
                         "threads_per_process": b["threads_per_process"],
                         "tokens_per_s": b["tokens_per_s"], "step_s": b["step_s"],
                         "compute_s": b["compute_s"], "communication_s": b["communication_s"],
                         "other_s": b["other_s"], "peak_rss_gib": b["peak_rss_gib"],
                         "global_batch": b["global_batch"], "seq_len": b["seq_len"]})
            print(json.dumps(rows[-1]), flush=True)
    publish(rows, args.steps, "strategies", table, args.results, args.benchmarks, BEGIN, END)


def table(result):
    lines = [f"float32, {result['steps']} timed steps, {result['cpus']} CPUs, {result['host']}, "
             f"{result['date']}; ratios against horovod with 2 processes of the same config:", "",
             "| config | dist.strategy | processes x devices | threads per process | tokens/s "
             "| x horovod 2 processes | compute ms | communication ms | update ms "
             "| peak RSS per process, GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        peer = next(p for p in result["rows"] if p["config"] == r["config"]
                    and p["strategy"] == "horovod" and p["processes"] == 2)
        lines.append(
            f"| {r['config']} (batch {r['global_batch']} x {r['seq_len']}) | {r['strategy']} | "
            f"{r['processes']} x {r['devices_per_process']} | {r['threads_per_process']} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / peer['tokens_per_s']:.2f} | "
            f"{1000 * r['compute_s']:,.0f} | {1000 * r['communication_s']:,.0f} | "
            f"{1000 * r['other_s']:,.0f} | {r['peak_rss_gib']:.2f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
