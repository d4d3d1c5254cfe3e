"""Raw corpora -> a prepared dataset directory of token shards (shards.py: the format).

    python -m hvd_llama.prepare --input PATH_OR_GLOB... --output DIR [options]
    horovodrun -np 4 -H a:2,b:2 python -m hvd_llama.prepare ...  # ranks split the input files

(`python -m hvd_llama.data prepare ...` is the same command.)

Stages: clean (per input file, in parallel) -> deduplicate (exact, first copy in input order
wins) -> split off the validation documents (chosen by hash, so stable) -> train the tokenizer
on a bounded sample (or take a given one) -> tokenize (per file, in parallel) -> manifest.
Everything goes to DIR.partial-*, renamed to DIR at the very end, so an interrupted prepare
never leaves a directory that looks complete.

Under mpirun/horovodrun each rank takes every size-th input file; rank 0 trains the tokenizer
and writes the manifest. The output must then be on a filesystem all ranks share.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter

from hvd_llama import cli, corpus, shards, tokenizer
from hvd_llama.atomic import refused_as_user_error, remove, remove_stale
from hvd_llama.errors import UserError

SAMPLE_BYTES = 200 << 20  # text the tokenizer is trained on, at most


class _Solo:
    """Collectives for one process (also: one host preparing the built-in corpus alone)."""
    rank, size = 0, 1

    def allgather(self, obj):
        return [obj]

    def broadcast(self, obj):
        return obj


class _Launched:
    """Collectives across the ranks of an mpirun/horovodrun job, through distributed.py."""

    def __init__(self):
        cli.import_tensorflow()
        from hvd_llama import distributed, replicas
        distributed.init()
        replicas.setup(None, distributed.local_rank(), distributed.local_size())
        self.d = distributed
        self.rank, self.size = distributed.rank(), distributed.size()

    def allgather(self, obj):
        return self.d.allgather_object(obj)

    def broadcast(self, obj):
        return self.d.broadcast_object(obj)


def prepare(inputs, output, tokenizer_model=None, vocab_size=32000, text_field="text",
            workers=1, min_chars=1, val_fraction=0.005, progress=False, launched=False):
    """Prepare `inputs` (paths/globs) into `output`; returns the manifest (None on ranks > 0)."""
    comm = _Launched() if launched else _Solo()
    output = os.path.abspath(output)
    files = corpus.expand(inputs)
    if os.path.exists(output):
        raise UserError(f"--output {output}: already exists (holds another dataset?); "
                        "choose a new directory")
    if tokenizer_model is not None:
        tokenizer.load(tokenizer_model)  # readable, before any work
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    work = comm.broadcast(f"{output}.partial-{os.getpid()}")
    with refused_as_user_error(output):  # a full or read-only disk: one line, nothing left
        if comm.rank == 0:
            remove_stale(output)  # an earlier prepare's, killed mid-way
            os.makedirs(work)
        comm.allgather(None)  # the directory exists before anyone writes into it
        try:
            manifest = _prepare(comm, files, work, tokenizer_model, vocab_size, text_field,
                                workers, min_chars, val_fraction, progress)
            if comm.rank == 0:
                os.replace(work, output)
            comm.allgather(None)
            return manifest
        except BaseException:
            if comm.rank == 0:
                remove(work)
            raise


def _prepare(comm, files, work, tokenizer_model, vocab_size, text_field, workers, min_chars,
             val_fraction, progress):
    t0 = time.perf_counter()
    mine = list(range(comm.rank, len(files), comm.size))

    # 1. Clean each file into work/clean-N.jsonl, in parallel; gather every file's hashes.
    jobs = [(i, files[i], text_field, min_chars, work) for i in mine]
    cleaned = comm.allgather(_map(_clean_file, jobs, workers, progress and comm.rank == 0,
                                  "clean", count=lambda r: (r[2]["documents"], 0)))
    cleaned = sorted((r for rank_results in cleaned for r in rank_results), key=lambda r: r[0])
    stats = Counter()
    for _, _, file_stats, _ in cleaned:
        _merge(stats, file_stats)

    # 2. Exact deduplication and the validation split, decided alike on every rank.
    keep, is_val = _deduplicate_and_split(cleaned, val_fraction, stats, len(files))

    # 3. The tokenizer: given, or trained by rank 0 on a bounded sample of the kept documents.
    tok_path = os.path.join(work, shards.TOKENIZER)
    if comm.rank == 0:
        if tokenizer_model:
            shutil.copyfile(tokenizer_model, tok_path)
        else:
            _train_tokenizer(work, [r[0] for r in cleaned], keep, is_val,
                             sum(r[3] for r in cleaned), vocab_size)
    comm.allgather(None)
    vocab = tokenizer.load(tok_path).vocab_size()
    dtype = shards.token_dtype(vocab)

    # 4. Tokenize each file's kept documents into its train and val shards, in parallel.
    jobs = [(i, work, tok_path, keep[i], is_val[i], dtype) for i in mine]
    mine_shards = _map(_tokenize_file, jobs, workers, progress and comm.rank == 0, "tokenize",
                       count=lambda shards: (sum(s["documents"] for s in shards),
                                             sum(s["tokens"] for s in shards)))
    for index in mine:
        os.remove(_clean_path(work, index))
    # Also the point after which no rank touches `work` again: rank 0 may then rename it.
    written = sorted((s for rank_shards in comm.allgather(mine_shards)
                      for file_shards in rank_shards for s in file_shards),
                     key=lambda s: s["file"])

    # 5. The manifest, last.
    splits = _splits(written)
    if comm.rank != 0:
        return None  # rank 0 alone writes the manifest, then renames `work`
    manifest = {
        "dtype": dtype, "vocab_size": vocab,
        "bos_id": tokenizer.BOS_ID, "eos_id": tokenizer.EOS_ID,
        "tokenizer": {"file": shards.TOKENIZER, "sha256": shards.sha256(tok_path)},
        "splits": splits, "inputs": files, "cleaning": dict(stats),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    shards.write_manifest(work, manifest)
    return {"format": shards.FORMAT, **manifest}


def _deduplicate_and_split(cleaned, val_fraction, stats, files):
    """(keep, is_val): per input file index, a flag per document. The first copy of a text in
    input order is kept; a document goes to validation by its hash, so the choice is stable."""
    seen, keep, is_val = set(), {}, {}
    for index, hashes, _, _ in cleaned:
        keep[index] = [h not in seen and not seen.add(h) for h in hashes]
        is_val[index] = [int(h[:8], 16) / 16 ** 8 < val_fraction for h in hashes]
    stats["duplicates"] = sum(len(k) - sum(k) for k in keep.values())
    stats["kept"] = sum(sum(k) for k in keep.values())
    if stats["kept"] == 0:
        raise UserError(f"no documents left to prepare from {files} input file(s) "
                        f"(read {stats['documents']}, too short {stats['too_short']}, "
                        f"bad records {stats['bad_records']})")
    return keep, is_val


def _splits(written):
    """The manifest's splits: each split's shards (written, sorted by name) and totals."""
    splits = {}
    for split in ("train", "val"):
        listed = [s for s in written if s["file"].startswith(split)]
        splits[split] = {"shards": listed, "tokens": sum(s["tokens"] for s in listed),
                         "documents": sum(s["documents"] for s in listed)}
    if splits["train"]["tokens"] == 0:
        raise UserError("every kept document went to the validation split; lower --val-fraction")
    return splits


def _map(fn, jobs, workers, progress, what, count):
    """fn over jobs, in a pool of `workers` processes when > 1, with a progress bar if asked;
    count(result) -> (documents, tokens) feeds the bar."""
    bar = None
    if progress:
        from tqdm import tqdm
        # disable=None: no bar when stderr is not a terminal (batch logs, CI).
        bar = tqdm(total=len(jobs), unit="file", desc=what, dynamic_ncols=True, disable=None)
    results, docs, tokens, t0 = [], 0, 0, time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for result in (pool.imap(fn, jobs) if pool else map(fn, jobs)):
            results.append(result)
            if bar:
                d, t = count(result)
                docs, tokens = docs + d, tokens + t
                rate = tokens / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(docs=docs, **({"tokens/s": f"{rate:,.0f}"} if tokens else {}))
                bar.update()
    finally:
        if pool:
            pool.close()
        if bar:
            bar.close()
    return results


def _clean_file(job):
    index, path, text_field, min_chars, work = job
    stats, hashes = Counter(), []
    with open(_clean_path(work, index), "w") as out:
        for raw in corpus.read(path, text_field, stats):
            stats["documents"] += 1
            doc = corpus.clean(raw)
            if len(doc) < min_chars:
                stats["too_short"] += 1
                continue
            hashes.append(corpus.digest(doc))
            out.write(json.dumps(doc) + "\n")
    return index, hashes, stats, os.path.getsize(path)


def _tokenize_file(job):
    index, work, tok_path, keep, is_val, dtype = job
    sp = tokenizer.load(tok_path)
    docs = {"train": [], "val": []}
    with open(_clean_path(work, index)) as f:
        for line, k, v in zip(f, keep, is_val):
            if k:
                docs["val" if v else "train"].append(json.loads(line))
    return [shards.write_shard(work, f"{split}-{index:05d}",
                               [[tokenizer.BOS_ID, *d, tokenizer.EOS_ID] for d in sp.encode(texts)],
                               dtype)
            for split, texts in docs.items() if texts]


def _train_tokenizer(work, indices, keep, is_val, input_bytes, vocab_size):
    """Train on every k-th kept training document, k chosen to stay under SAMPLE_BYTES."""
    stride = max(1, -(-input_bytes // SAMPLE_BYTES))
    sample = os.path.join(work, "tokenizer-sample.txt")
    with open(sample, "w") as out:
        n = 0
        for index in indices:
            with open(_clean_path(work, index)) as f:
                for line, k, v in zip(f, keep[index], is_val[index]):
                    if k and not v:
                        if n % stride == 0:
                            out.write(json.loads(line) + "\n")
                        n += 1
    try:
        tokenizer.train(sample, os.path.join(work, shards.TOKENIZER), vocab_size)
    except UserError as e:  # name the flag the user can change, not our temporary file
        raise UserError(f"--vocab-size {vocab_size}: {e}") from e
    os.remove(sample)


def _clean_path(work, index):
    return os.path.join(work, f"clean-{index:05d}.jsonl")


def _merge(total, stats):
    for key, value in stats.items():
        if key.startswith("first_"):
            total.setdefault(key, value)
        else:
            total[key] += value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".txt, .jsonl[.gz], .parquet")
    parser.add_argument("--output", required=True, help="a new directory")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="use this sentencepiece model (e.g. LLaMA's)")
    tok.add_argument("--vocab-size", type=cli.at_least(1), default=32000,
                     help="train one of this size")
    parser.add_argument("--text-field", default="text", help="JSONL field / parquet column")
    parser.add_argument("--workers", type=cli.at_least(1), default=os.cpu_count(),
                        help="processes on this host")
    parser.add_argument("--min-chars", type=cli.at_least(1), default=1,
                        help="drop shorter cleaned documents")
    parser.add_argument("--val-fraction", type=float, default=0.005, help="documents held out")
    parser.add_argument("--no-progress", action="store_true")
    return cli.main(parser, _run, argv)


def _run(args):
    from hvd_llama.launcher import launched
    m = prepare(args.input, args.output, args.tokenizer, args.vocab_size, args.text_field,
                max(1, args.workers), args.min_chars, args.val_fraction,
                progress=not args.no_progress, launched=launched())
    if m is None:  # not rank 0 of a launched prepare
        return
    c, splits = m["cleaning"], m["splits"]
    print(f"{args.output}: {splits['train']['documents']:,} train + "
          f"{splits['val']['documents']:,} val documents, "
          f"{splits['train']['tokens']:,} + {splits['val']['tokens']:,} "
          f"tokens; read {c.get('documents', 0):,}, dropped {c.get('too_short', 0):,} "
          f"too short and {c.get('duplicates', 0):,} duplicates, skipped "
          f"{c.get('bad_records', 0):,} bad records and {c.get('bad_utf8_bytes', 0):,} "
          f"undecodable bytes"
          + (f" (first bad record: {c['first_bad_record']})" if "first_bad_record" in c else ""))


if __name__ == "__main__":
    sys.exit(main())
