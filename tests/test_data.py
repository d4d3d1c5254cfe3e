"""prepare / inspect / the per-rank pipeline: counts, partition, resume, and bad input."""

import gzip
import json
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import HOROVODRUN, MICRO, REPO, WORKER, run, train_cli
from hvd_llama import corpus, data, prepare, shards, tokenizer
from hvd_llama.errors import UserError
from hvd_llama.layout import Layout

DOCS = [f"Document {i} is about topic {i % 7}, and it has {i * 37 % 101} words in it."
        for i in range(240)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every input kind, with every flaw prepare must count: a duplicate (once only after NFC),
    control characters, a too-short document, bad JSON lines, a null parquet row, bad bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path_factory.mktemp("inputs")
    (d / "a.txt").write_text("\n\n".join(DOCS[:80] + ["Caf\u00e9 cr\u00e8me", "x"]))
    with open(d / "b.jsonl", "w") as f:
        for doc in DOCS[80:160]:
            f.write(json.dumps({"text": doc}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"body": "no text field"}) + "\n")
        f.write(json.dumps({"text": "Cafe\u0301 cr\u00e8me\x07"}) + "\n")  # NFC + BEL: a dup
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        for doc in DOCS[160:200]:
            f.write(json.dumps({"text": doc}) + "\n")
    pq.write_table(pa.table({"text": DOCS[200:240] + [None]}), d / "d.parquet")
    (d / "e.txt").write_bytes(b"bytes \xff\xfe that are not UTF-8 " + DOCS[0][:5].encode())
    return d


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared") / "ds")
    manifest = prepare.prepare([str(inputs / "*")], out, vocab_size=320, workers=2,
                               min_chars=2, val_fraction=0.1)
    return out, manifest


def test_cleaning_report_counts_every_rule(prepared, inputs):
    _, m = prepared
    c = m["cleaning"]
    assert c["documents"] == 240 + 2 + 1 + 1  # DOCS, "Café crème", "x", the NFC twin, e.txt
    assert c["too_short"] == 1  # "x"
    assert c["duplicates"] == 1  # the NFC twin of "Café crème"
    assert c["bad_records"] == 3  # "{not json", the missing field, the null parquet row
    assert c["first_bad_record"] == f"{inputs / 'b.jsonl'}:81"
    assert c["bad_utf8_bytes"] == 2
    assert c["kept"] == 242
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 242
    assert m["splits"]["val"]["documents"] > 0 and m["dtype"] == "uint16"


def test_token_count_equals_tokenizing_the_clean_documents(prepared, inputs):
    out, m = prepared
    sp = tokenizer.load(os.path.join(out, "tokenizer.model"), 320)
    kept = DOCS[:80] + ["Caf\u00e9 cr\u00e8me"] + DOCS[80:240] + ["bytes  that are not UTF-8 Docum"]
    assert [corpus.clean(d) for d in kept] == kept
    expected = sum(len(ids) + 2 for ids in sp.encode(kept))  # + <s> and </s>
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == expected
    first = m["splits"]["train"]["shards"][0]
    tokens = np.fromfile(os.path.join(out, first["file"]), dtype=np.uint16)
    starts = np.fromfile(os.path.join(out, first["index"]), dtype=np.uint64)
    assert len(starts) == first["documents"] and tokens[0] == tokenizer.BOS_ID
    assert all(tokens[int(s)] == tokenizer.BOS_ID for s in starts)
    assert all(tokens[int(s) - 1] == tokenizer.EOS_ID for s in starts[1:])


def test_given_tokenizer_is_used_as_is(prepared, inputs, tmp_path):
    out, m = prepared
    again = prepare.prepare([str(inputs / "*.jsonl")], str(tmp_path / "again"),
                            tokenizer_model=os.path.join(out, "tokenizer.model"))
    assert again["tokenizer"]["sha256"] == m["tokenizer"]["sha256"]
    assert again["vocab_size"] == 320


