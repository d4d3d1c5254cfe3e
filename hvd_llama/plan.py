"""What a run will cost, from the config alone: no weights are built (a 7B model does not fit a
laptop). `python -m hvd_llama.train --config X --dry-run` prints this; training prints it at
start and refuses a run whose memory estimate exceeds what the host has.
"""

import os

from hvd_llama.errors import UserError

GIB = 1 << 30


def param_count(mc):
    """Exact parameter count of keras-hub's LlamaCausalLM."""
    d, head_dim = mc.hidden_dim, mc.hidden_dim // mc.num_query_heads
    attention = 2 * d * d + 2 * d * head_dim * mc.num_key_value_heads  # q, o; k, v
    mlp = 3 * d * mc.intermediate_dim  # SwiGLU: gate, up, down
    block = attention + mlp + 2 * d  # + two RMSNorm scales
    embeddings = (1 if mc.tie_word_embeddings else 2) * mc.vocab_size * d
    return embeddings + mc.num_layers * block + d  # + the final RMSNorm


def flops_per_token(mc, seq_len):
    """Training FLOPs per token: 6 x the parameters a token passes through (all but the input
    embedding, a lookup) for forward + backward matmuls, plus 12 x layers x d x seq_len for the
    attention scores and their use (PaLM's accounting, causal mask not discounted)."""
    dense = param_count(mc) - (0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_dim)
    return 6 * dense + 12 * mc.num_layers * mc.hidden_dim * seq_len


def memory_per_replica(c, layout):
    """Estimated bytes per replica (one device; one process under dist.strategy=horovod) of
    Layout `layout`: fp32 weights, gradients and AdamW's two moments (mixed
    precision keeps float32 master weights and casts per op), plus activations.

    Activations follow Korthikanti et al. (2022): s*b*d*(34 + 5*heads*s/d) bytes per layer at
    16 bits (doubled for float32) for one micro-batch, plus the float32 logits and their
    gradient. With train.remat only each block's input is kept, plus one block recomputed."""
    mc, s = c.model, c.data.seq_len
    b = layout.micro
    n = param_count(mc)
    width = 4 if c.train.precision == "float32" else 2
    block = s * b * mc.hidden_dim * (34 + 5 * mc.num_query_heads * s / mc.hidden_dim) * width / 2
    blocks = (mc.num_layers * s * b * mc.hidden_dim * width + block) if c.train.remat \
        else mc.num_layers * block
    logits = 2 * b * s * mc.vocab_size * 4
    return {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n,
            "activations": int(blocks + logits)}


def describe(c, layout):
    """The dry-run figures as printable lines, for Layout `layout`."""
    n = param_count(c.model)
    tokens_per_step = layout.tokens_per_step
    mem = memory_per_replica(c, layout)
    flops = flops_per_token(c.model, c.data.seq_len)
    return [
        f"parameters: {n:,} ({n / 1e9:.2f}B)" if n >= 1e9 else
        f"parameters: {n:,} ({n / 1e6:.1f}M)",
        f"training FLOPs per token: {flops / 1e9:.2f} GFLOP "
        f"({flops * tokens_per_step / 1e15:.2f} PFLOP per step)",
        layout.describe(),
        f"memory per {'device' if layout.devices > 1 else 'process'} ({c.train.precision}"
        f"{', remat' if c.train.remat else ''}): "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in mem.items())
        + f"; total {sum(mem.values()) / GIB:.2f} GiB",
        f"run: {c.train.steps:,} steps = {c.train.steps * tokens_per_step:,} tokens",
    ]


def check_fits(c, layout, local_replicas):
    """Refuse, before any weight exists, a CPU run whose estimate for this host's replicas
    (each a copy of the weights, even as logical CPU devices) exceeds its free memory (a GPU's
    limit is the GPU's, which TF reports only once allocated)."""
    need = sum(memory_per_replica(c, layout).values()) * local_replicas
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        raise UserError(f"a {param_count(c.model) / 1e9:.1f}B-parameter model at "
                        f"micro-batch {layout.micro}, data.seq_len={c.data.seq_len} "
                        f"needs about {need / GIB:.1f} GiB for {local_replicas} replica(s) on "
                        f"this host (see --dry-run) but it has {free / GIB:.1f} GiB free")
