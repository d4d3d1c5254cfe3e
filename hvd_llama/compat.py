"""Every hook into private or version-pinned behaviour of TensorFlow, Keras and keras-hub.

Written against tensorflow 2.21, keras 3.15 and keras-hub 0.32 (setup.cfg pins them). When
upgrading any of them, read this list and run tests/test_compat.py: each entry has a test of
the upstream behaviour it relies on, which fails when that behaviour changes.

Hooks (the function here: who calls it, and what it relies on)
- subclass_in_place: distributed.DistributedOptimizer, update_in_turn. An optimizer's
  class becomes a subclass of itself, so Keras 3's single gradient entry, `apply`, is wrapped
  with no rebuild.
- update_in_turn: zero.ShardedOptimizer. Keras 3 optimizers clip in the private
  `_clip_gradients` and decay in `_apply_weight_decay`, both called by `apply` on all
  variables before `update_step` runs per variable; both are moved into `update_step` on
  the instance, so that global-norm clipping uses a norm computed elsewhere and each
  variable's update waits for the one before.
- adam_moments: checkpoint (saving and restoring AdamW's moments by the name of their
  variable). Keras 3's Adam keeps them in the private lists `_momentums` and `_velocities`,
  in the order of the variables it was built with.
- tf_variables: distributed.broadcast_variables, zero.ShardedOptimizer,
  zero.gathered_gradients, zero3.build. Keras 3 keeps a variable's state in the
  tf.Variable at `.value`; Horovod's ops take only tf.Variables.
- recompute_in_backward: model.build (train.remat). A decoder block's `call` replaced on the
  instance by a tf.recompute_grad wrapper; keras.RematScope fails on keras-hub in graph mode.
- rows: zero.ShardedOptimizer, zero3.build. A leading-rows slice of a TF tensor is a view of
  its buffer, which a variable made or assigned from it keeps alive whole.
- reduce_in_backward: zero.stream_gradients (dist.zero=2). A layer's `call` replaced on the
  instance by a tf.custom_gradient wrapper whose backward pass reduce-scatters the layer's
  weight gradients as soon as they exist (and may hold back its input's gradient).
- build_unallocated: zero3.build (dist.zero=3). Keras defers a variable created inside a
  StatelessScope: its private `_initializer` is kept and nothing is allocated, unless a later
  StatelessScope's exit allocates every deferred variable (a private global list).
- call_with_weights: zero3.build. A layer's `call` replaced on the instance by one that runs
  it, on an input and inside a StatelessScope mapping the weights that call reads to tensors,
  both given at each call; an untied ReversibleEmbedding's lookup reads only `embeddings`
  and its output projection (reverse=True) only `reverse_embeddings`.
- build_cache: generate.make_generate. keras-hub's private prefill, LlamaCausalLM._build_cache.
- index_shuffle: data.sequence_ids. The raw RandomIndexShuffle op: the public
  tf.random.experimental.index_shuffle mangles a batch of seeds.
- batch_mean: replicas.mean. `strategy.extended.batch_reduce_to`: one batched all-reduce.
- tie_embeddings_in_preset: convert.export_keras_hub. keras-hub leaves tie_word_embeddings
  out of a preset's config.json.
- tied_embeddings: convert.model_config_from_keras_hub. For the same reason it is read from
  the backbone's attribute, not from get_config().

Behaviour avoided rather than hooked (nothing to call here; tests/test_compat.py pins the why)
- step.token_loss is a plain mean, not a Keras loss class: under a tf.distribute strategy with
  several replicas those multiply the loss by 1/replicas (they expect a sum over replicas, and
  replicas.mean averages).
- step.token_loss passes an int32 padding mask, the dtype keras-hub's Llama declares: a bool
  one breaks under MirroredStrategy (AddN on bool).

TensorFlow is imported inside the functions (data.py's CLI imports this module and must not
load it), and Horovod never (distributed.py is the only module that imports it).
"""

import json
import os


# Keras 3 optimizers are plain Python objects whose gradients all enter through `apply` (its
# apply_gradients and model.fit call it): assigning __class__ keeps every setting they hold.
def subclass_in_place(obj, mixin, prefix):
    """Make `obj` an instance of a new class, prefix + its class's name, with bases
    (mixin, its class); returns obj."""
    base = type(obj)
    obj.__class__ = type(f"{prefix}{base.__name__}", (mixin, base), {})
    return obj


