"""Horovod's own API on Keras 3 (docker/horovod/keras3-*.patch), under horovodrun -np 2 with
each controller: what Horovod scripts written for tf.keras call, on Keras 3 objects."""

import json
import os
import re
import sys

import numpy as np
import pytest

from conftest import CONTROLLERS, REPO, arrays, horovodrun, run

WORKER = os.path.join(REPO, "tests", "hvd_keras_worker.py")


@pytest.fixture(scope="module", params=CONTROLLERS)
def ranks_out(request, tmp_path_factory):
    """One run of every part of the worker per controller: what each rank wrote."""
    out = tmp_path_factory.mktemp(f"hvd-keras-{request.param}")
    horovodrun(request.param, [WORKER, str(out)])
    return out


def test_gradient_tape_and_broadcast_take_keras_3_variables(ranks_out):
    """broadcast_variables gives every rank rank 0's weights; DistributedGradientTape averages
    the gradients of Keras 3 variables (without and with `groups`, where both kernels share a
    name) to those of the whole batch in one process, and leaves a registered local source's
    gradient unreduced: each rank's own, scaled by 1/size (Horovod's scale_local_gradients)."""
    import tensorflow as tf
    import hvd_keras_worker as worker
    ranks = [dict(np.load(ranks_out / f"tape-rank{r}.npz")) for r in range(2)]
    model, local = worker.model_and_local(seed=0)
    x, y = worker.data()
    with tf.GradientTape() as t:
        loss = worker.loss_of(model, local, x, y)
    whole = [g.numpy() for g in t.gradient(loss, model.trainable_variables)]
    halves = []
    for rows in (worker.halves(2, 0), worker.halves(2, 1)):
        with tf.GradientTape() as t:
            loss = worker.loss_of(model, local, x[rows], y[rows])
        halves.append(t.gradient(loss, local).numpy())
    for r, got in enumerate(ranks):
        for i, v in enumerate(model.variables):
            np.testing.assert_array_equal(got[f"weight{i}"], v.numpy())
        for name in ("plain", "groups"):
            for i, g in enumerate(whole):
                np.testing.assert_allclose(got[f"{name}{i}"], g, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got[f"{name}{len(whole)}"], halves[r] / 2, rtol=1e-6)
    assert not np.allclose(halves[0], halves[1])  # so the local gradients were not averaged


def test_sync_batch_normalization_is_batch_normalization_of_the_global_batch(ranks_out):
    """hvd.SyncBatchNormalization on Keras 3, two ranks on 3 and 5 rows of a batch: each rank's
    outputs are its rows of Keras's BatchNormalization over the whole batch in one process, and
    the moving statistics are that one's (each rank weighs by its rows, also where a mask
    leaves some out, all of one rank's among them); two such layers live in one model."""
    import keras
    import hvd_keras_worker as worker
    x, _ = worker.data()
    outputs, moving = worker.normalized(
        [keras.layers.BatchNormalization(momentum=0.5) for _ in range(3)], x, worker.mask())
    for r in range(2):
        got = arrays(ranks_out / f"syncbn-rank{r}.npz")
        for g, want in zip(got[:2], outputs):
            np.testing.assert_allclose(g, want[worker.uneven(r)], rtol=1e-4, atol=1e-5)
        for g, want in zip(got[2:], moving):
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


def fit_in_one_process(lrs, epochs):
    """The worker's fit as one process over both ranks' halves, batch by batch (rank 0's
    initial weights), with the learning rate lrs[step] at each step: its epoch losses and the
    weights after each epoch."""
    import keras
    import hvd_keras_worker as worker
    x, y = worker.fit_data()
    half = worker.FIT_ROWS // 2
    # Global batch s: rank 0's batch s, then rank 1's (4 rows each).
    order = np.concatenate([np.r_[s:s + 4, half + s:half + s + 4] for s in range(0, half, 4)])
    model = worker.fit_model(seed=0)
    model.compile(optimizer=keras.optimizers.SGD(worker.LR, momentum=0.9), loss="mse")
    weights, step = [], iter(lrs)

    def set_lr(batch, logs):
        model.optimizer.learning_rate = next(step)
    history = model.fit(x[order], y[order], batch_size=8, epochs=epochs, shuffle=False,
                        verbose=0, callbacks=[keras.callbacks.LambdaCallback(
                            on_train_batch_begin=set_lr,
                            on_epoch_end=lambda e, logs: weights.append(
                                [w.numpy() for w in model.weights]))])
    return np.array(history.history["loss"]), weights


