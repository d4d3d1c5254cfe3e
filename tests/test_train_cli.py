"""`python -m hvd_llama.train` end to end, as one process: train, checkpoint, export, resume,
and every kind of bad input."""

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import assert_one_line_error, run, train_cli


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def snapshot(run_dir):
    """Every file under run_dir with its content hash: to show nothing was touched."""
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, short):
    run_dir = str(tmp_path_factory.mktemp("cli") / "run")
    proc = train_cli(f"run.dir={run_dir}", *short)
    return run_dir, proc.stdout


def test_train_leaves_a_complete_run_dir(trained):
    run_dir, stdout = trained
    m = metrics(run_dir)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_sec"] > 0 for r in m)
    assert m[-1]["loss"] < m[0]["loss"] - 0.3, "loss did not fall"
    assert "global batch: 4 sequences = 1,024 tokens = 1 process(es)" in stdout
    progress = [line for line in stdout.splitlines() if line.startswith("step 6/6 | loss ")]
    assert len(progress) == 1
    for field in ("| ppl ", "| lr ", "| gnorm ", " tok/s | MFU ", "% | ETA 0:00:00",
                  "| val_loss "):
        assert field in progress[0], field
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [
        "step-00000003", "step-00000006"]
    for name in ("config.yaml", "tokenizer.model", "saved_model/1/saved_model.pb"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert not [n for n in os.listdir(run_dir) if ".partial" in n or ".old" in n]


def test_tensorboard_holds_the_progress_scalars(trained):
    import tensorflow as tf
    run_dir, _ = trained
    tags = set()
    tb = os.path.join(run_dir, "tensorboard")
    for name in os.listdir(tb):
        for record in tf.data.TFRecordDataset(os.path.join(tb, name)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags.update(v.tag for v in event.summary.value)
    assert {"loss", "perplexity", "learning_rate", "grad_norm", "tokens_per_sec", "mfu",
            "eta_sec", "val_loss", "val_perplexity"} <= tags


def test_resume_continues_exactly_like_an_uninterrupted_run(trained, tmp_path, short):
    run_dir, _ = trained
    crashed = str(tmp_path / "crashed")  # as if the job died right after step 3's checkpoint
    shutil.copytree(run_dir, crashed)
    shutil.rmtree(os.path.join(crashed, "checkpoints", "step-00000006"))
    shutil.rmtree(os.path.join(crashed, "saved_model"))
    shutil.rmtree(os.path.join(crashed, "saved_model_text"))
    full = metrics(run_dir)
    with open(os.path.join(crashed, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in full[:3])

    # A save that died midway leaves only a .partial directory: it must never be resumed from.
    partial = os.path.join(crashed, "checkpoints", "step-00000006.partial-4242")
    os.makedirs(partial)
    with open(os.path.join(partial, "meta.json"), "w") as f:
        f.write('{"step": 6, "trunc')

    proc = train_cli(f"run.dir={crashed}", *short, "train.resume=true")
    assert "steps 4..6" in proc.stdout
    resumed = metrics(crashed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in resumed[3:]],
                               [r["loss"] for r in full[3:]], rtol=1e-6)
    assert os.path.isfile(os.path.join(crashed, "saved_model", "1", "saved_model.pb"))


@pytest.mark.parametrize("args, fragment", [
    (["train.bogus=1"], "train.bogus"),
    (["train.steps=many"], "train.steps"),
    (["train.global_batch=0"], "train.global_batch"),
    (["data.path=/no/such/dataset"], "/no/such/dataset"),
])
def test_bad_config_is_one_line(args, fragment):
    proc = train_cli(*args, check=False)
    assert_one_line_error(proc, fragment)
    assert proc.stderr.strip().count("\n") == 0  # nothing else: refused before TF loads


def test_missing_config_file_and_debug_traceback():
    proc = run([sys.executable, "-m", "hvd_llama.train", "--config", "/no/such.yaml"],
               check=False)
    assert_one_line_error(proc, "/no/such.yaml")
    proc = run([sys.executable, "-m", "hvd_llama.train", "--config", "/no/such.yaml", "--debug"],
               check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("args, fragments", [
    (["train.resume=true", "model.num_layers=2"], ["step-00000006", "model.num_layers"]),
    (["train.resume=true", "data.seq_len=128"], ["step-00000006", "data.seq_len"]),
    ([], ["already holds checkpoints", "train.resume=true"]),  # a fresh run over old work
])
def test_run_dir_of_another_run_is_refused_and_untouched(trained, tmp_path, short, args,
                                                         fragments):
    run_dir, _ = trained
    other = str(tmp_path / "other")
    shutil.copytree(run_dir, other)
    before = snapshot(other)
    proc = train_cli(f"run.dir={other}", *short, *args, check=False)
    assert_one_line_error(proc, *fragments)
    assert snapshot(other) == before


def test_corrupt_checkpoint_metadata_is_named(trained, tmp_path, short):
    """Every checkpoint's metadata unreadable: the newest is named, nothing changes (one
    damaged checkpoint is passed over for the one before: test_zero.py)."""
    run_dir, _ = trained
    other = str(tmp_path / "other")
    shutil.copytree(run_dir, other)
    metas = [os.path.join(other, "checkpoints", f"step-0000000{s}", "meta.json") for s in (3, 6)]
    for meta in metas:
        with open(meta, "w") as f:
            f.write("{not json")
    before = snapshot(other)
    proc = train_cli(f"run.dir={other}", *short, "train.resume=true", check=False)
    assert_one_line_error(proc, "no checkpoint in", "is whole; the newest: " + metas[1])
    assert f"passing over checkpoint {os.path.dirname(metas[0])}" in proc.stdout
    assert snapshot(other) == before
