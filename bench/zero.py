"""ZeRO benchmark (make bench-zero): dist.zero 0 to 3 at 2 processes (horovodrun, Gloo) on
this host, one after another in one invocation, at the same global batch:

  speed    configs/tiny.yaml and configs/small.yaml, 1 and 2 micro-batches a step: tokens/s and
           the step split into compute, communication (allreduce; or reduce-scatter, the
           norm's allreduce and all-gather; at stage 3 each micro-batch's all-gathers of the
           weights and reduce-scatter, timed alone and taken out of the gradient pass that
           holds them) and the update; ratios against dist.zero=0
  memory   a 142M-parameter model at 1 x 64 tokens per process and micro-batch, 1 and 2
           micro-batches a step, where AdamW's state dominates (stages 0-2); and a thin one,
           24 layers and 168M parameters with train.remat, where the weights do (stages 0, 2,
           3, and 3 without dist.prefetch): per process, the peak bytes of tensors alive at
           once in the timed steps (TensorFlow's allocator) against the dry run's estimate,
           and the peak RSS

Each run is `python -m hvd_llama.bench` in a fresh process (STEPS_RUNS: how many a row). Writes
bench/results/<date>-<host>-zero.json and .md and replaces the table in BENCHMARKS.md; with
--configs, some of them only, to results/<date>-<host>-zero-<names>.json and .md.

    .venv/bin/python bench/zero.py [--steps N] [--configs thin,142M]
    (steps default: 20 for tiny, whose step is short, 3 else)
"""

import argparse
import json
import os
import sys

from steps import REPO, hvd_llama_bench, publish

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- zero:begin -->", "<!-- zero:end -->"
PROCESSES = 2
SPEED = [(zero, accum) for accum in (1, 2) for zero in (0, 1, 2, 3)]
# Timed steps of each run (tiny's are 0.5 s and noisy), and runs of each row, one stage after
# another in turn: the row is the run of median tokens/s, with the median peak memory. On a
# shared 2-vCPU VM a whole run of tiny is sometimes 20% slow, and a stage 2 peak differs by up
# to 15% from run to run (how many layers' gradients wait for their reduce-scatter), so one
# run is not a figure.
STEPS_RUNS = {"tiny": (20, 3), "small": (3, 1), "142M": (3, 3), "thin": (3, 3)}
# configs/small.yaml widened to 142M parameters, 96% of them in the decoder blocks; one
# sequence of 64 tokens per process and micro-batch.
MEMORY = ["model.hidden_dim=1024", "model.num_layers=10", "model.intermediate_dim=2752",
          "model.num_query_heads=16", "model.num_key_value_heads=16", "data.seq_len=64"]

# Many thin layers, with train.remat: the weights dominate, and stage 3 gathers a layer at a
# time. 168M parameters, one sequence of 64 tokens per process.
THIN = ["model.hidden_dim=768", "model.num_layers=24", "model.intermediate_dim=1792",
        "model.num_query_heads=12", "model.num_key_value_heads=12", "data.seq_len=64",
        f"train.global_batch={PROCESSES}", "train.remat=true"]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="timed steps of every row")
    parser.add_argument("--configs", default=",".join(STEPS_RUNS),
                        help="the configs to run, of " + ", ".join(STEPS_RUNS))
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--benchmarks", default=os.path.join(REPO, "BENCHMARKS.md"))
    args = parser.parse_args()
    small = os.path.join(REPO, "configs", "small.yaml")
    names = args.configs.split(",")
    if not set(names) <= set(STEPS_RUNS):
        parser.error(f"--configs: {args.configs} (known: {', '.join(STEPS_RUNS)})")
    runs = [(name, config, [f"train.grad_accum={accum}"], zero)
            for name, config in (("tiny", os.path.join(REPO, "configs", "tiny.yaml")),
                                 ("small", small))
            for zero, accum in SPEED]
    runs += [("142M", small, [*MEMORY, f"train.global_batch={PROCESSES * accum}",
                              f"train.grad_accum={accum}"], zero)
             for accum in (1, 2) for zero in (0, 1, 2)]
    runs += [("thin", small, THIN, zero) for zero in (0, 2, 3)]
    runs += [("thin", small, [*THIN, "dist.prefetch=false"], 3)]
    runs = [run for name, (_, repeats) in STEPS_RUNS.items() if name in names
            for _ in range(repeats) for run in runs if run[0] == name]
    rows = []
    for name, config, overrides, zero in runs:
        # jit_compile=false is what "auto" does on a CPU; said, the dry run plans for it.
        steps = args.steps or STEPS_RUNS[name][0]
        b = hvd_llama_bench(["--config", config, "--steps", str(steps),
                             *overrides, "train.jit_compile=false", f"dist.zero={zero}"],
                            PROCESSES, "gloo")
        rows.append({"config": name, "zero": zero, "grad_accum": b["grad_accum"],
                     "prefetch": "dist.prefetch=false" not in overrides,
                     "tokens_per_s": b["tokens_per_s"], "step_s": b["step_s"],
                     "compute_s": b["compute_s"], "communication_s": b["communication_s"],
                     "other_s": b["other_s"], "peak_rss_gib": b["peak_rss_gib"],
                     "peak_tensors_gib": b["peak_tensors_gib"],
                     "planned_gib": b["planned_gib"], "global_batch": b["global_batch"],
                     "seq_len": b["seq_len"], "steps": b["steps"]})
        print(json.dumps(rows[-1]), flush=True)
    timed = args.steps or ", ".join(f"{n} {k}" for n, (k, _) in STEPS_RUNS.items())
    every = set(names) == set(STEPS_RUNS)
    publish(median_runs(rows), timed, "zero" if every else "zero-" + "-".join(names), table,
            args.results, args.benchmarks if every else None, BEGIN, END)