def documented_lrs(size, steps_per_epoch):
    """LearningRateWarmupCallback's documented rate, lr / size * ((size - 1) / warmup * epoch
    + 1), epoch counted to the end of the batch, over the warmup epochs; then
    LearningRateScheduleCallback's initial_lr * multiplier ** (epoch - start_epoch)."""
    import hvd_keras_worker as w
    lrs = []
    for epoch in range(w.EPOCHS):
        for batch in range(steps_per_epoch):
            if epoch < w.WARMUP_EPOCHS:
                done = epoch + (batch + 1) / steps_per_epoch
                lrs.append(w.LR / size * ((size - 1) / w.WARMUP_EPOCHS * done + 1))
            else:
                lrs.append(w.LR * w.DECAY ** (epoch - w.WARMUP_EPOCHS))
    return lrs


def test_fit_with_distributed_optimizer_and_callbacks_is_one_process_fit(ranks_out):
    """horovod.tensorflow.keras on Keras 3: model.fit on two ranks (each initialised its own
    model) with hvd.DistributedOptimizer and the broadcast and metric-average callbacks gives
    the losses and weights of fit in one process on the global batch; the warmup and schedule
    callbacks set their documented learning rates; BestModelCheckpoint on rank 0 saves the
    best epoch's model, which loads without Horovod, and with hvd.load_model as a model whose
    optimizer allreduces (a step on each rank's own rows leaves the same weights). Then a
    LossScaleOptimizer with backward_passes_per_step=2 over half-size batches: the same run,
    with `iterations` counting updates."""
    import keras
    import hvd_keras_worker as worker
    steps = worker.FIT_ROWS // 2 // 4
    lrs = documented_lrs(size=2, steps_per_epoch=steps)
    assert lrs[0] < lrs[steps] < lrs[2 * steps] == worker.LR > lrs[-1]  # warms up, decays
    want = {"a": fit_in_one_process(lrs, worker.EPOCHS),
            "b": fit_in_one_process([worker.LR] * len(lrs), worker.EPOCHS)}
    ranks = [dict(np.load(ranks_out / f"fit-rank{r}.npz")) for r in range(2)]
    for got in ranks:
        np.testing.assert_allclose(got["a_lr"], lrs, rtol=1e-6)
        np.testing.assert_allclose(got["b_lr"], worker.LR, rtol=1e-6)
        for part, (losses, weights) in want.items():
            np.testing.assert_allclose(got[f"{part}_loss"], losses, rtol=1e-5)
            for e, epoch_weights in enumerate(weights):
                for i, w in enumerate(epoch_weights):
                    np.testing.assert_allclose(got[f"{part}_epoch{e}_weight{i}"], w,
                                               rtol=1e-5, atol=1e-6)
        assert got["a_iterations"] == got["b_iterations"] == worker.EPOCHS * steps
    losses, weights = want["a"]
    best = keras.saving.load_model(ranks_out / "best.keras")
    assert type(best.optimizer) is keras.optimizers.SGD
    for got, w in zip(best.weights, weights[int(np.argmin(losses))]):
        np.testing.assert_allclose(got.numpy(), w, rtol=1e-5, atol=1e-6)
    for got in ranks:
        assert "horovod._keras" in got["loaded_class"]
    stepped = [[r[k] for k in sorted(r) if k.startswith("loaded_weight")] for r in ranks]
    for w0, w1 in zip(*stepped):
        np.testing.assert_allclose(w0, w1, rtol=1e-6)


