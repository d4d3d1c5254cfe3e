"""What a run will cost, from the config alone: no weights are built (a 7B model does not fit a
laptop). `python -m hvd_llama.train --config X --dry-run` prints this; training prints it at
start and refuses a run whose memory estimate exceeds what the host has.
"""

import os

from hvd_llama.errors import UserError

GIB = 1 << 30


def param_count(mc):
    """Exact parameter count of keras-hub's LlamaCausalLM (untied input/output embeddings)."""
    d, head_dim = mc.hidden_dim, mc.hidden_dim // mc.num_query_heads
    attention = 2 * d * d + 2 * d * head_dim * mc.num_key_value_heads  # q, o; k, v
    mlp = 3 * d * mc.intermediate_dim  # SwiGLU: gate, up, down
    block = attention + mlp + 2 * d  # + two RMSNorm scales
    return 2 * mc.vocab_size * d + mc.num_layers * block + d  # + the final RMSNorm


def flops_per_token(mc, seq_len):
    """Training FLOPs per token: 6 x the parameters a token passes through (all but the input
    embedding, a lookup) for forward + backward matmuls, plus 12 x layers x d x seq_len for the
    attention scores and their use (PaLM's accounting, causal mask not discounted)."""
    dense = param_count(mc) - mc.vocab_size * mc.hidden_dim
    return 6 * dense + 12 * mc.num_layers * mc.hidden_dim * seq_len


def memory_per_process(c):
    """Estimated bytes per process, fp32: weights, gradients, AdamW's two moments, activations.

    Activations follow Korthikanti et al. (2022): s*b*d*(34 + 5*heads*s/d) bytes per layer at
    16 bits, doubled for fp32, plus the fp32 logits and their gradient."""
    mc, b, s = c.model, c.train.batch_size, c.data.seq_len
    n = param_count(mc)
    per_layer = s * b * mc.hidden_dim * (34 + 5 * mc.num_query_heads * s / mc.hidden_dim) * 2
    logits = 2 * b * s * mc.vocab_size * 4
    return {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n,
            "activations": int(mc.num_layers * per_layer + logits)}


def describe(c, processes):
    """The dry-run figures as printable lines."""
    n = param_count(c.model)
    global_batch = c.train.batch_size * processes
    tokens_per_step = global_batch * c.data.seq_len
    mem = memory_per_process(c)
    flops = flops_per_token(c.model, c.data.seq_len)
    return [
        f"parameters: {n:,} ({n / 1e9:.2f}B)" if n >= 1e9 else
        f"parameters: {n:,} ({n / 1e6:.1f}M)",
        f"training FLOPs per token: {flops / 1e9:.2f} GFLOP "
        f"({flops * tokens_per_step / 1e15:.2f} PFLOP per step)",
        f"global batch: {c.train.batch_size} seq/process x {processes} process(es) = "
        f"{global_batch:,} sequences = {tokens_per_step:,} tokens",
        "memory per process (fp32): " + ", ".join(
            f"{k} {v / GIB:.2f} GiB" for k, v in mem.items())
        + f"; total {sum(mem.values()) / GIB:.2f} GiB",
        f"run: {c.train.steps:,} steps = {c.train.steps * tokens_per_step:,} tokens",
    ]


def check_fits(c, local_processes):
    """Refuse, before any weight exists, a CPU run whose estimate for this host's processes
    exceeds its free memory (a GPU's limit is the GPU's, which TF reports only once allocated)."""
    need = sum(memory_per_process(c).values()) * local_processes
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        raise UserError(f"a {param_count(c.model) / 1e9:.1f}B-parameter model at "
                        f"train.batch_size={c.train.batch_size}, data.seq_len={c.data.seq_len} "
                        f"needs about {need / GIB:.1f} GiB for {local_processes} process(es) on "
                        f"this host (see --dry-run) but it has {free / GIB:.1f} GiB free")
