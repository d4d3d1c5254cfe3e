"""Shared by the benchmarks: time optimizer steps of a config on one process."""

import time

import numpy as np

from hvd_llama import distributed as dist, model as model_lib, optim, trainer


def train_tokens_per_s(c, steps, tokens=None, jit_compile=False):
    """Tokens/s of `steps` optimizer steps of Config `c` in this process, after one untimed
    step (tracing). `tokens`: int32 [grad_accum, micro-batch, seq_len + 1]; random if None."""
    if tokens is None:
        shape = (c.train.grad_accum, c.train.global_batch // c.train.grad_accum,
                 c.data.seq_len + 1)
        tokens = np.random.default_rng(0).integers(0, c.model.vocab_size, shape, np.int32)
    model = model_lib.build(c.model, c.train.seed, c.train.precision, c.train.remat)
    opt = dist.DistributedOptimizer(
        optim.build(c.train, optim.schedule(c.train), model.trainable_variables))
    step = trainer.make_train_step(model, opt, jit_compile)
    float(step(tokens)[0])
    start = time.perf_counter()
    for _ in range(steps):
        float(step(tokens)[0])  # wait for the step to finish
    return steps * tokens.shape[0] * tokens.shape[1] * c.data.seq_len / (
        time.perf_counter() - start)
