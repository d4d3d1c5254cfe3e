"""Prepared token datasets in, per-rank batches out; and the `python -m hvd_llama.data` CLI.

    python -m hvd_llama.data prepare --input PATH_OR_GLOB... --output DIR [options]
    python -m hvd_llama.data inspect DIR [--seq-len L] [--processes N] [--batch-size B]

A prepared directory (see prepare.py) holds shards of <s> doc </s> token streams. Each shard is
cut into windows of seq_len + 1 tokens (inputs plus the targets shifted by one), stride
seq_len; the windows of all train shards, in manifest order, are sequences 0..n-1.

Row j of the endless stream of rows is sequence perm_e(j mod n) of epoch e = j // n, where
perm_e is a stateless shuffle seeded by (train.seed, e). Micro-batch m reads global rows
[first + m*b*P, first + (m+1)*b*P) for P replicas of micro-batch b, and replica r of them only
rows [r*b, (r+1)*b); a process of d replicas (dist.strategy mirrored/hybrid) reads its
replicas' rows as one batch of d*b, which the trainer splits in order. An optimizer step is
k consecutive micro-batches, so it reads the global batch G = k*b*P rows [first + s*G,
first + (s+1)*G). The global batch of a step therefore holds the same sequences whatever the
number of processes, devices and micro-batches, every sequence of an epoch is read exactly
once, and the replicas' shares never differ by a single sequence. Nothing
depends on history: a checkpoint records the rows consumed and a resumed run reads exactly what
an uninterrupted one would.
"""

import argparse
import os
import sys

import numpy as np

from hvd_llama import corpus, prepare, tokenizer
from hvd_llama.atomic import write_bytes
from hvd_llama.errors import UserError, read_json
from hvd_llama.launcher import launched


def builtin_dir(cache_dir, vocab_size):
    """The built-in corpus as a prepared directory, prepared once per cache and vocab size.

    One process per host (local rank 0) prepares it while the others wait."""
    from hvd_llama import distributed as dist  # here: the data CLI never loads TensorFlow
    cache = os.path.expanduser(cache_dir)
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    out = os.path.join(cache, "datasets", f"builtin-{version}-v{vocab_size}")
    if dist.local_rank() == 0 and not os.path.exists(out):
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
    dist.barrier()
    return out


class Prepared:
    """A prepared dataset directory, checked against its manifest."""

    def __init__(self, path, vocab_size=None, verify=True):
        self.path = path
        manifest_path = os.path.join(path, "manifest.json")
        if not os.path.isdir(path):
            raise UserError(f"{path}: no such dataset directory")
        if not os.path.isfile(manifest_path):
            raise UserError(f"{path}: not a prepared dataset (no manifest.json; "
                            "an interrupted prepare?)")
        self.manifest = m = read_json(manifest_path, "manifest")
        if not isinstance(m, dict) or m.get("format") != "hvd_llama.tokens/1":
            raise UserError(f"{manifest_path}: not a hvd_llama.tokens/1 manifest")
        if vocab_size is not None and m["vocab_size"] != vocab_size:
            raise UserError(f"{path}: tokenizer has {m['vocab_size']} tokens but "
                            f"'model.vocab_size' is {vocab_size}")
        self.tokenizer_path = os.path.join(path, m["tokenizer"]["file"])
        _check_file(self.tokenizer_path, m["tokenizer"]["sha256"], None, verify)
        itemsize = np.dtype(m["dtype"]).itemsize
        for info in m["splits"].values():
            for shard in info["shards"]:
                _check_file(os.path.join(path, shard["file"]), shard["sha256"],
                            shard["tokens"] * itemsize, verify)
                _check_file(os.path.join(path, shard["index"]), shard["index_sha256"],
                            shard["documents"] * 8, verify)  # uint64 offsets
        self.shards = {split: [np.memmap(os.path.join(path, s["file"]), dtype=m["dtype"],
                                         mode="r") for s in info["shards"]]
                       for split, info in m["splits"].items()}

    def sequences(self, split, seq_len):
        return Sequences(self.shards.get(split, []), seq_len)


def _check_file(path, checksum, size, verify):
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (listed in manifest.json)")
    if size is not None and os.path.getsize(path) != size:
        raise UserError(f"{path}: {os.path.getsize(path)} bytes, manifest.json says {size} "
                        "(a truncated copy?)")
    if verify and prepare.sha256(path) != checksum:
        raise UserError(f"{path}: checksum differs from manifest.json")


