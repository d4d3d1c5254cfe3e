"""A Horovod Keras script as Horovod's own examples write one, on Keras 3, with the project's
Horovod build (README, "Your own Horovod Keras script on Keras 3"):

    horovodrun -np 2 -H localhost:2 .venv/bin/python docs/examples/horovod_keras3.py [BEST]

Each process fits on its own shard of a synthetic task; rank 0 keeps the best model in BEST
(default best.keras) and reloads it with hvd.load_model (which would resume training with
its optimizer distributed).
"""

import sys

import keras
import numpy as np

import horovod.tensorflow.keras as hvd
from horovod.tensorflow import SyncBatchNormalization

hvd.init()

# This process's shard: 512 rows, y = whether the row sums to more than 0.
rng = np.random.default_rng(hvd.rank())
x = rng.standard_normal((512, 8)).astype("float32")
y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")

model = keras.Sequential([
    keras.Input((8,)),
    keras.layers.Dense(32, activation="relu"),
    SyncBatchNormalization(),  # statistics over every process's batch
    keras.layers.Dense(1, activation="sigmoid"),
])
# The learning rate scales with the number of processes (the global batch grows with it).
scaled_lr = 0.01 * hvd.size()
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(scaled_lr)),
              loss="binary_crossentropy", metrics=["accuracy"])

callbacks = [
    hvd.callbacks.BroadcastGlobalVariablesCallback(0),  # rank 0's initial weights everywhere
    hvd.callbacks.MetricAverageCallback(),  # epoch metrics averaged over the processes
    hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=2, verbose=1),
]
if hvd.rank() == 0:
    best = sys.argv[1] if len(sys.argv) > 1 else "best.keras"
    callbacks.append(hvd.callbacks.BestModelCheckpoint(monitor="loss", filepath=best))

history = model.fit(x, y, batch_size=32, epochs=4, callbacks=callbacks,
                    verbose=2 if hvd.rank() == 0 else 0)
if hvd.rank() == 0:
    print(f"accuracy {history.history['accuracy'][-1]:.3f} over {hvd.size()} processes")
    _, accuracy = hvd.load_model(best).evaluate(x, y, verbose=0)
    print(f"best model reloaded: accuracy {accuracy:.3f} on rank 0's shard")
