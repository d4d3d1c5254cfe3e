"""The LLaMA model: keras-hub's LlamaBackbone under a LlamaCausalLM head, from ModelConfig.

The model knows nothing about processes or devices; distributed.py and trainer.py apply those.
"""

import keras
import keras_hub
import tensorflow as tf

# train.precision -> Keras dtype policy. Mixed policies compute in 16 bits and keep the
# variables (the master weights the optimizer updates) in float32.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def build(mc, seed, precision="float32", remat=False):
    """A freshly initialised LlamaCausalLM (no preprocessor: it takes token ids)."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=mc.vocab_size,
        num_layers=mc.num_layers,
        num_query_heads=mc.num_query_heads,
        num_key_value_heads=mc.num_key_value_heads,
        hidden_dim=mc.hidden_dim,
        intermediate_dim=mc.intermediate_dim,
        rope_max_wavelength=mc.rope_max_wavelength,
        layer_norm_epsilon=mc.layer_norm_epsilon,
        tie_word_embeddings=mc.tie_word_embeddings,
        dtype=POLICIES[precision],
    )
    if remat:
        for block in backbone.transformer_layers:
            block.call = _recomputed(block.call)
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def _recomputed(call):
    """A decoder block's `call` that keeps only the block's input for the backward pass and
    recomputes the rest there (activation recomputation, per block).

    keras.RematScope cannot do this for keras-hub on TensorFlow: in graph mode the
    custom_gradient beneath tf.recompute_grad takes positional arguments only, so the padding
    mask is bound by position here. With a KV cache (generation) there is no backward pass,
    and the block runs as written.
    """
    def block_call(decoder_sequence, decoder_padding_mask=None, training=None, **cache):
        if decoder_padding_mask is None or any(v is not None for v in cache.values()):
            return call(decoder_sequence, decoder_padding_mask=decoder_padding_mask,
                        training=training, **cache)
        recompute = tf.recompute_grad(
            lambda x, mask: call(x, decoder_padding_mask=mask, training=training))
        return recompute(decoder_sequence, decoder_padding_mask)
    return block_call
