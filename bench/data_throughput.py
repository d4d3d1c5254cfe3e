"""Data benchmark, all measured in one run on this machine:

  1. `python -m hvd_llama.prepare` throughput (input MB/s and tokens/s, process start-up
     included) for each worker count, with a given tokenizer (tokenizer training is timed on
     its own);
  2. the loader's delivered tokens/s in one process (configs/small.yaml's seq_len and batch);
  3. what training configs/small.yaml consumes in tokens/s (one process, fp32),
and the ratio loader / training, which should be at least 20.

    .venv/bin/python bench/data_throughput.py [--mb 40] [--workers 1 2] [--json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from hvd_llama import config, corpus, data, distributed as dist, prepare, replicas, shards
from hvd_llama.layout import Layout
from steps import hvd_llama_bench

SMALL = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs",
                     "small.yaml")


def make_corpus(directory, megabytes, files=8):
    """The stdlib docstrings, repeated with a distinct prefix per copy (so dedup keeps them),
    as JSONL files totalling about `megabytes`."""
    docs = list(corpus.builtin_documents())
    size = sum(len(d) for d in docs)
    copies = max(1, int(megabytes * 1e6 / size))
    outs = [open(os.path.join(directory, f"part-{i}.jsonl"), "w") for i in range(files)]
    for c in range(copies):
        for j, doc in enumerate(docs):
            outs[(c * len(docs) + j) % files].write(json.dumps({"text": f"[{c}] {doc}"}) + "\n")
    for f in outs:
        f.close()
    return [f.name for f in outs]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=40, help="input corpus size")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dist.init()
    replicas.setup(None, dist.local_rank(), dist.local_size())
    small = config.load(SMALL)
    tmp = tempfile.mkdtemp(prefix="hvd_llama_bench_")
    files = make_corpus(tmp, args.mb)
    in_bytes = sum(os.path.getsize(f) for f in files)
    result = {"input_mb": round(in_bytes / 1e6, 1), "cpus": os.cpu_count(), "prepare": []}

    _, result["tokenizer_train_s"] = timed(lambda: prepare.prepare(
        files[:1], os.path.join(tmp, "tok"), vocab_size=small.model.vocab_size))
    tok = os.path.join(tmp, "tok", "tokenizer.model")
    for w in args.workers:
        # Through the CLI, as users run it: the pool's spawned workers re-import __main__,
        # which for `-m hvd_llama.prepare` is light and for this script would load TensorFlow.
        out = os.path.join(tmp, f"w{w}")
        _, s = timed(lambda: subprocess.run(
            [sys.executable, "-m", "hvd_llama.prepare", "--input", *files, "--output",
             out, "--tokenizer", tok, "--workers", str(w), "--no-progress"],
            check=True, capture_output=True))
        m = shards.Prepared(out, verify=False).manifest
        tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
        result["prepare"].append({"workers": w, "seconds": round(s, 2),
                                  "mb_per_s": round(in_bytes / 1e6 / s, 2),
                                  "tokens_per_s": round(tokens / s)})

    seq_len, batch = small.data.seq_len, small.train.global_batch
    seqs = shards.Prepared(out).sequences("train", seq_len)
    steps = 400
    layout = Layout(1, 1, 0, 1, batch, seq_len)
    batches = iter(data.dataset(seqs, layout, seed=0, first_row=0, steps=steps))
    next(batches)  # start-up (graph tracing, first prefetch) is not throughput
    _, s = timed(lambda: [b for b in batches])
    result["loader_tokens_per_s"] = round((steps - 1) * batch * seq_len / s)

    # On random tokens: the speed does not depend on their values.
    trained = hvd_llama_bench(["--config", SMALL, "--steps", str(args.train_steps)])
    result["train_tokens_per_s"] = round(trained["tokens_per_s"])
    result["loader_over_training"] = round(
        result["loader_tokens_per_s"] / result["train_tokens_per_s"], 1)

    if args.json:
        print(json.dumps(result))
        return
    print(f"input: {result['input_mb']} MB of JSONL in {len(files)} files, "
          f"{result['cpus']} CPUs; tokenizer training (vocab {small.model.vocab_size}, "
          f"one file): {result['tokenizer_train_s']:.1f} s")
    print("| workers | prepare s | MB/s | tokens/s |\n|---:|---:|---:|---:|")
    for r in result["prepare"]:
        print(f"| {r['workers']} | {r['seconds']} | {r['mb_per_s']} | {r['tokens_per_s']:,} |")
    print(f"loader, 1 process, seq_len {seq_len} x batch {batch}: "
          f"{result['loader_tokens_per_s']:,} tokens/s")
    print(f"training configs/small.yaml, 1 process: {result['train_tokens_per_s']:,} tokens/s")
    print(f"loader / training: {result['loader_over_training']}x")


if __name__ == "__main__":
    sys.exit(main())
