"""ZeRO stage 3 (dist.zero=3): every process stores only its share of each weight.

The model is keras-hub's LlamaCausalLM, built with its variables never allocated
(compat.build_unallocated). The only copy of the weights is the float32 shares that
zero.ShardedOptimizer updates: this process's rows (Layout.share) of each. Every layer with
weights (the token embedding, which is also the output projection when tied, each decoder
block, the final norm) runs its own call on whole weights all-gathered from the shares just
before (compat.call_with_weights), and lets them go after. The all-gather's gradient
reduce-scatters the whole weights' gradients back to the shares, averaged over processes
(distributed.allgather_weights), so the backward pass yields the shares' gradients.

    forward, layer by layer:  shares ──all-gather──▶ whole weights ──▶ the layer's call
    backward:                 the layer's weight gradients ──reduce-scatter──▶ the shares'

With train.remat each block keeps only its input and, in the backward pass, gathers its weights
again and recomputes: the whole weights alive are those of the layer computing and of the next
one, whose all-gather is issued when this one starts (dist.prefetch) rather than when it ends.
Without remat the backward pass keeps every layer's whole weights from the forward pass.
"""

import keras
import tensorflow as tf

from hvd_llama import compat, distributed as dist, model as model_lib


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
        shares.append(keras.Variable(initial[id(v)]()[a:b], name=f"share_{i}"))
    share_of = {id(v): s for v, s in zip(model.trainable_variables, shares)}
    last_input = _LastInput()
    for layer in model_lib.weight_layers(model):
        compat.call_with_weights(layer, _gather(
            [share_of[id(w)] for w in layer.trainable_variables],
            [w.shape for w in layer.trainable_variables], last_input, c.dist.prefetch,
            c.dist.compression))
    if c.train.remat:  # after the gathering: a block's recomputation gathers again
        model_lib.recompute_blocks(model)
    return model, shares


def _gather(shares, shapes, last_input, prefetch, compression):
    """A layer's weights(x): its whole weights, all-gathered once x (the layer's input) exists,
    or with prefetch once the input of the layer called before it does."""
    # The tf.Variables, float32: read through Keras inside the layer's call, a mixed
    # precision policy would cast them to 16 bits first (and Horovod gathers no bfloat16).
    shares = compat.tf_variables(shares)

    def weights(x):
        previous = last_input.swap(x)
        after = previous if prefetch and previous is not None else x
        with tf.control_dependencies([after]):
            return dist.allgather_weights(shares, shapes, compression)
    return weights


class _LastInput:
    """The input of the layer whose weights were gathered last, in the graph being traced."""

    def __init__(self):
        self.last = None

    def swap(self, x):
        last, self.last = self.last, x
        same_graph = last is not None and getattr(last, "graph", None) is getattr(x, "graph", 0)
        return last if same_graph else None
