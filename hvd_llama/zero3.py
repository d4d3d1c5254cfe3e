"""ZeRO stage 3 (dist.zero=3): every process stores only its share of each weight.

The model is keras-hub's LlamaCausalLM, built with its variables never allocated
(compat.build_unallocated). The only copy of the weights is the float32 shares that
zero.ShardedOptimizer updates: this process's rows (Layout.share) of each. Every layer with
weights (the token embedding, each decoder block, the final norm) runs its own call on the
whole weights that call reads, all-gathered from the shares just before
(compat.call_with_weights), and lets them go after: the embedding's lookup gathers its input
matrix, the output projection the output matrix (untied) or the input one again (tied). The
all-gather's gradient reduce-scatters the whole weights' gradients back to the shares,
averaged over processes (_gather), so the backward pass yields the shares' gradients.

    forward, layer by layer:  shares ──all-gather──▶ whole weights ──▶ the layer's call
    backward:                 the layer's weight gradients ──reduce-scatter──▶ the shares'

With train.remat each block keeps only its input and, in the backward pass, gathers its weights
again and recomputes: the whole weights alive are those of the layer computing and of the next
one, whose all-gather is issued when this one starts (dist.prefetch) rather than when it ends.
Without remat the backward pass keeps every layer's whole weights from the forward pass.
"""

import keras
import tensorflow as tf

from hvd_llama import compat, distributed as dist, model as model_lib, zero


def build(c, layout):
    """(model, shares) for Config c on Layout `layout`: the model, unallocated, its layers
    gathering their weights; the shares, one float32 keras.Variable of this process's rows of
    each of model.trainable_variables, initialised as the model would initialise it."""
    model, initial = compat.build_unallocated(
        lambda: model_lib.backbone(c.model, c.train.seed, c.train.precision),
        model_lib.causal_lm)
    shares = []
    for i, v in enumerate(model.trainable_variables):
        a, b = layout.share(v.shape[0])
        # Trainable: tf.recompute_grad (train.remat) differentiates only by the trainable
        # variables its function reads.
        shares.append(keras.Variable(compat.rows(initial[id(v)](), a, b),
                                     name=f"share_{i}"))
    # The tf.Variables, float32, taken here: read through Keras inside a layer's call, a mixed
    # precision policy would cast them to 16 bits first (and Horovod gathers no bfloat16).
    share_of = {id(v): s for v, s in zip(model.trainable_variables,
                                         compat.tf_variables(shares))}
    order = zero.LayerOrder()

    def weights(x, variables):  # what a layer's call reads, gathered for that call
        return _gather([share_of[id(w)] for w in variables], [w.shape for w in variables],
                       order, c.dist.prefetch, c.dist.compression)(x)

    for layer in model_lib.weight_layers(model):
        compat.call_with_weights(layer, weights)
    if c.train.remat:  # after the gathering: a block's recomputation gathers again
        model_lib.recompute_blocks(model)
    return model, shares


def _gather(shares, shapes, order, prefetch, compression):
    """A layer call's weights(x) -> (x, the whole weights of `shares`, float32 tf.Variables):
    all-gathered once x (the layer's input) exists, or with prefetch once the input of the
    layer called before it does. Their gradient reduce-scatters the whole weights' gradients
    into the shares' (averaged over the processes, where Horovod's own gradient of allgather
    allreduces them whole), and holds back x's gradient, with which the backward pass goes on
    to the layer below, until the layer above has reduce-scattered: where the collectives are
    slower than the compute, whole gradients waiting for them would otherwise pile up (at
    most two layers' exist)."""

    @tf.custom_gradient
    def gather(x, *shares):
        wholes = [tf.ensure_shape(w, s) for w, s in zip(dist.allgather_shares(shares), shapes)]

        def grad(dx, *upstream):
            grads = dist.reducescatter_gradients(
                [tf.convert_to_tensor(g) for g in upstream], compression)
            return (order.hold(dx, grads), *grads)
        return (tf.identity(x), *wholes), grad

    def weights(x):
        previous = order.swap_input(x)
        after = previous if prefetch and previous is not None else x
        with tf.control_dependencies([after]):
            if x.dtype.is_floating:
                x, *wholes = gather(x, *shares)
                return x, wholes
            # Token ids have no gradient to hold back: the embedding's lookup, first forward
            # and last backward.
            return x, gather(tf.zeros([]), *shares)[1:]
    return weights
