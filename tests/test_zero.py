"""dist.zero 1, 2 and 3: sharded optimizer state (and gradients, and weights) train exactly
like stage 0.

The reference is conftest.one_process: one plain process at global batch 8, clipping active at
every step. The ZeRO runs are 2 processes under horovodrun, with Gloo and with MPI, with 1
and 2 micro-batches; the checkpoint chain goes stage 0 (1 process) -> 2 (hybrid, 2 x 2
devices) -> 1 (2) -> 0 (mirrored, 1 x 2).
"""

import json
import math
import os
import sys

import numpy as np
import pytest

from conftest import (MICRO, WORKER, arrays, assert_trains_like, horovodrun, rel_err, run,
                      stopped_after_step_2, train_args, train_cli)

HYBRID = ["dist.strategy=hybrid", "dist.logical_cpus=2"]


def report(out, rank):
    with open(os.path.join(out, f"rank{rank}-copies.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("stage, controller, accum", [(1, "gloo", 1), (2, "mpi", 2)])
def test_zero_trains_like_one_process_and_holds_half_the_optimizer_state(
        one_process, tmp_path, cache_dir, stage, controller, accum):
    out = str(tmp_path)
    horovodrun(controller, train_args(out, cache_dir, f"dist.zero={stage}",
                                      f"train.grad_accum={accum}"))
    assert_trains_like(out, one_process)
    for a, b in zip(arrays(os.path.join(out, "rank0.npz")),
                    arrays(os.path.join(out, "rank1.npz")), strict=True):
        assert np.array_equal(a, b)
    whole = report(one_process, 0)["optimizer_bytes"]
    shares = [report(out, rank)["optimizer_bytes"] for rank in (0, 1)]
    assert sum(shares) == whole + 4  # the moments split; each rank counts its own step
    assert max(shares) < 0.51 * whole  # half each, to a row of each tensor


def test_zero3_trains_like_one_process_holding_half_the_weights(one_process, tmp_path,
                                                                cache_dir):
    """Stage 3 from scratch (Gloo, one micro-batch, no remat): the reference's losses and
    weights, with half the weights and optimizer state on each rank; its export, written from
    the last checkpoint, serves those weights."""
    out = str(tmp_path)
    horovodrun("gloo", train_args(out, cache_dir, "dist.zero=3", "train.export=true"))
    assert_trains_like(out, one_process)
    whole = report(one_process, 0)
    for key in ("weight_bytes", "optimizer_bytes"):
        shares = [report(out, rank)[key] for rank in (0, 1)]
        assert sum(shares) == whole[key] + (4 if key == "optimizer_bytes" else 0)
        assert max(shares) < 0.51 * whole[key]
    import tensorflow as tf
    served = tf.saved_model.load(os.path.join(out, "run", "saved_model", "1"))
    logits = served.signatures["serving_default"](
        token_ids=tf.constant(TOKENS), padding_mask=tf.ones_like(TOKENS))["logits"].numpy()
    from hvd_llama import checkpoint
    reference = checkpoint.load_latest(os.path.join(one_process, "run"))[1]
    np.testing.assert_allclose(logits, _logits(reference), rtol=1e-4, atol=1e-5)


def test_zero3_resumes_stage_0_and_resumes_in_one_process(one_process, tmp_path, cache_dir):
    """The reference's step-2 checkpoint resumed at stage 3 (MPI, two micro-batches, remat,
    no prefetch) for steps 3-4; its step-4 checkpoint, one share file per process, exports,
    converts and resumes at stage 0 in one process for step 5, which ends where the reference
    ends."""
    from hvd_llama import checkpoint
    out = stopped_after_step_2(one_process, str(tmp_path))
    horovodrun("mpi", train_args(out, cache_dir, "dist.zero=3", "train.grad_accum=2",
                                 "train.remat=true", "dist.prefetch=false",
                                 "train.resume=true", steps=4))
    run_dir = os.path.join(out, "run")
    step4 = os.path.join(run_dir, "checkpoints", "step-00000004")
    assert checkpoint.read_meta(step4)["layout"] == {"processes": 2, "zero": 3}
    exported = _exported_logits(out)
    run([sys.executable, "-m", "hvd_llama.convert", "export-hf", run_dir, str(tmp_path / "hf")])
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
    reference = checkpoint.load_latest(_stopped_at_step_4(one_process, tmp_path))[1]
    for a, b in zip(checkpoint.load_latest(run_dir)[1].weights, reference.weights, strict=True):
        assert rel_err(a.numpy(), b.numpy()) < 1e-5
    np.testing.assert_allclose(exported, _logits(reference), rtol=1e-4, atol=1e-5)
    run([sys.executable, *train_args(out, cache_dir, "train.resume=true")])
    assert_trains_like(out, one_process)


def test_a_checkpoint_resumes_at_every_stage_strategy_and_process_count(
        one_process, tmp_path, cache_dir):
    """One run, a step under each layout in turn, each resuming the last one's checkpoint:
    the reference's first 2 steps (1 process, stage 0), step 3 hybrid at stage 2 (MPI, 2
    processes x 2 devices), step 4 horovod at stage 1 (Gloo, 2 processes, 2 micro-batches),
    step 5 mirrored (1 process x 2 devices, 2 micro-batches). It ends where the uninterrupted
    run ends. The sharded step-4 checkpoint also exports and converts."""
    from hvd_llama import checkpoint
    out = stopped_after_step_2(one_process, str(tmp_path))
    horovodrun("mpi", train_args(out, cache_dir, *HYBRID, "dist.zero=2", "train.resume=true",
                                 steps=3))
    assert [report(out, rank)["copies"] for rank in (0, 1)] == [2, 2]  # devices per process
    assert report(out, 1)["spread"] == 0.0
    horovodrun("gloo", train_args(out, cache_dir, "dist.zero=1", "train.grad_accum=2",
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


def test_an_overflow_or_nan_in_one_ranks_share_skips_the_step_on_every_rank(tmp_path):
    """float16 at stages 1 and 2: an Inf in rank 0's share alone skips the step and halves the
    scale on both ranks; the next step (clipped) gives stage 0's weights. The float16 training
    step at stages 2 and 3 skips and applies as stage 0's does (stage 2 all-gathering one
    tensor at a time), and so does the bfloat16 one at stage 3, with remat and prefetch, where
    rank 1 holds none of a one-row weight. float32 at stage 1: a NaN in rank 0's share alone
    skips the step on both. Shares of uneven size (97 rows)."""
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
        for a, b in zip(arrays(os.path.join(out, f"{stage}-rank0.npz")),
                        arrays(os.path.join(out, f"{stage}-rank1.npz")), strict=True):
            assert np.array_equal(a, b)
    for rank in (0, 1):
        for a, b in zip(arrays(os.path.join(out, f"zero1-rank{rank}.npz")),
                        arrays(os.path.join(out, f"zero0-rank{rank}.npz")), strict=True):
            assert rel_err(a, b) < 1e-6
    assert [r["nan"] for r in ranks] == [{"changed": False, "norm": "nan"}] * 2
    # The float16 training step, stage 2 streaming and stage 3 gathering against stage 0: the
    # same overflow skip (step 2's loss is step 1's: nothing applied), the same scales, then
    # the same updates. bfloat16 at stage 3 against stage 0: the same steps.
    for stage, reference in (("stream2", "stream0"), ("stream3", "stream0"),
                             ("bf16-3", "bf16-0")):
        for r in ranks:
            if stage.startswith("stream"):
                (loss1, norm1, scale1), (loss2, _, scale2), _ = r[stage]
                assert math.isnan(norm1) and scale1 == 2.0 ** 39 and loss2 == loss1
                assert scale2 == 1024
            np.testing.assert_allclose(r[stage], r[reference], rtol=1e-6)
        for rank in (0, 1):
            for a, b in zip(arrays(os.path.join(out, f"{stage}-rank{rank}.npz")),
                            arrays(os.path.join(out, f"{reference}-rank{rank}.npz")),
                            strict=True):
                assert rel_err(a, b) < 1e-5


def test_shares_split_rows_as_horovods_reduce_scatter_does():
    from hvd_llama.layout import Layout
    for processes in (1, 2, 3, 4):
        for dim0 in range(10):
            rows = [Layout(processes, 1, r, 1, 1, 8).share(dim0) for r in range(processes)]
            assert [a for a, _ in rows] == [0] + [b for _, b in rows[:-1]]  # contiguous
            assert rows[-1][1] == dim0
            sizes = [b - a for a, b in rows]
            assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1


def test_gathers_group_by_bytes_and_a_held_gradient_waits_for_its_ops():
    """ShardedOptimizer's all-gather groups: consecutive tensors up to the byte limit, a
    larger one alone. held_until: the gradient passed on runs after the given ops (the layer
    above's reduce-scatter), and is dx itself when there are none."""
    import tensorflow as tf
    from hvd_llama import zero
    assert zero._groups([4, 4, 4, 10, 1], 8) == [[0, 1], [2], [3], [4]]
    assert zero._groups([1, 1], 0) == [[0], [1]]
    assert zero._groups([], 8) == []
    with tf.Graph().as_default():
        v = tf.Variable(0.0)
        done = v.assign_add(1.0, read_value=False)
        dx = tf.constant(2.0)
        assert done in zero.held_until(dx, [done]).op.control_inputs
        assert zero.held_until(dx, None) is dx and zero.held_until(None, [done]) is None


def test_layer_order_chains_layers_traced_in_the_same_graph_only():
    """LayerOrder: a layer's input gradient waits for the reduce-scatter of the layer traced
    before it, and the prefetch takes the input of the layer traced before, in the same graph;
    the first layer traced in another graph waits for nothing."""
    import tensorflow as tf
    from hvd_llama import zero
    order = zero.LayerOrder()
    with tf.Graph().as_default():
        x1, x2 = tf.constant(1.0), tf.constant(2.0)
        assert order.swap_input(x1) is None and order.swap_input(x2) is x1
        scattered = [tf.constant(3.0)]
        dx = tf.constant(4.0)
        assert order.hold(dx, scattered) is dx  # the top layer: nothing above
        assert scattered[0].op in order.hold(tf.constant(5.0), [tf.constant(6.0)]).op \
            .control_inputs
    with tf.Graph().as_default():
        dx, x = tf.constant(7.0), tf.constant(8.0)
        assert order.hold(dx, [dx]) is dx and order.swap_input(x) is None


def test_a_checkpoint_written_by_three_processes_reads_into_two(tmp_path):
    """The tensor bundle re-shards: three writers' rows of a 97-row tensor (33 + 32 + 32),
    merged, read back as two processes' shares (49 + 48) and whole."""
    import keras
    import tensorflow as tf
    from hvd_llama import checkpoint
    from hvd_llama.layout import Layout
    whole = np.arange(97 * 3, dtype=np.float32).reshape(97, 3)
    for rank in range(3):
        checkpoint._write(str(tmp_path / f"rank-{rank:05d}"),
                          [("t", keras.Variable(whole), 0, (97, 3))], Layout(3, 1, rank, 1, 1, 8))
    tf.raw_ops.MergeV2Checkpoints(
        checkpoint_prefixes=[str(tmp_path / f"rank-{r:05d}") for r in range(3)],
        destination_prefix=str(tmp_path / checkpoint.STATE), delete_old_dirs=False)
    for rank in range(2):
        a, b = Layout(2, 1, rank, 1, 1, 8).share(97)
        share = keras.Variable(np.zeros([b - a, 3], np.float32))
        checkpoint._read(str(tmp_path), [("t", share, a, (97, 3))])
        np.testing.assert_array_equal(share.numpy(), whole[a:b])
    read = keras.Variable(np.zeros([97, 3], np.float32))
    checkpoint._read(str(tmp_path), [("t", read, 0, (97, 3))])
    np.testing.assert_array_equal(read.numpy(), whole)


def test_a_truncated_or_missing_shard_is_named_and_passed_over(
        one_process, tmp_path, cache_dir):
    """The newest checkpoint's data truncated, the one before it without its index: the
    resume names both, in a line each, before any weight is built, and continues from the
    whole one before them (export names the file: test_bad_input.py)."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.join(one_process, "run"), run_dir)
    step5, step4 = (run_dir / "checkpoints" / f"step-0000000{s}" for s in (5, 4))
    data = step5 / "state.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    os.remove(step4 / "state.index")
    proc = train_cli(f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "train.resume=true",
                     "train.steps=6", "train.eval_every=0", "train.export=false", config=MICRO)
    assert f"passing over checkpoint {step5}: {data}: checkpoint file is 1000 bytes" in \
        proc.stdout
    assert f"passing over checkpoint {step4}: {step4 / 'state.index'}: checkpoint file " \
        "missing" in proc.stdout
    assert "this run: steps 3..6" in proc.stdout
    assert sorted(n.split(".")[0] for n in os.listdir(run_dir / "checkpoints")
                  if ".damaged-" in n) == ["step-00000004", "step-00000005"]
