"""Horovod's own API on Keras 3 (docker/horovod/keras3-*.patch), under horovodrun -np 2 with
each controller: what Horovod scripts written for tf.keras call, on Keras 3 objects."""

import os

import numpy as np
import pytest

from conftest import CONTROLLERS, REPO, arrays, horovodrun

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
    x, y = worker.batch()
    with tf.GradientTape() as t:
        loss = worker.loss_of(model, local, x, y)
    whole = [g.numpy() for g in t.gradient(loss, model.trainable_variables)]
    halves = []
    for rows in (slice(0, 4), slice(4, 8)):
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
    """hvd.SyncBatchNormalization on Keras 3, two ranks on half a batch each: each rank's
    outputs are its rows of Keras's BatchNormalization over the whole batch in one process, and
    the moving statistics are that one's; two such layers live in one model."""
    import keras
    import hvd_keras_worker as worker
    x, _ = worker.batch()
    outputs, moving = worker.normalized(
        [keras.layers.BatchNormalization(momentum=0.5) for _ in range(2)], x)
    for r in range(2):
        got = arrays(ranks_out / f"syncbn-rank{r}.npz")
        np.testing.assert_allclose(got[0], outputs[worker.halves(2, r)], rtol=1e-4, atol=1e-5)
        for g, want in zip(got[1:], moving):
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
