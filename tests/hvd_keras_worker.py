"""Horovod's own TensorFlow and Keras API on Keras 3 objects (the project's patched build),
run under `horovodrun -np 2` as `python tests/hvd_keras_worker.py OUT [PART...]`; each rank
writes what it computed in each part to OUT/<part>-rank<r>.npz:

    tape
        broadcast_variables of a Keras 3 model's variables from rank 0 (each rank initialised
        its own), then DistributedGradientTape over them (two Dense layers: both kernels are
        named "kernel") without and with `groups`, with a Keras variable registered as a local
        source; each rank takes its half of one batch
    syncbn
        hvd.SyncBatchNormalization in training on each rank's share of one batch (3 rows and
        5), in a model with two of them (Keras 3 wants its layers' names unique), then one
        more called with a mask that leaves out some rows: the outputs and the moving
        statistics
    fit
        horovod.tensorflow.keras: model.fit with hvd.DistributedOptimizer on each rank's half
        of the data (each rank initialised its own model), twice: (a) SGD with momentum, the
        broadcast, metric-average, learning-rate warmup and schedule callbacks, and
        BestModelCheckpoint on rank 0; (b) a LossScaleOptimizer over SGD, built before
        it is wrapped, with backward_passes_per_step=2 (averaged) and half the batch; the
        epoch losses, the learning rate at each batch, the weights after each epoch, the
        optimizer's iterations;
        then hvd.load_model of rank 0's best model on both ranks, and one step on each rank's
        rows
    elastic
        hvd.elastic.KerasState over a compiled model: commit, train on, restore; sync from rank
        0 after rank 1 changed its state; the Commit/UpdateBatch/UpdateEpoch state callbacks
        in a fit
    refusals
        the one-line errors of Horovod's Keras API for what it cannot take (a tf_keras object
        on Keras 3, a second wrap, Keras's own gradient accumulation, BestModelCheckpoint
        without a path, a LossScaleOptimizer around a DistributedOptimizer in fit): written to
        refusals-rank<r>.json
    legacy
        one process, under TF_USE_LEGACY_KERAS=1 (tf.keras is tf_keras, Keras 2): the refusal
        of a Keras 3 optimizer, and Horovod's tf.keras 2 path still in use: the fit of part
        (a) on all the data with tf_keras objects, and without Horovod, written to
        legacy.json
"""

import json
import os
import sys

import numpy as np

ROWS = 8


def data(rows=ROWS, seed=0):
    """`rows` inputs of 3 features and their targets, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, 3)).astype("float32"),
            rng.standard_normal((rows, 1)).astype("float32"))


def two_layers(seed, activation=None):
    """Dense(4), Dense(1) on 3 features, initialised from `seed`."""
    import keras
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation=activation),
                             keras.layers.Dense(1)])


def model_and_local(seed):
    """A two-layer model initialised from `seed`, and a variable outside it."""
    import keras
    model = two_layers(seed)
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
    x, y = data()
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


def halves(size, rank, rows=ROWS):
    """Rank `rank`'s equal share of `rows` rows."""
    return slice(rank * rows // size, (rank + 1) * rows // size)


def uneven(rank):
    """Rank 0's and rank 1's rows of the batch for syncbn: 3 and 5."""
    return slice(0, 3) if rank == 0 else slice(3, ROWS)


def mask():
    """The rows that a masked batch normalization counts: none of rank 0's, 4 of rank 1's."""
    return (np.arange(ROWS) >= 3) & (np.arange(ROWS) != 5)


def normalized(layers, x, rows_mask):
    """A model of two of `layers` (BatchNormalization's kind) called in training on x, then
    the third called on x with rows_mask: both outputs and each layer's moving mean and
    variance."""
    import keras
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layers[1](keras.layers.Dense(3, kernel_initializer="identity")(
        layers[0](inputs))))
    outputs = [model(x, training=True).numpy(),
               layers[2](x, training=True, mask=rows_mask).numpy()]
    return outputs, [v.numpy() for layer in layers
                     for v in (layer.moving_mean, layer.moving_variance)]


def syncbn(out):
    import horovod.tensorflow as hvd
    hvd.init()
    x, _ = data()
    rows = uneven(hvd.rank())
    outputs, moving = normalized([hvd.SyncBatchNormalization(momentum=0.5) for _ in range(3)],
                                 x[rows], mask()[rows])
    np.savez(os.path.join(out, f"syncbn-rank{hvd.rank()}.npz"), *outputs, *moving)