def test_elastic_keras_state_commits_restores_and_syncs(ranks_out):
    """hvd.elastic.KerasState on Keras 3: made before any step, it holds the optimizer's slots;
    restore() brings back the model and optimizer state of the last commit(), and sync() gives
    every rank rank 0's; the commit and state callbacks track a fit's epochs and commit at
    each epoch's end."""
    ranks = [dict(np.load(ranks_out / f"elastic-rank{r}.npz")) for r in range(2)]
    n = int(ranks[0]["optimizer_variables"])
    assert n == 2 + 2 * 4  # Adam: iterations, learning rate, two moments per weight
    count = len([k for k in ranks[0] if k.startswith("committed")])
    for got in ranks:
        assert got["restored_batch"] == 3 and got["synced_batch"] == 3
        assert got["fit_epoch"] == 2 and got["fit_batch"] == 0
        for i in range(count):
            np.testing.assert_array_equal(got[f"restored{i}"], got[f"committed{i}"])
            np.testing.assert_array_equal(got[f"synced{i}"], ranks[0][f"before_sync{i}"])
            np.testing.assert_array_equal(got[f"fit_restored{i}"], got[f"fitted{i}"])
    assert not np.array_equal(ranks[1]["before_sync0"], ranks[0]["before_sync0"])


def test_horovod_keras_api_refuses_what_it_cannot_take_in_one_line(ranks_out):
    """tf_keras (Keras 2) objects where tf.keras is Keras 3, a second wrap, Keras's own
    gradient accumulation, BestModelCheckpoint without a path, a LossScaleOptimizer around a
    DistributedOptimizer (whose ranks would hang on an overflow): one clear error each."""
    want = {
        "tf_keras optimizer": ("TypeError", "tf_keras.src.optimizers", "TF_USE_LEGACY_KERAS=1"),
        "tf_keras model in fit": ("TypeError", "tf_keras.src.engine", "tf.keras is Keras 3"),
        "tf_keras model in KerasState": ("TypeError", "tf_keras.src.engine", "Keras 3"),
        "wrapped twice": ("ValueError", "already a DistributedOptimizer"),
        "gradient_accumulation_steps": ("ValueError", "backward_passes_per_step=2"),
        "BestModelCheckpoint without a path": ("ValueError", "filepath=", ".keras"),
        "LossScaleOptimizer around it": ("ValueError", "wrap the LossScaleOptimizer instead",
                                         "auto_scale_loss=False"),
    }
    for r in range(2):
        raised = json.loads((ranks_out / f"refusals-rank{r}.json").read_text())
        assert raised.keys() == want.keys()
        for case, fragments in want.items():
            assert "\n" not in raised[case] and raised[case].startswith(fragments[0] + ": ")
            for fragment in fragments[1:]:
                assert fragment in raised[case], (case, raised[case])


def test_tf_keras_2_path_still_works_under_legacy_keras(tmp_path):
    """Under TF_USE_LEGACY_KERAS=1 (tf.keras is tf_keras, Keras 2), one process: Horovod's
    tf.keras 2 DistributedOptimizer and callbacks still fit as tf_keras does without them,
    and a Keras 3 optimizer is refused in one line."""
    run([sys.executable, WORKER, str(tmp_path), "legacy"], env={"TF_USE_LEGACY_KERAS": "1"})
    result = json.loads((tmp_path / "legacy.json").read_text())
    assert result["keras 3 optimizer"].startswith(
        "TypeError: Horovod: the optimizer is a keras.src.optimizers")
    assert "tf.keras is Keras 2 here" in result["keras 3 optimizer"]
    got, want = result["horovod"], result["plain"]
    assert got["type"].startswith("tf_keras.") and got["lr"] == want["lr"]
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    for g, w in zip(got["weights"], want["weights"]):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_readme_example_runs_as_written(tmp_path):
    """docs/examples/horovod_keras3.py, the README's Horovod Keras script, under horovodrun
    -np 2: it learns its task, warms the learning rate up as it says, and rank 0 reloads its
    best model (SyncBatchNormalization in it) with hvd.load_model."""
    best = tmp_path / "best.keras"
    proc = horovodrun("gloo", [os.path.join(REPO, "docs", "examples", "horovod_keras3.py"),
                               str(best)])
    out = proc.stdout + proc.stderr
    assert "finished gradual learning rate warmup to 0.02" in out
    fitted = re.search(r"<stdout>:accuracy ([\d.]+) over 2 processes", out)
    reloaded = re.search(r"<stdout>:best model reloaded: accuracy ([\d.]+)", out)
    assert float(fitted[1]) > 0.9 and float(reloaded[1]) > 0.9, out[-3000:]
    assert best.stat().st_size > 0
