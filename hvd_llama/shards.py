"""The on-disk format of a prepared dataset: prepare.py writes it, data.py reads it.

    DIR/tokenizer.model
    DIR/train-00000.bin  tokens (uint16 if the vocab fits, else uint32): <s> doc </s> <s> doc </s>
    DIR/train-00000.idx  uint64 start offset of every document in the .bin
    DIR/val-00000.bin/.idx  the validation split
    DIR/manifest.json    format, dtype, vocab, every shard with its token/document counts and
                         sha256, the tokenizer's sha256, the cleaning report; written last

A reader trusts nothing it has not checked: a missing manifest means an interrupted prepare,
and every listed file must exist with the size the manifest gives (and, when asked, its hash).
Sequences are windows of seq_len + 1 tokens over a split's shards, memory-mapped, never loaded.
"""

import hashlib
import json
import os

import numpy as np

from hvd_llama.errors import UserError, read_json

FORMAT = "hvd_llama.tokens/1"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def token_dtype(vocab_size):
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_shard(directory, name, documents, dtype):
    """Write token lists `documents` as shard `name` (.bin tokens, .idx document offsets) in
    `directory`; returns its manifest entry."""
    starts = np.cumsum([0] + [len(d) for d in documents[:-1]], dtype=np.uint64)
    np.concatenate([np.asarray(d, dtype=dtype) for d in documents]).tofile(
        os.path.join(directory, name + ".bin"))
    starts.tofile(os.path.join(directory, name + ".idx"))
    return {"file": name + ".bin", "index": name + ".idx",
            "tokens": sum(len(d) for d in documents), "documents": len(documents),
            "sha256": sha256(os.path.join(directory, name + ".bin")),
            "index_sha256": sha256(os.path.join(directory, name + ".idx"))}


def write_manifest(directory, manifest):
    """manifest.json, complete or absent (it is what marks the directory as finished)."""
    tmp = os.path.join(directory, MANIFEST + ".partial")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, **manifest}, f, indent=1)
    os.replace(tmp, os.path.join(directory, MANIFEST))


class Prepared:
    """A prepared dataset directory, checked against its manifest."""

    def __init__(self, path, vocab_size=None, verify=True):
        self.path = path
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isdir(path):
            raise UserError(f"{path}: no such dataset directory")
        if not os.path.isfile(manifest_path):
            raise UserError(f"{path}: not a prepared dataset (no {MANIFEST}; "
                            "an interrupted prepare?)")
        self.manifest = m = read_json(manifest_path, "manifest")
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise UserError(f"{manifest_path}: not a {FORMAT} manifest")
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

    def document_starts(self, split, shard):
        """uint64 offsets of the documents of shard number `shard` of `split`."""
        entry = self.manifest["splits"][split]["shards"][shard]
        return np.fromfile(os.path.join(self.path, entry["index"]), dtype=np.uint64)


def _check_file(path, checksum, size, verify):
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (listed in {MANIFEST})")
    if size is not None and os.path.getsize(path) != size:
        raise UserError(f"{path}: {os.path.getsize(path)} bytes, {MANIFEST} says {size} "
                        "(a truncated copy?)")
    if verify and sha256(path) != checksum:
        raise UserError(f"{path}: checksum differs from {MANIFEST}")


class Sequences:
    """Windows of seq_len + 1 tokens, stride seq_len, over a list of token shards; the windows
    of all shards, in manifest order, are sequences 0..n-1."""

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
