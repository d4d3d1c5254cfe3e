"""The LLaMA model: keras-hub's LlamaBackbone under a LlamaCausalLM head, from ModelConfig.

The model knows nothing about processes or devices; replicas.py, distributed.py and step.py
apply those.
"""

import keras
import keras_hub

from hvd_llama import compat

# train.precision -> Keras dtype policy. Mixed policies compute in 16 bits and keep the
# variables (the master weights the optimizer updates) in float32.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def build(mc, seed, precision="float32", remat=False):
    """A freshly initialised LlamaCausalLM (no preprocessor: it takes token ids)."""
    model = causal_lm(backbone(mc, seed, precision))
    if remat:
        recompute_blocks(model)
    return model


def backbone(mc, seed, precision="float32"):
    """keras-hub's LlamaBackbone for ModelConfig mc, its weights drawn from `seed`."""
    keras.utils.set_random_seed(seed)
    return keras_hub.models.LlamaBackbone(
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


def causal_lm(backbone):
    """The language model over a backbone: its logits come from the token embedding, reversed
    (tied) or its own output matrix."""
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def recompute_blocks(model):
    """train.remat: each decoder block keeps only its input for the backward pass, and runs
    again there (tf.recompute_grad: keras.RematScope fails here, compat.py)."""
    for block in model.backbone.transformer_layers:
        compat.recompute_in_backward(block)


def weight_layers(model):
    """The layers of a LlamaCausalLM whose calls use all its trainable weights, each call
    using its own: the token embedding (also the output projection), the decoder blocks and
    the final norm."""
    backbone = model.backbone
    return [backbone.token_embedding, *backbone.transformer_layers, backbone.layer_norm]