# Keras 3.15: apply() -> _backend_apply_gradients() -> _clip_gradients(grads) (after a
# LossScaleOptimizer has unscaled them), _apply_weight_decay(all variables), then
# update_step(gradient, variable, learning_rate) per variable, in the variables' order.
def update_in_turn(optimizer, norm):
    """Make `optimizer` clip by the global norm norm() (a tensor, evaluated when it clips)
    instead of the norm of the gradients it is given, and decay, clip and update one variable
    after another; returns it. Keras clips every gradient, then decays every variable, then
    updates; in a graph nothing orders those ops, and TensorFlow may run all the clipping
    first: where the gradients are read from variables (ZeRO's accumulators), a second copy of
    all of them. In turn, the temporaries are one variable's."""
    import tensorflow as tf
    # Per device: under a mirrored strategy update_step runs for each device's copy, and the
    # devices' updates may run side by side. A plain dict: not an attribute Keras tracks.
    updated = {}

    class InTurn:
        def _clip_gradients(self, grads):  # each is clipped in its update_step
            updated.clear()  # a new apply (or trace): nothing to wait for
            return grads

        def _apply_weight_decay(self, variables):  # each is decayed in its update_step
            pass

        def update_step(self, gradient, variable, learning_rate):
            with tf.control_dependencies(updated.get(variable.device, [])):
                if self.global_clipnorm:
                    given, clip = norm(), self.global_clipnorm
                    # clip_by_global_norm's arithmetic: NaN for a non-finite norm.
                    gradient = gradient * (clip * tf.minimum(1.0 / given, 1.0 / clip)
                                           + (given - given))
                else:
                    gradient = tf.identity(gradient)
                if self.weight_decay is not None and self._use_weight_decay(variable):
                    # Keras's own decay (its TensorFlow backend's arithmetic).
                    variable.assign_sub(variable * tf.cast(self.weight_decay, variable.dtype)
                                        * tf.cast(learning_rate, variable.dtype))
            super().update_step(gradient, variable, learning_rate)
            # Read after the update (a function orders a variable's ops as written).
            updated[variable.device] = [variable.read_value()]

    return subclass_in_place(optimizer, InTurn, "InTurn")


# Keras 3.15's Adam/AdamW: build() fills _momentums and _velocities, one per variable, in the
# order of the list it was built with; they have no public accessor but optimizer.variables.
def adam_moments(optimizer):
    """[(first moment, second moment)] of a built Keras Adam/AdamW, in its variables' order."""
    return list(zip(optimizer._momentums, optimizer._velocities))


# Keras 3 on TensorFlow keeps a variable's state in a tf.Variable at `.value` (a
# MirroredVariable under a strategy); Horovod's TF ops accept nothing else.
def tf_variables(variables):
    """The tf.Variable behind each Keras 3 variable; tf.Variables pass through."""
    import tensorflow as tf
    return [v.value if hasattr(v, "value") and not isinstance(v, tf.Variable) else v
            for v in variables]


# TF 2.21: slicing a tensor's leading rows returns a view of its buffer, and a variable created
# or assigned from that view keeps the whole buffer alive (all of a weight for 1/N of its rows).
def rows(tensor, start, stop):
    """A copy of rows start:stop of `tensor` in a buffer of their own."""
    import tensorflow as tf
    return tf.raw_ops.DeepCopy(x=tensor[start:stop])


# keras-hub 0.32's decoder blocks are called with (sequence, decoder_padding_mask=,
# training=) and, with a KV cache, self_attention_cache*=; TF 2.21's tf.recompute_grad takes
# positional arguments only in graph mode, which is also why keras.RematScope fails there.
def recompute_in_backward(block):
    """Make a decoder block keep only its input for the backward pass and recompute the rest
    there (activation recomputation, per block), by replacing its instance's `call`.

    The padding mask is bound by position for tf.recompute_grad. With a KV cache (generation)
    there is no backward pass, and the block runs as written.
    """
    import tensorflow as tf
    call = block.call

    def block_call(decoder_sequence, decoder_padding_mask=None, training=None, **cache):
        if decoder_padding_mask is None or any(v is not None for v in cache.values()):
            return call(decoder_sequence, decoder_padding_mask=decoder_padding_mask,
                        training=training, **cache)
        recompute = tf.recompute_grad(
            lambda x, mask: call(x, decoder_padding_mask=mask, training=training))
        return recompute(decoder_sequence, decoder_padding_mask)

    block.call = block_call


# Keras 3.15 runs a layer's instance `call` from __call__ (inside its autocast scope); TF 2.21's
# tf.custom_gradient in graph mode passes the grad function the variables read in the forward
# and takes None as their gradients.
def reduce_in_backward(layer, sink, active):
    """Make a layer hand its weights' gradients to sink(weights, gradients, dx) in its backward
    pass (those this call used; the tape gets None for them), which returns the gradient of
    the layer's input to pass on in place of dx (None for token ids), by replacing its
    instance's `call`, while active() is true when the call is traced. Otherwise the layer
    runs as written."""
    import tensorflow as tf
    call, weights = layer.call, layer.trainable_variables

    def reducing_call(x, *args, **kwargs):
        if not active():
            return call(x, *args, **kwargs)

        @tf.custom_gradient
        def forward(x):
            with tf.GradientTape() as tape:
                if x.dtype.is_floating:  # not the token ids
                    tape.watch(x)
                y = call(x, *args, **kwargs)

            def backward(dy, variables=None):
                dx, *grads = tape.gradient(y, [x, *weights], output_gradients=dy)
                used = [(w, tf.convert_to_tensor(g)) for w, g in zip(weights, grads)
                        if g is not None]  # an untied embedding's two calls use one each
                dx = sink([w for w, _ in used], [g for _, g in used], dx)
                return dx, [None] * len(variables)
            return y, backward
        return forward(x)

    layer.call = reducing_call


