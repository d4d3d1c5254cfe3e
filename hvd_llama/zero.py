"""ZeRO stages 1 and 2 (Rajbhandari et al., 2019) over Horovod's reduce-scatter and all-gather,
and stage 3's optimizer and gradients (its model is zero3.py's).

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

import math

import keras
import tensorflow as tf

from hvd_llama import compat, distributed as dist, model as model_lib, optim


class ShardedOptimizer:
    """The optimizer of a run with dist.zero 1 or 2; trainer and step use it as they use the
    DistributedOptimizer of stage 0: `apply(grads)` returns the global norm of the averaged
    (still loss-scaled) gradients."""

    def __init__(self, tc, variables, layout, gather_bytes, compression="none", shares=None):
        self.variables = list(variables)  # the model's: whole on every process below stage 3
        self.stage, self.compression = layout.zero, compression
        self.rows = [layout.share(v.shape[0]) for v in self.variables]
        self.gather_groups = _groups([4 * math.prod(v.shape) for v in self.variables],
                                     gather_bytes) if self.stage < 3 else []
        # A float32 copy of this process's rows of each weight, which AdamW updates in place
        # (Keras optimizers update variables; a slice of one is not a variable). At stage 3
        # zero3.build's, the only copy.
        self.shares = shares or [
            keras.Variable(compat.rows(v, a, b), name=f"share_{i}", trainable=False)
            for i, (v, (a, b)) in enumerate(zip(self.variables, self.rows))]
        self.inner = optim.build(tc, optim.schedule(tc), self.shares, like=self.variables)
        self.scaled = isinstance(self.inner, keras.optimizers.LossScaleOptimizer)  # float16
        self.whole_norm = None  # set by apply, read by the clipping in the same trace
        compat.update_in_turn(optim.adamw(self.inner), lambda: self.whole_norm)
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
        all-gather spread, so they stay equal. At stage 3 the shares are the weights."""
        if self.stage == 3:
            return
        for share, v, (a, b) in zip(self.shares, self.variables, self.rows):
            share.assign(compat.rows(v, a, b))

    def apply(self, grads, variables=None):
        """Update the weights (self.variables; `variables` is accepted as stage 0's apply
        takes it) from this process's gradients: at stage 1 whole, averaged over its
        micro-batches; from stage 2 already its averaged shares (stream_gradients,
        share_gradients, gathered_gradients). Below stage 3, all-gathers the updated shares
        into the weights."""
        shares = grads if self.stage >= 2 else \
            dist.reducescatter_gradients(grads, self.compression)
        # Dot products: tf.square would make a temporary of each share, all at once.
        flat = [tf.reshape(s, [-1]) for s in shares]
        sums = [tf.add_n([tf.tensordot(f, f, 1) for f in flat])]
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
        if self.stage < 3:
            self._gather_weights()
        return norm

    def _gather_weights(self):
        """All-gather the updated shares into the weights, one group of about gather_bytes of
        whole tensors after another: a group's all-gathers start once the group before is
        assigned (and the weights it replaced are freed), so at most one group exists beside
        the weights rather than a second copy of all of them. Horovod fuses each group."""
        weights, assigned = compat.tf_variables(self.variables), []
        for group in self.gather_groups:
            with tf.control_dependencies(assigned):
                wholes = dist.allgather_shares([self.shares[i] for i in group])
            # The assign ops themselves: Keras's assign returns the value it was given.
            assigned = [weights[i].assign(w, read_value=False) for i, w in zip(group, wholes)]


def stream_gradients(model, optimizer, loss_fn):
    """Stage 2 with one device per process and no XLA: (micro-batches, scale) -> (mean loss,
    this process's share of the mean gradients) for ShardedOptimizer `optimizer`, with
    loss_fn(tokens) the loss of one micro-batch. Each layer's backward pass reduce-scatters its
    weights' gradients as soon as it has them and adds this process's share into an
    accumulator (compat.reduce_in_backward), so a whole gradient never exists: 4n/N bytes of
    accumulated shares and the gradients of the layers not yet reduced (about two: held_until),
    for one reduce-scatter per micro-batch."""
    variables = optimizer.variables
    where = {id(v): i for i, v in enumerate(variables)}
    layers = model_lib.weight_layers(model)
    if {id(w) for layer in layers for w in layer.trainable_variables} != set(where):
        raise RuntimeError("zero.stream_gradients: model.weight_layers misses some weights")
    accumulated = [tf.Variable(tf.zeros_like(s), trainable=False) for s in optimizer.shares]
    tracing = [False]  # the layers reduce only in the backward pass traced below
    order = LayerOrder()

    def sink(weights, grads, dx):
        shares = dist.reducescatter_gradients(grads, optimizer.compression)
        return order.hold(dx, [accumulated[where[id(w)]].assign_add(s)
                               for w, s in zip(weights, shares)])

    for layer in layers:
        compat.reduce_in_backward(layer, sink, lambda: tracing[0])

    def micro_step(micro_batch, scale):  # [1, b, seq_len + 1]
        tracing[0] = True
        try:
            with tf.GradientTape() as tape:
                loss = loss_fn(micro_batch[0])
                scaled_loss = loss * scale
            tape.gradient(scaled_loss, variables)  # the gradients go to sink, None here
        finally:
            tracing[0] = False
        return loss

    return _accumulating(micro_step, accumulated)