def test_epoch_partition_reads_every_sequence_once():
    n, b = 101, 3
    for size in (1, 2, 3, 4):
        g = b * size
        steps = -(-n // g)
        got = []
        for step in range(steps):
            per_rank = [Layout(size, 1, r, 1, b, 16).rows(0, step, 0) for r in range(size)]
            assert all(len(x) == b for x in per_rank)  # no imbalance
            got.extend(np.concatenate(per_rank))
        epoch0 = [r for r in got if r < n]
        ids = data.sequence_ids(np.array(epoch0), n, seed=3).numpy()
        assert sorted(ids) == list(range(n)), size
    # The next epoch is another permutation of the same sequences.
    e0 = data.sequence_ids(np.arange(n), n, seed=3).numpy()
    e1 = data.sequence_ids(np.arange(n, 2 * n), n, seed=3).numpy()
    assert sorted(e1) == list(range(n)) and not np.array_equal(e0, e1)


def test_resumed_pipeline_reads_what_an_uninterrupted_one_would(prepared):
    out, _ = prepared
    seqs = shards.Prepared(out).sequences("train", 16)
    layout = Layout(1, 1, 0, 1, 2, 16)
    whole = list(data.dataset(seqs, layout, seed=1, first_row=0, steps=9))
    resumed = list(data.dataset(seqs, layout, seed=1, first_row=layout.position(0, 5), steps=4))
    for a, b in zip(whole[5:], resumed):
        assert np.array_equal(a, b)
    assert whole[0].shape == (1, 2, 17) and whole[0].dtype == np.int32


def test_an_accumulated_step_reads_the_same_global_batch(prepared):
    """k micro-batches of b hold, in order, the one batch of k*b of the same step."""
    out, _ = prepared
    seqs = shards.Prepared(out).sequences("train", 16)
    micro = list(data.dataset(seqs, Layout(1, 1, 0, 3, 2, 16), seed=1, first_row=0, steps=4))
    whole = list(data.dataset(seqs, Layout(1, 1, 0, 1, 6, 16), seed=1, first_row=0, steps=4))
    assert micro[0].shape == (3, 2, 17)
    for m, w in zip(micro, whole):
        assert np.array_equal(m.numpy().reshape(6, 17), w[0])


def test_validation_batches_come_from_the_val_split(prepared):
    out, _ = prepared
    ds = shards.Prepared(out)
    val = ds.sequences("val", 16)
    batches = data.validation_batches(val, Layout(2, 1, 1, 1, 2, 16), count=3)
    assert len(batches) == 3
    assert np.array_equal(batches[0], val.fetch(np.array([2, 3]) % val.n))


class _Ids:
    """Sequences whose windows are their own ids: to see which rows a reader takes."""
    n, seq_len = 1000, 1

    def fetch(self, ids):
        return np.asarray(ids)


@pytest.mark.parametrize("processes, devices, accum", [(1, 1, 1), (2, 1, 4), (2, 2, 2)])
def test_eval_batches_counts_global_batches_in_every_layout(processes, devices, accum):
    """train.eval_batches=3 at global batch 8: the processes read validation rows 0..23 between
    them, each once, in micro-batches of d*b, whatever the layout."""
    read = []
    for rank in range(processes):
        layout = Layout(processes, devices, rank, accum, 8 // (processes * devices * accum), 16)
        batches = data.validation_batches(_Ids(), layout, count=3)
        assert len(batches) == 3 * accum and all(len(b) == layout.process_batch for b in batches)
        read.extend(np.concatenate(batches))
    assert sorted(read) == list(range(24))


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_two_ranks_read_disjoint_halves_of_the_one_process_batch(prepared, tmp_path,
                                                                 controller):
    out, _ = prepared
    run([HOROVODRUN, "-np", "2", "-H", "localhost:2", f"--{controller}", sys.executable,
         WORKER, "data", str(tmp_path), out])
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    seqs = shards.Prepared(out).sequences("train", 16)
    one = np.stack([b[0] for b in data.dataset(seqs, Layout(1, 1, 0, 1, 4, 16), seed=5,
                                               first_row=0, steps=8)])
    assert np.array_equal(np.concatenate([r0, r1], axis=1), one)


def test_launched_prepare_matches_one_process(prepared, inputs, tmp_path):
    """Under horovodrun each rank prepares every other input file; rank 0 writes the manifest."""
    out, m = prepared
    dest = str(tmp_path / "mp")
    run([HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
         "hvd_llama.data", "prepare", "--input", str(inputs / "*"), "--output", dest,
         "--tokenizer", os.path.join(out, "tokenizer.model"), "--min-chars", "2",
         "--val-fraction", "0.1", "--workers", "1", "--no-progress"])
    with open(os.path.join(dest, "manifest.json")) as f:
        mp = json.load(f)
    assert mp["cleaning"] == m["cleaning"]
    assert mp["splits"] == m["splits"]  # same shards, same checksums


def test_inspect_prints_the_split(prepared):
    out, m = prepared
    proc = run([sys.executable, "-m", "hvd_llama.data", "inspect", out, "--seq-len", "16",
                "--processes", "3", "--batch-size", "2"])
    n = shards.Prepared(out).sequences("train", 16).n
    assert f"{n:,} sequences; 3 process(es) x batch 2 = 6 per step" in proc.stdout
    assert f"{m['splits']['train']['tokens']:,} tokens" in proc.stdout
    assert "sample 0: 'Document 0 is about topic 0" in proc.stdout


def cli(*args):
    return run([sys.executable, "-m", "hvd_llama.data", *args], check=False)


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_prepare_input(prepared, inputs, tmp_path):
    out, _ = prepared
    one_line_error(cli("prepare", "--input", str(tmp_path / "*.none"), "--output",
                       str(tmp_path / "o")), "*.none", "matches no file")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    one_line_error(cli("prepare", "--input", str(tmp_path / "empty.txt"), "--output",
                       str(tmp_path / "o")), "no documents left")
    assert not os.path.exists(tmp_path / "o")
    before = sorted(os.listdir(out))
    one_line_error(cli("prepare", "--input", str(inputs / "a.txt"), "--output", out),
                   out, "already exists")
    assert sorted(os.listdir(out)) == before
    # A tokenizer that cannot be trained: prepare fails and leaves nothing behind.
    one_line_error(cli("prepare", "--input", str(inputs / "a.txt"), "--output",
                       str(tmp_path / "o2"), "--vocab-size", "60000", "--no-progress"),
                   "--vocab-size 60000", "Please set it to a value <=")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o2")]


def test_interrupted_or_damaged_dataset_is_refused(prepared, tmp_path):
    out, m = prepared
    partial = tmp_path / "ds.partial-99"  # what a killed prepare leaves
    shutil.copytree(out, partial)
    os.remove(partial / "manifest.json")
    with pytest.raises(UserError, match="not a prepared dataset"):
        shards.Prepared(str(partial))
    shard = m["splits"]["train"]["shards"][0]["file"]
    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    with open(truncated / shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=f"{shard}: 100 bytes, manifest.json says"):
        shards.Prepared(str(truncated))
    flipped = tmp_path / "flipped"
    shutil.copytree(out, flipped)
    with open(flipped / shard, "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(UserError, match=f"{shard}: checksum differs"):
        shards.Prepared(str(flipped))
    shards.Prepared(str(flipped), verify=False)  # data.verify=false skips the hashing


def test_train_refuses_a_dataset_of_another_vocab_or_damaged(prepared, tmp_path):
    out, m = prepared
    proc = train_cli(f"data.path={out}", f"run.dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and out in last and "'model.vocab_size' is 8000" in last
    assert not os.path.exists(tmp_path / "r" / "checkpoints")


def test_prepared_dataset_trains(prepared, tmp_path):
    out, _ = prepared
    run_dir = tmp_path / "r"
    train_cli(f"data.path={out}", f"run.dir={run_dir}", "model.vocab_size=320",
              "data.seq_len=16", "train.steps=3", "train.eval_every=3", config=MICRO)
    with open(run_dir / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    assert last["step"] == 3 and "val_loss" in last
    with open(run_dir / "tokenizer.model", "rb") as a, \
            open(os.path.join(out, "tokenizer.model"), "rb") as b:
        assert a.read() == b.read()


def test_repo_root_is_importable():
    assert os.path.isdir(os.path.join(REPO, "hvd_llama"))