class Sequences:
    """Windows of seq_len + 1 tokens, stride seq_len, over a list of token shards."""

    def __init__(self, shards, seq_len):
        self.shards, self.seq_len = shards, seq_len
        counts = [max(0, (len(s) - 1) // seq_len) for s in shards]
        self.starts = np.cumsum([0] + counts)  # first sequence id of each shard
        self.n = int(self.starts[-1])

    def fetch(self, ids):
        """int32 [len(ids), seq_len + 1]: the windows of sequence ids."""
        ids = np.asarray(ids, dtype=np.int64)
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        first = (ids - self.starts[shard]) * self.seq_len
        return np.stack([self.shards[s][o:o + self.seq_len + 1]
                         for s, o in zip(shard, first)]).astype(np.int32)


def rows(first_row, step, rank, size, batch_size):
    """The partition: global rows that rank `rank` of `size` reads at micro-batch `step`."""
    return first_row + step * batch_size * size + rank * batch_size + np.arange(batch_size)


def sequence_ids(rows_, n, seed):
    """Rows -> sequence ids: within epoch e = row // n, a stateless shuffle seeded (seed, e)."""
    import tensorflow as tf
    rows_ = tf.cast(rows_, tf.int64)
    seeds = tf.stack([tf.fill(tf.shape(rows_), tf.cast(seed, tf.int64)), rows_ // n,
                      tf.zeros_like(rows_)], axis=-1)
    # The raw op: tf.random.experimental.index_shuffle mangles a batch of seeds (TF 2.21).
    return tf.raw_ops.RandomIndexShuffle(index=rows_ % n, seed=seeds,
                                         max_index=tf.constant(n - 1, tf.int64))


def dataset(seqs, batch_size, seed, first_row, steps, rank, size, accum=1):
    """This rank's next `steps` training steps of `accum` micro-batches each,
    int32 [accum, batch_size, seq_len + 1]."""
    import tensorflow as tf
    if seqs.n < 1:
        raise UserError(f"the training split holds no sequence of 'data.seq_len'+1="
                        f"{seqs.seq_len + 1} tokens")
    shape = [batch_size, seqs.seq_len + 1]

    def ids_of_step(step):  # step: an int64 tensor; rows() works on it as on an int
        return sequence_ids(rows(first_row, step, rank, size, batch_size), seqs.n, seed)

    def fetch(ids):
        return tf.ensure_shape(tf.numpy_function(seqs.fetch, [ids], tf.int32), shape)

    ds = tf.data.Dataset.range(steps * accum).map(ids_of_step)
    ds = ds.map(fetch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(accum, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def validation_batches(seqs, batch_size, count, rank, size):
    """This rank's part of the first `count` global batches of the validation split, in order
    (no shuffle; wrapping around a split smaller than count global batches)."""
    if seqs.n < 1:
        return []
    return [seqs.fetch(rows(0, i, rank, size, batch_size) % seqs.n) for i in range(count)]


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
    g = processes * batch_size
    steps = -(-seqs.n // g)
    print(f"epoch at seq_len {seq_len}: {seqs.n:,} sequences; {processes} process(es) x "
          f"batch {batch_size} = {g} per step -> {steps:,} steps, {steps * batch_size:,} "
          f"sequences per process (the last step runs into the next epoch; no process reads "
          f"more than another)", file=out)
    sp = tokenizer.load(data.tokenizer_path)
    first = data.shards["train"][0]
    starts = np.fromfile(os.path.join(path, m["splits"]["train"]["shards"][0]["index"]),
                         dtype=np.uint64)
    for i in range(min(samples, len(starts))):
        end = int(starts[i + 1]) if i + 1 < len(starts) else len(first)
        text = sp.decode([int(t) for t in first[int(starts[i]):end]])
        print(f"sample {i}: {text[:200]!r}", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="full tracebacks on bad input")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="corpora -> token shards + tokenizer + manifest")
    p.add_argument("--input", nargs="+", required=True, help=".txt, .jsonl[.gz], .parquet")
    p.add_argument("--output", required=True, help="a new directory")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="use this sentencepiece model (e.g. LLaMA's)")
    tok.add_argument("--vocab-size", type=int, default=32000, help="train one of this size")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes on this host")
    p.add_argument("--min-chars", type=int, default=1, help="drop shorter cleaned documents")
    p.add_argument("--val-fraction", type=float, default=0.005, help="documents held out")
    p.add_argument("--no-progress", action="store_true")
    i = sub.add_parser("inspect", help="totals, shards, the split over processes, samples")
    i.add_argument("dir")
    i.add_argument("--seq-len", type=int, default=2048)
    i.add_argument("--processes", type=int, default=1)
    i.add_argument("--batch-size", type=int, default=1, help="sequences per process per step")
    i.add_argument("--samples", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            m = prepare.prepare(args.input, args.output, args.tokenizer, args.vocab_size,
                                args.text_field, max(1, args.workers), args.min_chars,
                                args.val_fraction, progress=not args.no_progress,
                                launched=launched())
            if m is None:  # not rank 0 of a launched prepare
                return 0
            c = m["cleaning"]
            print(f"{args.output}: {m['splits']['train']['documents']:,} train + "
                  f"{m['splits']['val']['documents']:,} val documents, "
                  f"{m['splits']['train']['tokens']:,} + {m['splits']['val']['tokens']:,} "
                  f"tokens; read {c.get('documents', 0):,}, dropped {c.get('too_short', 0):,} "
                  f"too short and {c.get('duplicates', 0):,} duplicates, skipped "
                  f"{c.get('bad_records', 0):,} bad records and {c.get('bad_utf8_bytes', 0):,} "
                  f"undecodable bytes"
                  + (f" (first bad record: {c['first_bad_record']})"
                     if "first_bad_record" in c else ""))
        else:
            inspect(args.dir, args.seq_len, args.processes, args.batch_size, args.samples)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