class LayerOrder:
    """What a layer's collectives wait for of the layer traced before it in the same graph
    (the model's layers are traced in several: the step, the bench's parts): in the forward
    pass its input (stage 3's prefetch), in the backward pass its reduce-scatter (the layer
    above's, as the backward pass goes down)."""

    def __init__(self):
        self._input = self._scattered = None

    def swap_input(self, x):
        """The input of the layer traced before in x's graph (None if none); x is next."""
        last, self._input = _in_graph_of(x, self._input), x
        return last

    def hold(self, dx, scattered):
        """dx, a layer's input gradient, held until the reduce-scatter of the layer above in
        dx's graph is done (held_until); `scattered`, this layer's (a list), is next."""
        above, self._scattered = _in_graph_of(dx, self._scattered), scattered
        return held_until(dx, above)


def _in_graph_of(x, tensors):
    """`tensors` (a tensor or a list) if the first one is in x's graph, else None."""
    first = tensors[0] if isinstance(tensors, list) and tensors else tensors
    return tensors if first is not None and getattr(first, "graph", None) is \
        getattr(x, "graph", 0) else None


def held_until(dx, done):
    """The gradient dx of a layer's input, once the ops `done` (None: none) have run. The
    backward pass goes on to the layer below with it: held until the layer above has
    reduce-scattered, it bounds the whole gradients that wait for their reduce-scatter to
    about two layers' where the collectives are slower than the compute (they would otherwise
    pile up), for no wait where they keep up."""
    if dx is None or not done:
        return dx
    with tf.control_dependencies(done):
        return tf.identity(dx)


def share_gradients(gradients, optimizer):
    """Stage 2 under dist.strategy=hybrid or XLA: make_gradients' function turned into
    (micro-batches, scale) -> (mean loss, this process's share of the mean gradients) for
    ShardedOptimizer `optimizer`. Each micro-batch's whole gradient (averaged over the
    process's devices) is reduce-scattered before the next micro-batch runs and only the share
    is accumulated: 1/N of the accumulator's memory, for one reduce-scatter per micro-batch."""
    accumulated = [tf.Variable(tf.zeros_like(s), trainable=False) for s in optimizer.shares]

    def micro_step(micro_batch, scale):
        loss, grads = gradients(micro_batch, scale)
        for a, share in zip(accumulated,
                            dist.reducescatter_gradients(grads, optimizer.compression)):
            a.assign_add(share)
        return loss

    return _accumulating(micro_step, accumulated)


def gathered_gradients(optimizer, loss_fn):
    """Stage 3: (micro-batches, scale) -> (mean loss, this process's share of the mean
    gradients), with loss_fn(tokens) the loss of one micro-batch on zero3.build's model. The
    shares are the weights: their gradients come from the all-gathers' (zero3.py), each layer's
    reduce-scattered as the backward pass reaches it, and add into an accumulator."""
    shares = compat.tf_variables(optimizer.shares)
    accumulated = [tf.Variable(tf.zeros_like(s), trainable=False) for s in shares]

    def micro_step(micro_batch, scale):  # [1, b, seq_len + 1]
        with tf.GradientTape() as tape:
            loss = loss_fn(micro_batch[0])
            scaled_loss = loss * scale
        for a, g in zip(accumulated, tape.gradient(scaled_loss, shares)):
            a.assign_add(tf.convert_to_tensor(g))
        return loss

    return _accumulating(micro_step, accumulated)


def _accumulating(micro_step, accumulated):
    """Stage 2's micro-batch loop, (micro-batches, scale) -> (mean loss, this process's share of
    the mean gradients): zeroes `accumulated` (the shares), then for each of the k
    micro-batches in turn runs micro_step(micro-batch as [1, ...], scale / k) -> loss, which
    adds that micro-batch's shares into it. 1/k goes into the loss scale, as in
    step.make_gradients."""

    @tf.function
    def shared(micro_batches, scale):
        for a in accumulated:
            a.assign(tf.zeros_like(a))
        loss, k = tf.constant(0.0), tf.cast(tf.shape(micro_batches)[0], tf.float32)
        for j in tf.range(tf.shape(micro_batches)[0]):
            # One micro-batch at a time: Horovod names a collective after its op, and two
            # iterations in flight at once would present the same names twice.
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            loss += micro_step(micro_batches[j:j + 1], scale / k)
        return loss / k, [a.read_value() for a in accumulated]

    return shared


def _groups(sizes, limit):
    """Consecutive indices of `sizes` in groups of at most `limit` in all (a larger size alone)."""
    groups, total = [], limit
    for i, size in enumerate(sizes):
        if total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups
