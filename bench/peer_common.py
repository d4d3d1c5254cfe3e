"""What the peer scripts share; imports nothing but the standard library, since the PyTorch
peer runs in a virtualenv of its own."""

import argparse
import json

WARMUP = 2  # untimed steps before the timed ones (tracing, allocation)


def parser(doc):
    """The peer's command line: --spec (model and batch, JSON from bench/peers.py), --steps
    (timed), --threads (intra-op threads; 0: the library's default)."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, type=json.loads)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    return p


def report(args, seconds):
    """Print what bench/peers.py reads: tokens/s of the timed steps (the global batch's)."""
    print(json.dumps({"tokens_per_s": args.steps * args.spec["global_batch"]
                      * args.spec["seq_len"] / seconds}), flush=True)
