"""AdamW with LLaMA's schedule: linear warmup, then cosine decay to 10% of the peak.

For float16, a dynamic loss scale wraps it (keras.optimizers.LossScaleOptimizer): the loss is
multiplied by the scale before the backward pass and the gradients divided by it before the
update; a step whose gradients overflow is skipped and the scale halved.
"""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="hvd_llama")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, peak, warmup_steps, total_steps, final_fraction=0.1):
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_fraction = final_fraction

    def __call__(self, step):
        step = ops.cast(step, "float32")
        # step + 1: the first update already moves the weights.
        warm = self.peak * (step + 1.0) / max(self.warmup_steps, 1)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
        decayed = self.peak * (self.final_fraction + (1.0 - self.final_fraction) * cosine)
        return ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "final_fraction": self.final_fraction}


def schedule(tc):
    """The learning rate of optimizer step i (0-based) for TrainConfig `tc`."""
    return WarmupCosine(tc.learning_rate, tc.warmup_steps, tc.steps)


def build(tc, lr_schedule, variables, like=None):
    """The paper's AdamW (beta2 0.95) for TrainConfig `tc` over `variables`, before Horovod
    wraps it. Norm scales and embeddings are left undecayed unless
    train.decay_norms_and_embeddings is set. `like`: the model variables that `variables`
    hold shares of (ZeRO), which decide that; default `variables` themselves."""
    optimizer = keras.optimizers.AdamW(
        learning_rate=lr_schedule,
        beta_1=0.9,
        beta_2=0.95,
        epsilon=1e-8,
        weight_decay=tc.weight_decay,
        global_clipnorm=tc.clip_norm or None,
    )
    if not tc.decay_norms_and_embeddings:
        optimizer.exclude_from_weight_decay(
            var_list=[v for v, m in zip(variables, like or variables) if not decays_by_default(m)])
    if tc.precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def adamw(optimizer):
    """The AdamW of an optimizer from build(): itself, or the one a loss scale wraps."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer


def decays_by_default(variable):
    """True for the dense kernels (attention and MLP); False for RMSNorm scales (1-D) and the
    input and output embeddings."""
    return len(variable.shape) > 1 and "embedding" not in variable.path