FIT_ROWS = 16      # the data: each rank fits on its half
EPOCHS = 4
LR = 0.1
WARMUP_EPOCHS = 2  # then the schedule: LR * DECAY ** (epoch - 2)
DECAY = 0.5


def fit_data():
    return data(FIT_ROWS, seed=1)


def fit_model(seed):
    return two_layers(seed, activation="tanh")


def fit(out):
    import keras
    import horovod.tensorflow.keras as hvd
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    x, y = fit_data()
    rows = halves(size, rank, FIT_ROWS)
    arrays = {}
    for run, batch_size in (("a", 4), ("b", 2)):
        model = fit_model(seed=rank)
        if run == "a":
            optimizer = hvd.DistributedOptimizer(keras.optimizers.SGD(LR, momentum=0.9))
            callbacks = [
                hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                hvd.callbacks.MetricAverageCallback(),
                # No momentum correction: Keras 3's momentum is a constant (Horovod warns).
                hvd.callbacks.LearningRateWarmupCallback(
                    initial_lr=LR, warmup_epochs=WARMUP_EPOCHS, momentum_correction=False),
                hvd.callbacks.LearningRateScheduleCallback(
                    initial_lr=LR, multiplier=DECAY, start_epoch=WARMUP_EPOCHS,
                    momentum_correction=False)]
            if rank == 0:
                callbacks.append(hvd.callbacks.BestModelCheckpoint(
                    monitor="loss", filepath=os.path.join(out, "best.keras")))
        else:
            optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR, momentum=0.9))
            optimizer.build(model.trainable_variables)  # wrapped when built already
            optimizer = hvd.DistributedOptimizer(optimizer, backward_passes_per_step=2,
                                                 average_aggregated_gradients=True)
            callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                         hvd.callbacks.MetricAverageCallback()]
        model.compile(optimizer=optimizer, loss="mse")
        lrs, weights = [], []
        callbacks.append(keras.callbacks.LambdaCallback(
            on_train_batch_begin=lambda batch, logs: lrs.append(
                float(model.optimizer.learning_rate.numpy())),
            on_epoch_end=lambda epoch, logs: weights.append(
                [w.numpy() for w in model.weights])))
        history = model.fit(x[rows], y[rows], batch_size=batch_size, epochs=EPOCHS,
                            shuffle=False, verbose=0, callbacks=callbacks)
        arrays[f"{run}_loss"] = np.array(history.history["loss"])
        arrays[f"{run}_lr"] = np.array(lrs)
        arrays[f"{run}_iterations"] = np.array(int(model.optimizer.iterations.numpy()))
        for e, epoch_weights in enumerate(weights):
            for i, w in enumerate(epoch_weights):
                arrays[f"{run}_epoch{e}_weight{i}"] = w
    hvd.allreduce(0.0, name="barrier")  # rank 0 has written best.keras
    loaded = hvd.load_model(os.path.join(out, "best.keras"))
    arrays["loaded_class"] = np.array([c.__module__ for c in type(loaded.optimizer).__mro__])
    loaded.train_on_batch(x[rows][:4], y[rows][:4])
    arrays.update({f"loaded_weight{i}": w.numpy() for i, w in enumerate(loaded.weights)})
    np.savez(os.path.join(out, f"fit-rank{rank}.npz"), **arrays)


def elastic(out):
    import keras
    import horovod.tensorflow.keras as hvd
    hvd.init()
    rank = hvd.rank()
    x, y = fit_data()
    model = fit_model(seed=rank)
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(0.01)), loss="mse")
    state = hvd.elastic.KerasState(model, batch=0, epoch=0)

    def snapshot():
        return [v.numpy() for v in [*model.weights, *model.optimizer.variables]]

    arrays = {"optimizer_variables": np.array(len(model.optimizer.variables))}
    model.train_on_batch(x[:4], y[:4])
    state.batch = 3
    state.commit()
    committed = snapshot()
    model.train_on_batch(x[4:8], y[4:8])
    state.batch = 7
    state.restore()
    arrays["restored_batch"] = np.array(state.batch)
    arrays.update({f"committed{i}": v for i, v in enumerate(committed)})
    arrays.update({f"restored{i}": v for i, v in enumerate(snapshot())})
    if rank == 1:  # a state of its own (no collective: rank 0 would not join)
        for v in [*model.weights, *model.optimizer.variables]:
            v.assign(v + 1)
        state.batch = 5
    arrays.update({f"before_sync{i}": v for i, v in enumerate(snapshot())})
    state.sync()
    arrays["synced_batch"] = np.array(state.batch)
    arrays.update({f"synced{i}": v for i, v in enumerate(snapshot())})
    model.fit(x[:8], y[:8], batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[
        hvd.elastic.CommitStateCallback(state, batches_per_commit=1),
        hvd.elastic.UpdateBatchStateCallback(state),
        hvd.elastic.UpdateEpochStateCallback(state)])
    arrays["fit_epoch"] = np.array(state.epoch)
    arrays["fit_batch"] = np.array(state.batch)
    arrays.update({f"fitted{i}": v for i, v in enumerate(snapshot())})
    model.train_on_batch(x[8:12], y[8:12])
    state.restore()
    arrays.update({f"fit_restored{i}": v for i, v in enumerate(snapshot())})
    np.savez(os.path.join(out, f"elastic-rank{rank}.npz"), **arrays)


