"""Horovod's own TensorFlow API on Keras 3 objects (the project's patched build), run under
`horovodrun -np 2` as `python tests/hvd_keras_worker.py OUT`; each rank writes what it
computed in each part to OUT/<part>-rank<r>.npz:

    tape
        broadcast_variables of a Keras 3 model's variables from rank 0 (each rank initialised
        its own), then DistributedGradientTape over them (two Dense layers: both kernels are
        named "kernel") without and with `groups`, with a Keras variable registered as a local
        source; each rank takes its half of one batch
    syncbn
        hvd.SyncBatchNormalization in training on each rank's half of one batch, in a model
        with two of them (Keras 3 wants its layers' names unique): the outputs and the moving
        statistics
"""

import os
import sys

import numpy as np

ROWS = 8


def batch():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((ROWS, 3)).astype("float32"),
            rng.standard_normal((ROWS, 1)).astype("float32"))


def model_and_local(seed):
    """A two-layer model initialised from `seed`, and a variable outside it."""
    import keras
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    return model, keras.Variable(np.full((3,), 0.5, np.float32), name="local")


def loss_of(model, local, x, y):
    import tensorflow as tf
    prediction = model(x) + tf.reduce_sum(local * x, axis=1, keepdims=True)
    return tf.reduce_mean((prediction - y) ** 2)


def tape(out):
    import horovod.tensorflow as hvd
    import tensorflow as tf
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    model, local = model_and_local(seed=rank)
    hvd.broadcast_variables(model.variables, root_rank=0)
    x, y = batch()
    rows = halves(size, rank)
    arrays = {f"weight{i}": v.numpy() for i, v in enumerate(model.variables)}
    for name, groups in (("plain", None), ("groups", [model.trainable_variables])):
        with tf.GradientTape() as t:
            loss = loss_of(model, local, x[rows], y[rows])
        t = hvd.DistributedGradientTape(t, groups=groups)
        t.register_local_source(local)
        grads = t.gradient(loss, [*model.trainable_variables, local])
        arrays.update({f"{name}{i}": g.numpy() for i, g in enumerate(grads)})
    np.savez(os.path.join(out, f"tape-rank{rank}.npz"), **arrays)


def halves(size, rank):
    return slice(rank * ROWS // size, (rank + 1) * ROWS // size)


def normalized(layers, x):
    """A model of `layers` (BatchNormalization's kind) called in training on x: its outputs
    and each layer's moving mean and variance."""
    import keras
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layers[1](keras.layers.Dense(3, kernel_initializer="identity")(
        layers[0](inputs))))
    outputs = model(x, training=True).numpy()
    return outputs, [v.numpy() for layer in layers
                     for v in (layer.moving_mean, layer.moving_variance)]


def syncbn(out):
    import horovod.tensorflow as hvd
    hvd.init()
    x, _ = batch()
    outputs, moving = normalized([hvd.SyncBatchNormalization(momentum=0.5) for _ in range(2)],
                                 x[halves(hvd.size(), hvd.rank())])
    np.savez(os.path.join(out, f"syncbn-rank{hvd.rank()}.npz"), outputs, *moving)


if __name__ == "__main__":
    tape(sys.argv[1])
    syncbn(sys.argv[1])
