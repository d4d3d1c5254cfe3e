"""Prepared token datasets in, per-rank batches out; and the `python -m hvd_llama.data` CLI.

    python -m hvd_llama.data inspect DIR [--seq-len L] [--processes N] [--batch-size B]
    python -m hvd_llama.data prepare ...   (an alias of `python -m hvd_llama.prepare`)

A prepared directory (shards.py: the format) holds shards of <s> doc </s> token streams, cut
into sequences 0..n-1 of seq_len + 1 tokens (inputs plus the targets shifted by one).

Row j of the endless stream of rows is sequence perm_e(j mod n) of epoch e = j // n, where
perm_e is a stateless shuffle seeded by (train.seed, e). Which rows a process reads at each
micro-batch of each step is the Layout's to say (layout.py); every sequence of an epoch is
read exactly once, and the processes' shares never differ by a single sequence. Nothing
depends on history: a checkpoint records the rows consumed and a resumed run reads exactly what
an uninterrupted one would.
"""

import argparse
import os
import sys

from hvd_llama import cli, compat, corpus, prepare, tokenizer
from hvd_llama.atomic import write_bytes
from hvd_llama.errors import UserError
from hvd_llama.layout import Layout
from hvd_llama.shards import Prepared


def builtin_dir(cache_dir, vocab_size, local_rank=0):
    """The built-in corpus as a prepared directory, prepared once per cache and vocab size;
    the caller is process `local_rank` of its host. Only local rank 0 prepares it: the others
    must wait for it (a barrier) before they read it."""
    cache = os.path.expanduser(cache_dir)
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    out = os.path.join(cache, "datasets", f"builtin-{version}-v{vocab_size}")
    if local_rank == 0 and not os.path.exists(out):
        text = os.path.join(cache, "corpus", f"builtin-{version}.txt")
        if not os.path.exists(text):
            write_bytes(text, "\n\n".join(corpus.builtin_documents()).encode())
        try:
            prepare.prepare([text], out, vocab_size=vocab_size, min_chars=40,
                            val_fraction=0.01)
        except (UserError, OSError):
            # Another host sharing this cache may have finished it first: then use theirs.
            if not os.path.exists(os.path.join(out, "manifest.json")):
                raise
    return out


def sequence_ids(rows_, n, seed):
    """Rows -> sequence ids: within epoch e = row // n, a stateless shuffle seeded (seed, e)."""
    import tensorflow as tf
    rows_ = tf.cast(rows_, tf.int64)
    seeds = tf.stack([tf.fill(tf.shape(rows_), tf.cast(seed, tf.int64)), rows_ // n,
                      tf.zeros_like(rows_)], axis=-1)
    # A seed per row: compat (the public index_shuffle mangles a batch of seeds).
    return compat.index_shuffle(rows_ % n, seeds, tf.constant(n - 1, tf.int64))


def dataset(seqs, layout, seed, first_row, steps):
    """This process's next `steps` training steps, from global row `first_row`:
    int32 [grad_accum, d*b, seq_len + 1] each (the Layout's rows)."""
    import tensorflow as tf
    if seqs.n < 1:
        raise UserError(f"the training split holds no sequence of 'data.seq_len'+1="
                        f"{seqs.seq_len + 1} tokens")
    shape = [layout.process_batch, seqs.seq_len + 1]

    def ids_of(m):  # micro-batches since first_row: an int64 tensor
        return sequence_ids(layout.rows(first_row, 0, m), seqs.n, seed)

    def fetch(ids):
        return tf.ensure_shape(tf.numpy_function(seqs.fetch, [ids], tf.int32), shape)

    ds = tf.data.Dataset.range(steps * layout.grad_accum).map(ids_of)
    ds = ds.map(fetch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(layout.grad_accum, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def validation_batches(seqs, layout, count):
    """This process's part of the first `count` global batches of the validation split, in
    order (no shuffle; wrapping around a split smaller than that), as count x grad_accum
    micro-batches of d*b sequences, read like the training rows."""
    if seqs.n < 1:
        return []
    return [seqs.fetch(layout.rows(0, step, m) % seqs.n)
            for step in range(count) for m in range(layout.grad_accum)]


def inspect(path, seq_len, processes, batch_size, samples, out=sys.stdout):
    data = Prepared(path, verify=True)
    m = data.manifest
    print(f"{path}: vocab {m['vocab_size']}, {m['dtype']} tokens, tokenizer "
          f"{m['tokenizer']['sha256'][:12]} (checksums verified)", file=out)
    for split, info in m["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens in "
              f"{len(info['shards'])} shard(s)", file=out)
        for shard in info["shards"]:
            print(f"  {shard['file']}: {shard['documents']:,} documents, "
                  f"{shard['tokens']:,} tokens", file=out)
    print("cleaning: " + ", ".join(f"{k} {v}" for k, v in sorted(m["cleaning"].items())),
          file=out)
    seqs = data.sequences("train", seq_len)
    layout = Layout(processes, 1, 0, 1, batch_size, seq_len)
    steps = -(-seqs.n // layout.global_batch)
    print(f"epoch at seq_len {seq_len}: {seqs.n:,} sequences; {processes} process(es) x "
          f"batch {batch_size} = {layout.global_batch} per step -> {steps:,} steps, "
          f"{steps * batch_size:,} sequences per process (the last step runs into the next "
          f"epoch; no process reads more than another)", file=out)
    sp = tokenizer.load(data.tokenizer_path)
    first = data.shards["train"][0]
    starts = data.document_starts("train", 0)
    for i in range(min(samples, len(starts))):
        end = int(starts[i + 1]) if i + 1 < len(starts) else len(first)
        text = sp.decode([int(t) for t in first[int(starts[i]):end]])
        print(f"sample {i}: {text[:200]!r}", file=out)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if next((a for a in argv if not a.startswith("-")), None) == "prepare":
        argv.remove("prepare")
        return prepare.main(argv)
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="corpora -> token shards + tokenizer + manifest "
                                   "(python -m hvd_llama.prepare --help)")
    i = sub.add_parser("inspect", help="totals, shards, the split over processes, samples")
    i.add_argument("dir")
    i.add_argument("--seq-len", type=cli.at_least(1), default=2048)
    i.add_argument("--processes", type=cli.at_least(1), default=1)
    i.add_argument("--batch-size", type=cli.at_least(1), default=1,
                   help="sequences per process per step")
    i.add_argument("--samples", type=cli.at_least(0), default=3)
    return cli.main(parser, lambda a: inspect(a.dir, a.seq_len, a.processes, a.batch_size,
                                              a.samples), argv)


if __name__ == "__main__":
    sys.exit(main())
