"""The training step: loss, per-replica gradients with micro-batch accumulation, the update.

Distributed touchpoints: the model and optimizer are built under dist.strategy's tf.distribute
strategy (replicas.py: a copy per device under mirrored/hybrid), whose replicas' gradients are
averaged inside the process; the optimizer is wrapped so that gradients are averaged between
processes by Horovod allreduce (inside `optimizer.apply`, once per optimizer step, after the
micro-batches are accumulated). Under dist.zero 1 and 2 the optimizer is zero.py's instead
(reduce-scatter, update of this process's share, all-gather), and stage 2 reduce-scatters each
micro-batch's gradients as they come; stage 3's model gathers each layer's weights around its
call (zero3.py). trainer.py runs the steps.
"""

import keras
import tensorflow as tf

from hvd_llama import distributed as dist, model as model_lib, optim, plan, replicas, zero
from hvd_llama import zero3


def token_loss(model, tokens, training):
    """Mean next-token cross-entropy of int32 [b, seq_len + 1] tokens, in float32.

    A plain mean, not a Keras loss class: those divide by the replica count under a strategy
    (compat.py)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [b, seq_len] each, shifted by one
    # An int32 padding mask: a bool one breaks under MirroredStrategy (compat.py).
    logits = model({"token_ids": inputs, "padding_mask": tf.ones_like(inputs)},
                   training=training)  # [b, seq_len, vocab], in the compute dtype
    return tf.reduce_mean(keras.ops.sparse_categorical_crossentropy(
        targets, tf.cast(logits, tf.float32), from_logits=True))


def make_gradients(model, layout, jit_compile=False):
    """(int32 [k, d*b, seq_len + 1]: this process's k micro-batches of b sequences for each of
    its d replicas, loss scale) -> (mean loss, mean gradients) over all of them. Each replica
    runs the forward and backward passes of its rows (Layout.replica_rows), compiled with XLA
    when jit_compile is set; the replicas' results are then averaged inside the process. No
    communication between processes."""
    variables = model.trainable_variables

    def micro_step(tokens, scale):
        with tf.GradientTape() as tape:
            loss = token_loss(model, tokens, training=True)
            scaled_loss = loss * scale
        # The embedding's gradient comes as IndexedSlices; the accumulator and the
        # all-reduces want it dense.
        return loss, [tf.convert_to_tensor(g) for g in tape.gradient(scaled_loss, variables)]

    @tf.function(jit_compile=jit_compile)
    def replica_gradients(micro_batches, scale):  # [k, b, seq_len + 1]: this replica's
        # Equal micro-batches: the mean of their means. 1/k goes into the loss's scale (with
        # float16's, which lifts small gradients above underflow) rather than into a division
        # of the sum, which would hold a second whole gradient.
        k = tf.cast(tf.shape(micro_batches)[0], tf.float32)
        loss, grads = micro_step(micro_batches[0], scale / k)
        for j in tf.range(1, tf.shape(micro_batches)[0]):  # a graph loop, not k copies
            more_loss, more = micro_step(micro_batches[j], scale / k)
            loss += more_loss
            grads = [g + m for g, m in zip(grads, more)]
        return loss / k, grads

    def replica(micro_batches, scale):
        ctx = tf.distribute.get_replica_context()
        return replica_gradients(layout.replica_rows(micro_batches, ctx.replica_id_in_sync_group),
                                 scale)

    @tf.function
    def gradients(micro_batches, scale):
        return replicas.mean(replicas.strategy().run(replica, args=(micro_batches, scale)))

    return gradients


def make_train_step(model, optimizer, layout, jit_compile=False):
    """One optimizer step over int32 [k, d*b, seq_len + 1]: k micro-batches of b sequences for
    each of this process's d replicas.

    The forward and backward passes (make_gradients) run in one function per replica, compiled
    with XLA when jit_compile is set; the allreduce and the update run outside it, so Horovod's
    ops never need an XLA lowering, and outside the strategy's scope (replicas.py). Returns
    (mean loss, global norm of the averaged gradients, the learning rate this step used)."""
    variables = model.trainable_variables
    scaled = hasattr(optimizer, "dynamic_scale")  # float16
    if layout.zero == 3:
        gradients = zero.gathered_gradients(
            optimizer, lambda tokens: token_loss(model, tokens, training=True))
    elif plan.streams(layout, jit_compile):
        gradients = zero.stream_gradients(
            model, optimizer, lambda tokens: token_loss(model, tokens, training=True))
    elif layout.zero == 2:
        gradients = zero.share_gradients(make_gradients(model, layout, jit_compile), optimizer)
    else:
        gradients = make_gradients(model, layout, jit_compile)

    @tf.function
    def train_step(micro_batches):
        scale = tf.convert_to_tensor(optimizer.dynamic_scale) if scaled else tf.constant(1.0)
        learning_rate = tf.convert_to_tensor(optimizer.learning_rate)
        # The loss scale carries the Layout's weight (1 but for dist.elastic's waiting ranks).
        loss, grads = gradients(micro_batches, scale * layout.weight)
        norm = optimizer.apply(grads, variables)  # allreduce (or ZeRO's), clip, update (or skip)
        return loss, norm / scale, learning_rate

    return train_step


def build(c, layout):
    """(model, its optimizer, whether the gradients run under XLA) for Config c: the
    DistributedOptimizer of stage 0 or ZeRO's ShardedOptimizer, over Layout `layout`."""
    with replicas.strategy().scope():  # mirrored/hybrid: a copy of every variable per device
        if layout.zero == 3:  # the shares are the weights; the model's are never allocated
            model, shares = zero3.build(c, layout)
        else:
            model = model_lib.build(c.model, c.train.seed, c.train.precision, c.train.remat)
            shares = None
        variables = model.trainable_variables
        if layout.zero:
            optimizer = zero.ShardedOptimizer(c.train, variables, layout,
                                              c.dist.fusion_threshold_mb << 20,
                                              c.dist.compression, shares)
        else:
            optimizer = dist.DistributedOptimizer(
                optim.build(c.train, optim.schedule(c.train), variables),
                compression=c.dist.compression)
            optimizer.build(variables)  # its variables exist before a restore
    jit = plan.compiles(c, layout, bool(tf.config.list_physical_devices("GPU")))
    return model, optimizer, jit


def make_eval_step(model):
    """The validation loss of int32 [b, seq_len + 1], on the first replica's device."""
    return tf.function(lambda batch: token_loss(model, batch, training=False))
