"""Recipe benchmark, all measured in one run on this machine, one process per variant:

  configs/small.yaml (33.5M parameters, global batch 8 x 512 tokens, one process) in float32
  and bfloat16, with and without train.remat, and float32 under XLA: tokens/s, MFU against
  this CPU's matmul peak at the same dtype (measured here too), and peak memory (RSS) of the
  training steps over the RSS before the model was built. Ratios are against float32 alone.

    .venv/bin/python bench/recipe.py [--steps 4] [--json]
"""

import argparse
import json
import os
import sys

from steps import hvd_llama_bench

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = os.path.join(HERE, os.pardir, "configs", "small.yaml")
VARIANTS = [("float32", False, False), ("float32", True, False), ("bfloat16", False, False),
            ("bfloat16", True, False), ("float32", False, True)]  # precision, remat, XLA


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from hvd_llama import config, plan
    from hvd_llama.layout import Layout
    c = config.load(SMALL)
    flops_per_token = plan.flops_per_token(c.model, c.data.seq_len)
    rows = []
    for precision, remat, jit in VARIANTS:
        overrides = [f"train.precision={precision}", f"train.remat={str(remat).lower()}",
                     f"train.jit_compile={str(jit).lower()}"]
        b = hvd_llama_bench(["--config", SMALL, "--steps", str(args.steps), *overrides])
        r = {"precision": precision, "remat": remat, "xla": jit,
             "tokens_per_s": b["tokens_per_s"], "peak_over_base_gib": b["peak_rss_over_start_gib"],
             "matmul_peak_tflops": b["peak_tflops_per_process"], "mfu": b["mfu"]}
        planned = config.load(SMALL, overrides)
        r["plan_activations_gib"] = plan.memory_per_replica(
            planned, Layout.of(planned))["activations"] / plan.GIB
        rows.append(r)
    ref = rows[0]
    for r in rows:
        r["speed_vs_fp32"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["memory_vs_fp32"] = r["peak_over_base_gib"] / ref["peak_over_base_gib"]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"configs/small.yaml, 1 process, {os.cpu_count()} CPUs, {args.steps} timed steps; "
          f"{flops_per_token / 1e9:.3f} GFLOP per token")
    print("| precision | remat | XLA | tokens/s | x fp32 | matmul peak TFLOP/s | MFU | "
          "peak RSS over base GiB | x fp32 | --dry-run activations GiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['precision']} | {'on' if r['remat'] else 'off'} | "
              f"{'on' if r['xla'] else 'off'} | "
              f"{r['tokens_per_s']:,.0f} | {r['speed_vs_fp32']:.2f} | "
              f"{r['matmul_peak_tflops']:.3f} | {100 * r['mfu']:.1f}% | "
              f"{r['peak_over_base_gib']:.2f} | {r['memory_vs_fp32']:.2f} | "
              f"{r['plan_activations_gib']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
