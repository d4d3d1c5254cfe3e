"""The LLaMA model: keras-hub's LlamaBackbone under a LlamaCausalLM head, from ModelConfig.

The model knows nothing about processes or devices; distributed.py and trainer.py apply those.
"""

import keras
import keras_hub


def build(mc, seed):
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
    )
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
