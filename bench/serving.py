"""Serving benchmark, all measured in one run on this machine:

  1. per-token latency of generation in the graph (generate.make_generate, what the SavedModel
     serves as `generate`) with the key/value cache against recomputing the whole buffer each
     step, for configs/small.yaml's model (random weights), greedy, batch 1;
  2. the exported SavedModel's `generate` (cached), loaded as a client would;
  3. `python -m hvd_llama.convert import-hf` of a ~1 GB float32 checkpoint (random weights,
     written by transformers): wall time and peak memory (RSS) of the importing process.

    .venv/bin/python bench/serving.py [--prompt 32] [--new 64] [--json]
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, os.pardir)
# ~271M parameters = 1.08 GB in float32: LLaMA-shaped, 16 layers of width 1024.
BIG = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
       "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
       "max_position_embeddings": 2048}


def per_token_ms(fn, args, new, repeats=5):
    fn(*args)  # trace and warm up
    best = min(_timed(fn, args) for _ in range(repeats))
    return 1000 * best / new


def _timed(fn, args):
    start = time.perf_counter()
    fn(*args)["token_ids"].numpy()
    return time.perf_counter() - start


def import_one(hf_dir, run_dir):
    """In a fresh process: import, then report this process's peak RSS and its RSS before the
    import began (TensorFlow and keras-hub loaded), so the difference is the import's own."""
    import keras_hub  # noqa: F401 (loaded before the baseline, as import_hf would load it)
    from hvd_llama import convert
    from hvd_llama.bench import rss_gib
    before = rss_gib()
    start = time.perf_counter()
    convert.import_hf(hf_dir, run_dir)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_gib": peak,
                      "baseline_rss_gib": before}))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--import-one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.import_one:
        return import_one(*args.import_one)
    import numpy as np
    import tensorflow as tf
    from hvd_llama import config, generate, model as model_lib
    c = config.load(os.path.join(REPO, "configs", "small.yaml"))
    model = model_lib.build(c.model, seed=0)
    context = c.model.max_position_embeddings
    prompt = np.random.default_rng(0).integers(3, c.model.vocab_size, (1, args.prompt))
    call = (tf.constant(prompt, tf.int32), tf.constant([args.prompt]), tf.constant(args.new),
            tf.constant(0.0), tf.constant(1.0), tf.constant(0, tf.int64))
    result = {"prompt": args.prompt, "new_tokens": args.new}
    result["cached_ms_per_token"] = per_token_ms(generate.make_generate(model, context), call,
                                                 args.new)
    result["recompute_ms_per_token"] = per_token_ms(
        generate.make_generate(model, context, use_cache=False), call, args.new)
    tmp = tempfile.mkdtemp(prefix="hvd_llama_serving_")
    try:
        measure_export_and_import(model, context, call, args, tmp, result)
    finally:
        shutil.rmtree(tmp)
    report(result, args)


def measure_export_and_import(model, context, call, args, tmp, result):
    import tensorflow as tf
    from hvd_llama import export
    path = export.export(model, os.path.join(tmp, "sm"), 1, context)[0]
    served = tf.saved_model.load(path).signatures["generate"]
    names = ["token_ids", "lengths", "max_new_tokens", "temperature", "top_p", "seed"]
    result["saved_model_ms_per_token"] = per_token_ms(
        lambda *a: served(**dict(zip(names, a))), call, args.new)

    hf_dir = os.path.join(tmp, "hf")
    subprocess.run([sys.executable, os.path.join(REPO, "tests", "hf_side.py"), "make", hf_dir,
                    json.dumps(BIG)], check=True, capture_output=True)
    result["checkpoint_gb"] = sum(os.path.getsize(os.path.join(hf_dir, n))
                                  for n in os.listdir(hf_dir)) / 1e9
    out = subprocess.run([sys.executable, __file__, "--import-one", hf_dir,
                          os.path.join(tmp, "run")], check=True, capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    result.update({f"import_{k}": v for k, v in
                   json.loads(out.stdout.strip().splitlines()[-1]).items()})


def report(result, args):
    if args.json:
        print(json.dumps(result))
        return
    print(f"configs/small.yaml model, greedy, batch 1, prompt {args.prompt}, {args.new} new "
          f"tokens, {os.cpu_count()} CPUs")
    print("| generate | ms per token | x cached |\n|---|---:|---:|")
    for key, label in (("cached", "in graph, KV cache"), ("recompute", "in graph, recompute"),
                       ("saved_model", "SavedModel `generate` (cached)")):
        ms = result[f"{key}_ms_per_token"]
        print(f"| {label} | {ms:.1f} | {ms / result['cached_ms_per_token']:.2f} |")
    print(f"import-hf of {result['checkpoint_gb']:.2f} GB (float32 safetensors): "
          f"{result['import_seconds']:.1f} s, peak RSS {result['import_peak_rss_gib']:.2f} GiB "
          f"({result['import_baseline_rss_gib']:.2f} GiB before it began)")


if __name__ == "__main__":
    sys.exit(main())
