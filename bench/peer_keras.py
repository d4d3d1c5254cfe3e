"""Peers for bench/peers.py, on random tokens: keras-hub's LlamaCausalLM trained with `fit` in
one process with no Horovod (what a Keras user writes), or (--mwms) one of N workers of
tf.distribute.MultiWorkerMirroredStrategy on this host, TensorFlow's own answer to
multi-process data parallelism. Prints {"tokens_per_s": ...} on worker 0.

    python bench/peer_keras.py --spec JSON [--steps 3] [--threads T]
                               [--mwms --workers N --index I --port P]
"""

import json
import os
import sys
import time

import keras
import keras_hub
import numpy as np
import tensorflow as tf

import peer_common
from peer_common import WARMUP


def main():
    parser = peer_common.parser(__doc__)
    parser.add_argument("--mwms", action="store_true",
                        help="a MultiWorkerMirroredStrategy worker (with --workers, --index)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--port", type=int, default=23456)
    args = parser.parse_args()
    s = args.spec
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    strategy = multi_worker(args) if args.mwms else None  # before any op runs
    rows = np.random.default_rng(args.index).integers(
        0, s["vocab_size"], (s["global_batch"] * 4, s["seq_len"] + 1), np.int32)
    # An int32 mask: under a tf.distribute strategy keras-hub's boolean one fails (AddN on bool).
    inputs = {"token_ids": rows[:, :-1], "padding_mask": np.ones_like(rows[:, :-1])}
    data = tf.data.Dataset.from_tensor_slices((inputs, rows[:, 1:])).repeat()
    seconds = mwms(s, args, data, strategy) if args.mwms else fit(s, args, data)
    if args.index == 0:
        peer_common.report(args, seconds)


def build(s):
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=s["vocab_size"], num_layers=s["num_layers"],
        num_query_heads=s["num_query_heads"], num_key_value_heads=s["num_key_value_heads"],
        hidden_dim=s["hidden_dim"], intermediate_dim=s["intermediate_dim"])
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def fit(s, args, data):
    """model.fit, one process: what a Keras user writes."""
    model = build(s)
    model.compile(optimizer=keras.optimizers.AdamW(s["learning_rate"]),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=[])  # the loss alone, as hvd_llama computes
    timer = Timer()
    model.fit(data.batch(s["global_batch"]), epochs=1, steps_per_epoch=WARMUP + args.steps,
              callbacks=[timer], verbose=0)
    return timer.seconds


def multi_worker(args):
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"localhost:{args.port + i}" for i in range(args.workers)]},
        "task": {"type": "worker", "index": args.index}})
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING))


def mwms(s, args, data, strategy):
    """One worker of TensorFlow's MultiWorkerMirroredStrategy (ring all-reduce), with the
    custom training loop of TensorFlow's guide. Not `fit`: Keras 3.15's fit reduces a sample
    input batch across replicas before building (`_maybe_symbolic_build`), which this strategy
    refuses for a dict of inputs such as keras-hub's."""
    with strategy.scope():
        model = build(s)
        optimizer = keras.optimizers.AdamW(s["learning_rate"])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    # Batched by the global batch, which the strategy splits: each worker computes its share.
    batches = iter(strategy.experimental_distribute_dataset(data.batch(s["global_batch"])))

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            per_example = tf.reduce_mean(loss_fn(y, model(x, training=True)), axis=1)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=s["global_batch"])
        # Keras's optimizer sums the gradients over the replicas in apply_gradients.
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def step():
        return strategy.reduce("SUM", strategy.run(replica_step, args=next(batches)), axis=None)

    for _ in range(WARMUP):
        float(step())
    start = time.perf_counter()
    for _ in range(args.steps):
        float(step())
    return time.perf_counter() - start


class Timer(keras.callbacks.Callback):
    """Seconds from the end of the last warm-up step to the end of the last step."""

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])  # the step has finished
        if batch == WARMUP - 1:
            self.start = time.perf_counter()
        self.seconds = time.perf_counter() - getattr(self, "start", 0.0)


if __name__ == "__main__":
    sys.exit(main())