# Keras 3.15: a variable created inside keras.StatelessScope(initialize_variables=False) keeps
# its initializer in the private `_initializer`, allocates nothing, and joins the private
# global list "uninitialized_variables" that a default StatelessScope allocates on exit. Its
# `value` is the tensor a StatelessScope maps it to, and outside one its initializer's output
# (which keras-hub's model construction reads, tracing the backbone symbolically). A task
# model cannot be built inside one: keras-hub's compiles, and Keras's optimizer creates a
# variable from a value.
def build_unallocated(make_backbone, make_model):
    """(make_model(make_backbone()), {id(variable): fn() -> its initial value}) with none of
    the backbone's variables ever allocated; reading one later outside a StatelessScope that
    maps it raises."""
    import functools
    import keras
    from keras.src.backend.common import global_state
    with keras.StatelessScope(initialize_variables=False):
        backbone = make_backbone()
    global_state.set_global_attribute("uninitialized_variables", [])
    model = make_model(backbone)
    initial = {}
    for v in backbone.variables:
        initial[id(v)] = functools.partial(v._initializer, v.shape, dtype=v.dtype)

        def unmapped(*_, path=v.path, **__):
            raise RuntimeError(f"{path}: a dist.zero=3 weight read outside its layer's gather")
        v._initializer = unmapped
    return model, initial


# Keras 3.15 reads a variable's value through its `value` property, which looks the variable up
# in the active StatelessScope's mapping first (and autocasts it as usual).
def call_with_weights(layer, weights):
    """Make a layer run its call on the first argument x and with the trainable variables that
    call reads read as the tensors of weights(x, variables) -> (x to call with, tensors in the
    variables' order), by replacing its instance's `call`. A variable the call reads that is
    not mapped reads as itself (under zero3.build, unallocated: an error)."""
    import keras
    call = layer.call

    def mapped_call(x, *args, **kwargs):
        variables = layer.trainable_variables
        if isinstance(layer, keras.layers.ReversibleEmbedding) and not layer.tie_weights:
            variables = [layer.reverse_embeddings if kwargs.get("reverse") else layer.embeddings]
        x, tensors = weights(x, variables)
        with keras.StatelessScope(state_mapping=list(zip(variables, tensors)),
                                  initialize_variables=False):
            return call(x, *args, **kwargs)

    layer.call = mapped_call


# keras-hub 0.32 has no public prefill: the private LlamaCausalLM._build_cache(token_ids)
# runs the whole buffer once and returns (hidden states, cache [b, layers, 2, len, kv, dim]).
def build_cache(model, token_ids):
    """(final hidden states [b, len, hidden], KV cache) of a LlamaCausalLM over token_ids."""
    return model._build_cache(token_ids)


# TF 2.21's tf.random.experimental.index_shuffle pads a batch of [n, 2] seeds along the batch
# axis instead of padding each seed to 3, so only the raw op shuffles with a seed per index.
def index_shuffle(index, seed, max_index):
    """The position of each `index` in the permutation of [0, max_index] that its row of
    `seed` (shape [n, 3], or [3] for all) selects."""
    import tensorflow as tf
    return tf.raw_ops.RandomIndexShuffle(index=index, seed=seed, max_index=max_index)


# tf.distribute's batched reduce is on StrategyExtended (`strategy.extended`): the strategy's
# own reduce() all-reduces one tensor at a time.
def batch_mean(strategy, per_replica):
    """The replicas' mean of each per-replica value in the list, in one batched all-reduce;
    each result is mirrored over the strategy's devices."""
    import tensorflow as tf
    return strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.MEAN,
                                             [(v, v) for v in per_replica])


# keras-hub 0.32's LlamaBackbone.get_config leaves tie_word_embeddings out, so the backbone's
# attribute is the only place to read it.
def tied_embeddings(backbone):
    """Whether a keras-hub LlamaBackbone shares its input and output embeddings."""
    return bool(backbone.tie_word_embeddings)


# For the same reason keras-hub's own from_preset would rebuild a tied model untied and fail
# to load the weights.
def tie_embeddings_in_preset(preset_dir):
    """Mark the backbone in a keras-hub preset's config.json as having tied embeddings."""
    path = os.path.join(preset_dir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved["config"]["tie_word_embeddings"] = True
    with open(path, "w") as f:
        json.dump(saved, f, indent=4)
