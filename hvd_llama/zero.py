"""ZeRO stages 1 and 2 (Rajbhandari et al., 2019) over Horovod's reduce-scatter and all-gather.

Every process keeps the full float32 weights, which its forward and backward passes need, but
owns only a share of each tensor's rows (Layout.share: the rows Horovod's reduce-scatter hands
it). For that share alone it holds AdamW's moments (stage 1) and, under stage 2, the
accumulated gradient. One optimizer step:

    gradients ──reduce-scatter (average)──▶ this process's share ──AdamW──▶ updated share
              ──all-gather──▶ the full weights, on every process

Each process sends (N-1)/N of the gradients' bytes in the reduce-scatter (stage 2: in each of
train.grad_accum) and (N-1)/N of the weights' in the all-gather: at stage 1 what one ring
allreduce moves (traffic.py counts it). Global-norm clipping, the NaN/Inf skip and float16's
overflow test judge the whole averaged gradient: each process sums the squares of its share
and one small allreduce adds the N sums up, so every process takes the same decision.
"""

import keras
import tensorflow as tf

from hvd_llama import compat, distributed as dist, optim


class ShardedOptimizer:
    """The optimizer of a run with dist.zero 1 or 2; trainer and step use it as they use the
    DistributedOptimizer of stage 0: `apply(grads)` returns the global norm of the averaged
    (still loss-scaled) gradients."""

    def __init__(self, tc, variables, layout, compression="none"):
        self.variables = list(variables)  # the model's, full on every process
        self.stage, self.compression = layout.zero, compression
        self.rows = [layout.share(v.shape[0]) for v in self.variables]
        # A float32 copy of this process's rows of each weight, which AdamW updates in place
        # (Keras optimizers update variables; a slice of one is not a variable).
        self.shares = [keras.Variable(v[a:b], name=f"share_{i}", trainable=False)
                       for i, (v, (a, b)) in enumerate(zip(self.variables, self.rows))]
        self.inner = optim.build(tc, optim.schedule(tc), self.shares, like=self.variables)
        self.scaled = isinstance(self.inner, keras.optimizers.LossScaleOptimizer)  # float16
        self.whole_norm = None  # set by apply, read by the clipping in the same trace
        compat.clip_by_given_norm(optim.adamw(self.inner), lambda: self.whole_norm)
        self.inner.build(self.shares)

    @property
    def starts(self):
        """The first row of each variable that this process owns."""
        return [a for a, _ in self.rows]

    @property
    def learning_rate(self):
        return self.inner.learning_rate

    @property
    def dynamic_scale(self):  # float16 only: an AttributeError otherwise, as for stage 0
        return self.inner.dynamic_scale

    def take_weights(self):
        """Copy this process's rows of the weights into the shares AdamW updates: once the
        weights were restored or broadcast. After each step the shares are the rows the
        all-gather spread, so they stay equal."""
        for share, v, (a, b) in zip(self.shares, self.variables, self.rows):
            share.assign(v[a:b])

    def apply(self, grads, variables=None):
        """Update the weights (self.variables; `variables` is accepted as stage 0's apply
        takes it) from this process's gradients: at stage 1 whole, averaged over its
        micro-batches; at stage 2 already its averaged shares (share_gradients)."""
        shares = grads if self.stage == 2 else \
            dist.reducescatter_gradients(grads, self.compression)
        sums = [tf.add_n([tf.reduce_sum(tf.square(s)) for s in shares])]
        if self.scaled:
            sums.append(tf.add_n([tf.reduce_sum(tf.cast(~tf.math.is_finite(s), tf.float32))
                                  for s in shares]))
        sums = dist.allreduce_sum(tf.stack(sums))
        norm = tf.sqrt(sums[0])
        if self.scaled:
            # LossScaleOptimizer tests the shares it is given: make them non-finite on every
            # process when any process's are, so that all skip the step and halve the scale.
            shares = [tf.where(sums[1] > 0, tf.fill(tf.shape(s), float("nan")), s)
                      for s in shares]
            self.whole_norm = norm / self.inner.dynamic_scale  # it clips unscaled gradients
            self.inner.apply(shares, self.shares)
        else:
            self.whole_norm = norm

            def update():
                self.inner.apply(shares, self.shares)
                return tf.constant(True)

            tf.cond(tf.math.is_finite(norm), update, lambda: tf.constant(False))
        for v, whole in zip(self.variables, dist.allgather_shares(self.shares)):
            v.assign(whole)
        return norm


def share_gradients(gradients, optimizer):
    """Stage 2: make_gradients' function turned into (micro-batches, scale) -> (mean loss, this
    process's share of the mean gradients) for ShardedOptimizer `optimizer`. Each micro-batch's
    gradients are reduce-scattered before the next one's are computed, and only the share is
    accumulated: 1/N of the accumulator's memory, for one reduce-scatter per micro-batch, not
    per step."""
    shapes = [[b - a, *v.shape[1:]] for v, (a, b) in zip(optimizer.variables, optimizer.rows)]

    @tf.function
    def shared(micro_batches, scale):
        # One micro-batch: nothing to accumulate, so stage 1's step without the loop below,
        # whose body held 0.13 GiB more at 142M parameters (BENCHMARKS.md, "ZeRO").
        if micro_batches.shape[0] == 1:
            loss, grads = gradients(micro_batches, scale)
            return loss, dist.reducescatter_gradients(grads, optimizer.compression)
        k = tf.shape(micro_batches)[0]
        loss, acc = tf.constant(0.0), [tf.zeros(s) for s in shapes]
        for j in tf.range(k):
            # One micro-batch at a time: Horovod names a collective after its op, and two
            # iterations in flight at once would present the same names twice.
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            more_loss, grads = gradients(micro_batches[j:j + 1], scale)
            loss += more_loss
            acc = [x + s for x, s in zip(
                acc, dist.reducescatter_gradients(grads, optimizer.compression))]
        k = tf.cast(k, tf.float32)
        return loss / k, [x / k for x in acc]

    return shared