def median_runs(rows):
    """One row per config, stage, micro-batches and prefetch: the run of median tokens/s, with
    the tokens/s of all runs, and the medians of their peak memory."""
    groups = {}
    for r in rows:
        groups.setdefault((r["config"], r["zero"], r["grad_accum"], r["prefetch"]),
                          []).append(r)
    median = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda r: r["tokens_per_s"])
        rss = sorted(r["peak_rss_gib"] for r in runs)
        # None where TensorFlow's CPU allocator keeps no count (oneDNN off)
        tensors = sorted(r["peak_tensors_gib"] for r in runs if r["peak_tensors_gib"])
        median.append({**runs[len(runs) // 2], "peak_rss_gib": rss[len(rss) // 2],
                       "peak_tensors_gib": tensors[len(tensors) // 2] if tensors else None,
                       "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
                       "runs_peak_tensors_gib": tensors})
    return median


def table(result):
    def peer(r):  # dist.zero=0 of the same config and micro-batches
        return next(p for p in result["rows"] if p["config"] == r["config"]
                    and p["grad_accum"] == r["grad_accum"] and p["zero"] == 0)

    def spread(runs, digits):
        return (f" ({len(runs)}: {runs[0]:,.{digits}f}-{runs[-1]:,.{digits}f})"
                if len(runs) > 1 else "")

    lines = [f"float32, {PROCESSES} processes (Gloo), timed steps: {result['steps']}, "
             f"{result['cpus']} CPUs, {result['host']}, {result['date']}; ratios against "
             "dist.zero=0 of the same config and micro-batches:", "",
             "| config (global batch x seq) | dist.zero | micro-batches "
             "| tokens/s (median of runs: range) | x zero=0 "
             "| compute ms | communication ms | update ms "
             "| peak tensors per process, GiB (median: range) | dry run, GiB "
             "| measured / dry run | peak RSS per process, GiB (median) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        p, tensors = peer(r), r["peak_tensors_gib"]
        lines.append(
            f"| {r['config']} ({r['global_batch']} x {r['seq_len']}) | {r['zero']}"
            f"{'' if r['prefetch'] else ', no prefetch'} | "
            f"{r['grad_accum']} | {r['tokens_per_s']:,.0f}{spread(r['runs_tokens_per_s'], 0)} | "
            f"{r['tokens_per_s'] / p['tokens_per_s']:.2f} | {1000 * r['compute_s']:,.0f} | "
            f"{1000 * r['communication_s']:,.0f} | {1000 * r['other_s']:,.0f} | "
            + (f"{tensors:.2f}{spread(r['runs_peak_tensors_gib'], 2)} | "
               f"{r['planned_gib']:.2f} | {tensors / r['planned_gib']:.2f} | " if tensors
               else f"n/a | {r['planned_gib']:.2f} | | ") +
            f"{r['peak_rss_gib']:.2f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
