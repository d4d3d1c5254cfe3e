"""dist.zero 1 and 2: sharded optimizer state (and gradients) train exactly like stage 0.

The reference is conftest.one_process: one plain process at global batch 8, clipping active at
every step. The ZeRO runs are 2 processes under horovodrun, with Gloo and with MPI, with 1
and 2 micro-batches, one of them hybrid (2 logical CPU devices per process); the checkpoint
chain goes 0 (1 process) -> 2 (2) -> 1 (2) -> 0 (1).
"""

import json
import os
import sys

import numpy as np
import pytest

from conftest import (MICRO, WORKER, arrays, assert_one_line_error, assert_trains_like,
                      horovodrun, rel_err, run, stopped_after_step_2, train_args, train_cli)

HYBRID = ["dist.strategy=hybrid", "dist.logical_cpus=2"]


def report(out, rank):
    with open(os.path.join(out, f"rank{rank}-copies.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("stage, controller, accum, extra", [(1, "gloo", 1, []),
                                                             (2, "mpi", 2, HYBRID)])
def test_zero_trains_like_one_process_and_holds_half_the_optimizer_state(
        one_process, tmp_path, cache_dir, stage, controller, accum, extra):
    out = str(tmp_path)
    horovodrun(controller, train_args(out, cache_dir, f"dist.zero={stage}",
                                      f"train.grad_accum={accum}", *extra))
    assert_trains_like(out, one_process)
    for a, b in zip(arrays(os.path.join(out, "rank0.npz")),
                    arrays(os.path.join(out, "rank1.npz")), strict=True):
        assert np.array_equal(a, b)
    whole = report(one_process, 0)["optimizer_bytes"]
    shares = [report(out, rank)["optimizer_bytes"] for rank in (0, 1)]
    assert sum(shares) == whole + 4  # the moments split; each rank counts its own step
    assert max(shares) < 0.51 * whole  # half each, to a row of each tensor
    assert report(out, 1)["copies"] == (2 if extra else 1)
    assert report(out, 1)["spread"] == 0.0


def test_a_checkpoint_resumes_at_every_stage_strategy_and_process_count(
        one_process, tmp_path, cache_dir):
    """One run, a step under each layout in turn, each resuming the last one's checkpoint:
    the reference's first 2 steps (1 process, stage 0), step 3 hybrid at stage 2 (Gloo, 2
    processes x 2 devices), step 4 horovod at stage 1 (MPI, 2 processes, 2 micro-batches),
    step 5 mirrored (1 process x 2 devices, 2 micro-batches). It ends where the uninterrupted
    run ends. The sharded step-4 checkpoint also exports and converts."""
    from hvd_llama import checkpoint
    out = stopped_after_step_2(one_process, str(tmp_path))
    horovodrun("gloo", train_args(out, cache_dir, *HYBRID, "dist.zero=2", "train.resume=true",
                                  steps=3))
    horovodrun("mpi", train_args(out, cache_dir, "dist.zero=1", "train.grad_accum=2",
                                 "train.resume=true", steps=4))
    step4 = os.path.join(out, "run", "checkpoints", "step-00000004")
    assert checkpoint.read_meta(step4)["layout"] == {"processes": 2, "zero": 1}
    assert sorted(n for n in os.listdir(step4) if "data" in n) == [
        "state.data-00000-of-00002", "state.data-00001-of-00002"]  # one per process

    # export, convert export-hf: the weights of the sharded checkpoint, read whole.
    exported = _exported_logits(out)
    run([sys.executable, "-m", "hvd_llama.convert", "export-hf", os.path.join(out, "run"),
         str(tmp_path / "hf")])
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
    _, model, path = checkpoint.load_latest(os.path.join(out, "run"))
    assert path == step4
    reference = checkpoint.load_latest(_stopped_at_step_4(one_process, tmp_path))[1]
    for a, b in zip(model.weights, reference.weights, strict=True):
        assert rel_err(a.numpy(), b.numpy()) < 1e-5
    np.testing.assert_allclose(exported, _logits(model), rtol=1e-4, atol=1e-5)

    run([sys.executable, *train_args(out, cache_dir, "dist.strategy=mirrored",
                                     "dist.logical_cpus=2", "train.grad_accum=2",
                                     "train.resume=true")])
    assert_trains_like(out, one_process)


TOKENS = np.random.default_rng(0).integers(0, 8000, (2, 16)).astype(np.int32)


def _logits(model):
    return model({"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS)}).numpy()


def _exported_logits(out):
    import tensorflow as tf
    target = os.path.join(out, "export")
    run([sys.executable, "-m", "hvd_llama.export", os.path.join(out, "run"), "--output", target])
    served = tf.saved_model.load(os.path.join(target, "1"))
    return served.signatures["serving_default"](
        token_ids=tf.constant(TOKENS), padding_mask=tf.ones_like(TOKENS))["logits"].numpy()


def _stopped_at_step_4(reference, tmp_path):
    """A run dir whose latest checkpoint is the reference's step 4 (stage 0, 1 process)."""
    import shutil
    run_dir = tmp_path / "ref4"
    shutil.copytree(os.path.join(reference, "run"), run_dir,
                    ignore=shutil.ignore_patterns("step-00000005", "saved_model*"))
    return str(run_dir)


def test_float16_overflow_in_one_ranks_share_skips_the_step_on_every_rank(tmp_path):
    out = str(tmp_path)
    horovodrun("gloo", [WORKER, "zero_overflow", out])
    ranks = []
    for rank in (0, 1):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    for stage in ("zero1", "zero2"):
        for r in ranks:
            assert not r[stage]["changed"]  # skipped: rank 1's share was finite
            assert r[stage]["scale"][1] == r[stage]["scale"][0] / 2
            assert r[stage]["iterations"] == 0
            assert r[stage]["then_changed"]  # the next, finite step is applied
        assert ranks[0][stage]["then_weights"] == ranks[1][stage]["then_weights"]


def test_a_truncated_or_missing_shard_is_named_and_nothing_changes(
        one_process, tmp_path, cache_dir):
    """Refused before any weight is built, naming the file; no checkpoint is deleted."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.join(one_process, "run"), run_dir)
    latest = run_dir / "checkpoints" / "step-00000005"
    data = latest / "state.data-00000-of-00001"
    written = data.read_bytes()
    data.write_bytes(written[:1000])
    before = sorted(os.listdir(run_dir / "checkpoints"))
    args = [f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "train.resume=true",
            "train.steps=6"]
    assert_one_line_error(train_cli(*args, config=MICRO, check=False), str(data), "truncated")
    data.write_bytes(written)
    os.remove(latest / "state.index")
    assert_one_line_error(train_cli(*args, config=MICRO, check=False),
                          str(latest / "state.index"), "missing")
    assert sorted(os.listdir(run_dir / "checkpoints")) == before
