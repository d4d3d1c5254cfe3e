"""Text in, per-rank batches of packed token sequences out.

    corpus (.txt) --tokenizer--> one uint16 token stream, documents joined with EOS
    token stream --(seq_len + 1)-token windows--> sequences 0..N-1
    step s --> global rows s*G .. s*G+G-1 (G = global batch) --> this rank's b rows

Row j of the endless stream is sequence perm_e(j mod N) of epoch e = j // N, where perm_e is a
stateless shuffle seeded by (train.seed, e). The global batch of step s therefore holds the same
sequences whatever the number of processes, and rank r reads only rows [r*b, (r+1)*b) of it.
Nothing depends on history, so a resumed run reads exactly what an uninterrupted one would.
"""

import ast
import hashlib
import os
import sys
import sysconfig

import numpy as np
import tensorflow as tf

from hvd_llama import distributed as dist
from hvd_llama.atomic import atomic_path, write_bytes
from hvd_llama import tokenizer
from hvd_llama.errors import UserError


def builtin_corpus():
    """Paragraphs of the standard library's docstrings: real English prose, shipped with
    every Python, no download and no third-party text committed. Read with `ast`, never
    imported (importing some stdlib modules has side effects)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "idlelib", "site-packages", "dist-packages", "lib2to3", "tkinter"}
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        docs.extend(p.strip() for p in doc.split("\n\n") if len(p.strip()) >= 40)
    return docs


def read_documents(path):
    """A UTF-8 text file whose documents are separated by blank lines."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read corpus ({e})") from e
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise UserError(f"{path}: corpus holds no documents")
    return docs


def prepare(data_config, vocab_size):
    """Token stream and tokenizer for the configured corpus, built once and cached.

    Returns (tokens: np.uint16 [T], tokenizer path). One process per host builds (local rank 0)
    while the others wait; every file is written under a temporary name and renamed, so a crash
    or a second builder on a shared filesystem never leaves a half-written file behind.
    """
    cache = os.path.expanduser(data_config.cache_dir)
    if data_config.corpus == "builtin":
        name = f"builtin-py{sys.version_info.major}.{sys.version_info.minor}"
        corpus_path = os.path.join(cache, "corpus", name + ".txt")
    else:
        corpus_path = os.path.expanduser(data_config.corpus)
    if dist.local_rank() == 0:
        if data_config.corpus == "builtin" and not os.path.exists(corpus_path):
            write_bytes(corpus_path, "\n\n".join(builtin_corpus()).encode())
        tok_path, tokens_path = _cached_paths(cache, corpus_path, vocab_size)
        if not os.path.exists(tok_path):
            os.makedirs(os.path.dirname(tok_path), exist_ok=True)
            tokenizer.train(corpus_path, tok_path, vocab_size)
        if not os.path.exists(tokens_path):
            sp = tokenizer.load(tok_path, vocab_size)
            ids = []
            for doc_ids in sp.encode(read_documents(corpus_path)):
                ids.extend(doc_ids)
                ids.append(tokenizer.EOS_ID)
            with atomic_path(tokens_path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.asarray(ids, dtype=np.uint16))
    dist.barrier()
    tok_path, tokens_path = _cached_paths(cache, corpus_path, vocab_size)
    tokenizer.load(tok_path, vocab_size)  # vocab agreement, checked on every rank
    return np.load(tokens_path, mmap_mode="r"), tok_path


def _cached_paths(cache, corpus_path, vocab_size):
    """Tokenizer and token-stream files, named by the corpus content and the vocab size."""
    key = f"{_sha256(corpus_path)[:16]}-v{vocab_size}"
    return (os.path.join(cache, "tokenizers", key + ".model"),
            os.path.join(cache, "tokens", key + ".npy"))


def num_sequences(tokens, seq_len):
    """How many (seq_len + 1)-token windows the stream holds (inputs plus shifted targets)."""
    return (len(tokens) - 1) // seq_len


def dataset(tokens, seq_len, batch_size, seed, first_row, steps):
    """This rank's next `steps` batches, int32 [batch_size, seq_len + 1], starting at global row
    `first_row` (the sequences consumed so far, which a checkpoint records)."""
    n = num_sequences(tokens, seq_len)
    if n < 1:
        raise UserError(f"corpus has {len(tokens)} tokens, fewer than one sequence of "
                        f"'data.seq_len'={seq_len}")
    stream = tf.constant(np.asarray(tokens, dtype=np.int32))
    global_batch = batch_size * dist.size()
    offset = dist.rank() * batch_size
    window = tf.range(seq_len + 1, dtype=tf.int64)

    def rows_of_step(step):
        rows = first_row + step * global_batch + offset + tf.range(batch_size, dtype=tf.int64)
        epoch = rows // n
        # One stateless permutation per epoch, seeded (train.seed, epoch, 0). The raw op, since
        # tf.random.experimental.index_shuffle mangles a batch of seeds (TF 2.21).
        seeds = tf.stack([tf.fill([batch_size], tf.cast(seed, tf.int64)), epoch,
                          tf.zeros([batch_size], tf.int64)], axis=1)
        seq = tf.raw_ops.RandomIndexShuffle(index=rows % n, seed=seeds,
                                            max_index=tf.cast(n - 1, tf.int64))
        return tf.gather(stream, seq[:, None] * seq_len + window[None, :])

    ds = tf.data.Dataset.range(steps).map(rows_of_step)
    return ds.prefetch(tf.data.AUTOTUNE)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
