"""python -m hvd_llama.plot RUN_DIR [--output PNG]

One PNG of a run's metrics.jsonl: loss, perplexity, learning rate and throughput over steps
(validation points on the loss and perplexity panels). Written to RUN_DIR/metrics.png unless
--output says otherwise; an existing picture is replaced only once the new one is complete.
"""

import argparse
import json
import os
import sys

from hvd_llama import cli
from hvd_llama.atomic import atomic_path
from hvd_llama.errors import UserError

PANELS = [  # (metric, validation metric, title, log scale)
    ("loss", "val_loss", "loss", False),
    ("perplexity", "val_perplexity", "perplexity", True),
    ("learning_rate", None, "learning rate", False),
    ("tokens_per_sec", None, "tokens/s", False),
]


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    records = []
    try:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{number}: not a JSON record ({e.msg})") from e
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from e
    if not records:
        raise UserError(f"{path}: no records to plot")
    return records


def plot(records, output):
    import matplotlib
    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (key, val_key, title, log) in zip(axes.flat, PANELS):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label="train")
        val = [(r["step"], r[val_key]) for r in records if val_key and val_key in r]
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
            ax.legend()
        ax.set_title(title)
        ax.set_yscale("log" if log else "linear")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--output", help="default: RUN_DIR/metrics.png")
    return cli.main(parser, _plot, argv)


def _plot(args):
    out = plot(read_metrics(args.run_dir), args.output or os.path.join(args.run_dir,
                                                                       "metrics.png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
