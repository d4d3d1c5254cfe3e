"""ZeRO stages 1 and 2 (Rajbhandari et al., 2019) over Horovod's reduce-scatter and all-gather.

Every process keeps the full float32 weights, which its forward and backward passes need, but
owns only a share of each tensor's rows (Layout.share: the rows Horovod's reduce-scatter hands
it). For that share alone it holds AdamW's moments (stage 1) and, under stage 2, the
accumulated gradient. One optimizer step:

    gradients ──reduce-scatter (average)──▶ this process's share ──AdamW──▶ updated share
              ──all-gather──▶ the full weights, on every process

Each process sends (N-1)/N of the gradient's bytes in each of the two collectives: what one
ring allreduce moves. Global-norm clipping, the NaN/Inf skip and float16's overflow test
judge the whole averaged gradient: each process sums the squares of its share and one small
allreduce adds the N sums up, so every process takes the same decision.
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
        # A float32 copy of this process's rows of each weight, which AdamW updates in place:
        # Keras optimizers update variables, and a slice of one is not a variable.
        self.shares = [keras.Variable(v[a:b], name=f"share_{i}", trainable=False)
                       for i, (v, (a, b)) in enumerate(zip(self.variables, self.rows))]
        self.inner = optim.build(tc, optim.schedule(tc), self.shares, like=self.variables)
        self.adamw = optim.adamw(self.inner)
        compat.subclass_in_place(self.adamw, _ClipByWholeNorm, "Sharded")
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

    def apply(self, grads, variables=None):
        """Update the weights from this process's gradients (stage 1: full, averaged over its
        micro-batches; stage 2: already its averaged shares, from `share_gradients`)."""
        shares = grads if self.stage == 2 else \
            dist.reducescatter_gradients(grads, self.compression)
        sums = dist.allreduce_sum(tf.stack([
            tf.add_n([tf.reduce_sum(tf.square(s)) for s in shares]),
            tf.add_n([tf.reduce_sum(tf.cast(~tf.math.is_finite(s), tf.float32))
                      for s in shares])]))
        norm, nonfinite = tf.sqrt(sums[0]), sums[1]
        for share, v, (a, b) in zip(self.shares, self.variables, self.rows):
            share.assign(v[a:b])  # the weights may have been restored or broadcast since
        if isinstance(self.inner, keras.optimizers.LossScaleOptimizer):
            # It tests the finiteness of the shares it is given: make them non-finite on every
            # process when any process's are, so all skip the step and halve the scale.
            shares = [tf.where(nonfinite > 0, tf.fill(tf.shape(s), float("nan")), s)
                      for s in shares]
            self.adamw.whole_norm = norm / self.inner.dynamic_scale  # it clips unscaled ones
            self.inner.apply(shares, self.shares)
        else:
            self.adamw.whole_norm = norm

            def update():
                self.inner.apply(shares, self.shares)
                return tf.constant(True)

            tf.cond(tf.math.is_finite(norm), update, lambda: tf.constant(False))
        for v, whole in zip(self.variables, dist.allgather_shares(self.shares)):
            v.assign(whole)
        return norm


class _ClipByWholeNorm:
    """Mixin over the AdamW that updates shares: global-norm clipping by the norm of the whole
    gradient (set as `whole_norm` by ShardedOptimizer.apply in the same trace), where Keras
    would take the norm of the share it is given."""

    whole_norm = None

    def _clip_gradients(self, grads):
        if not self.global_clipnorm:
            return grads
        norm, clip = self.whole_norm, self.global_clipnorm
        # Keras's clip_by_global_norm, with the whole gradient's norm: NaN for a non-finite one.
        scale = clip * tf.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)
        return [g * scale for g in grads]


def share_gradients(gradients, variables, layout, compression="none"):
    """Stage 2: make_gradients' function turned into (micro-batches, scale) -> (mean loss, this
    process's share of the mean gradients). Each micro-batch's gradients are reduce-scattered
    as soon as they exist, and only the share is accumulated: 1/N of the accumulator's memory,
    for one reduce-scatter per micro-batch instead of one per step."""
    shapes = [[b - a] + v.shape[1:] for v, (a, b) in
              zip(variables, (layout.share(v.shape[0]) for v in variables))]

    @tf.function
    def shared(micro_batches, scale):
        k = tf.shape(micro_batches)[0]
        loss, acc = tf.constant(0.0), [tf.zeros(s) for s in shapes]
        for j in tf.range(k):
            # One micro-batch at a time: Horovod names a collective after its op, and two
            # iterations in flight at once would present the same names twice.
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            more_loss, grads = gradients(micro_batches[j:j + 1], scale)
            loss += more_loss
            acc = [x + s for x, s in zip(acc, dist.reducescatter_gradients(grads, compression))]
        k = tf.cast(k, tf.float32)
        return loss / k, [x / k for x in acc]

    return shared