def inside_loss_scale(hvd, x, y):
    """What compile() makes under mixed_float16, fitted."""
    import keras
    model = fit_model(seed=0)
    model.compile(loss="mse", optimizer=keras.optimizers.LossScaleOptimizer(
        hvd.DistributedOptimizer(keras.optimizers.SGD(LR))))
    model.fit(x, y, verbose=0, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])


def refusals(out):
    """What each misuse raised: {case: "ExceptionType: message"}."""
    import keras
    import tf_keras
    import horovod.tensorflow.keras as hvd
    hvd.init()
    legacy_model = tf_keras.Sequential([tf_keras.layers.Dense(1, input_shape=(3,))])
    legacy_model.compile(optimizer="sgd", loss="mse")
    x, y = fit_data()
    cases = {
        "tf_keras optimizer": lambda: hvd.DistributedOptimizer(tf_keras.optimizers.SGD(0.1)),
        "tf_keras model in fit": lambda: legacy_model.fit(x, y, verbose=0, callbacks=[
            hvd.callbacks.BroadcastGlobalVariablesCallback(0)]),
        "tf_keras model in KerasState": lambda: hvd.elastic.KerasState(legacy_model),
        "wrapped twice": lambda: hvd.DistributedOptimizer(
            hvd.DistributedOptimizer(keras.optimizers.SGD(0.1))),
        "gradient_accumulation_steps": lambda: hvd.DistributedOptimizer(
            keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)),
        "BestModelCheckpoint without a path": lambda: hvd.callbacks.BestModelCheckpoint(),
        "LossScaleOptimizer around it": lambda: inside_loss_scale(hvd, x, y),
    }
    raised = {}
    for case, misuse in cases.items():
        try:
            misuse()
            raised[case] = "nothing"
        except Exception as e:  # what the user would see
            raised[case] = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, f"refusals-rank{hvd.rank()}.json"), "w") as f:
        json.dump(raised, f)


def legacy(out):
    import keras
    import tensorflow as tf
    import horovod.tensorflow.keras as hvd
    assert os.environ.get("TF_USE_LEGACY_KERAS") == "1"
    hvd.init()
    x, y = fit_data()
    result = {}
    try:
        hvd.DistributedOptimizer(keras.optimizers.SGD(0.1))
        result["keras 3 optimizer"] = "nothing"
    except TypeError as e:
        result["keras 3 optimizer"] = f"TypeError: {e}"
    for name, horovod in (("horovod", True), ("plain", False)):
        tf.keras.utils.set_random_seed(0)
        model = tf.keras.Sequential([tf.keras.layers.Dense(4, activation="tanh", input_shape=(3,)),
                                     tf.keras.layers.Dense(1)])
        optimizer = tf.keras.optimizers.legacy.SGD(LR, momentum=0.9)
        # Epoch 1 at LR * DECAY, by each Keras's own scheduler, then by Horovod's.
        callbacks = [tf.keras.callbacks.LearningRateScheduler(
            lambda epoch, lr: LR if epoch < 1 else LR * DECAY)]
        if horovod:
            optimizer = hvd.DistributedOptimizer(optimizer)
            callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                         hvd.callbacks.MetricAverageCallback(),
                         hvd.callbacks.LearningRateScheduleCallback(
                             initial_lr=LR, multiplier=lambda epoch: DECAY, start_epoch=1,
                             momentum_correction=False)]
        model.compile(optimizer=optimizer, loss="mse")
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                            callbacks=callbacks)
        result[name] = {"loss": [float(v) for v in history.history["loss"]],
                        "lr": float(model.optimizer.learning_rate.numpy()),
                        "type": type(model).__module__,
                        "weights": [w.tolist() for w in model.get_weights()]}
    with open(os.path.join(out, "legacy.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    for part in sys.argv[2:] or ("tape", "syncbn", "fit", "elastic", "refusals"):
        globals()[part](sys.argv[1])
