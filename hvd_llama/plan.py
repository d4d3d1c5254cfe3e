"""What a run will cost in memory, from the config alone: no weights are built (a 7B model does
not fit a laptop). `python -m hvd_llama.train --config X --dry-run` prints this for each ZeRO
stage (then traffic.py's bytes and step time); training prints it at start and refuses a run
whose estimate exceeds what the host or the GPU has, naming a stage and micro-batch that fit.
"""

import dataclasses
import os

from hvd_llama import hardware
from hvd_llama.errors import UserError

GIB = 1 << 30
STAGES = (0, 1, 2, 3)  # dist.zero


def block_params(mc):
    """Parameters of one decoder block."""
    d, head_dim = mc.hidden_dim, mc.hidden_dim // mc.num_query_heads
    attention = 2 * d * d + 2 * d * head_dim * mc.num_key_value_heads  # q, o; k, v
    mlp = 3 * d * mc.intermediate_dim  # SwiGLU: gate, up, down
    return attention + mlp + 2 * d  # + two RMSNorm scales


def param_count(mc):
    """Exact parameter count of keras-hub's LlamaCausalLM."""
    embeddings = (1 if mc.tie_word_embeddings else 2) * mc.vocab_size * mc.hidden_dim
    return embeddings + mc.num_layers * block_params(mc) + mc.hidden_dim  # + the final RMSNorm


def flops_per_token(mc, seq_len):
    """Training FLOPs per token: 6 x the parameters a token passes through (all but the input
    embedding, a lookup) for forward + backward matmuls, plus 12 x layers x d x seq_len for the
    attention scores and their use (PaLM's accounting, causal mask not discounted)."""
    dense = param_count(mc) - (0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_dim)
    return 6 * dense + 12 * mc.num_layers * mc.hidden_dim * seq_len


def memory_per_replica(c, layout):
    """Estimated bytes per replica (one device; one process under dist.strategy=horovod) of
    Layout `layout` at its ZeRO stage (layout.zero), for n parameters over N = layout.processes
    Horovod processes and k = layout.grad_accum micro-batches a step, at the peak of a step.
    All state is float32 (mixed precision keeps float32 weights and casts per op):
      weights     4n; from stage 1 also a copy of this process's share (n/N), which the
                  optimizer updates, and the whole tensors all-gathered from the shares
                  before they replace the weights; stage 3 that share and the whole weights
                  gathered at once (_weights)
      gradients   4n, and the collective's output beside them (stage 0 the allreduce's, 4n;
                  stage 1 the reduce-scatter's, 4n/N); with k > 1 a micro-batch's gradients
                  not yet added to them; from stage 2: the accumulated share 4n/N, and those
                  not yet reduce-scattered (_gradients). With N > 1 also Horovod's fusion
                  buffer (dist.fusion_threshold_mb), allocated at its first collective
      optimizer   AdamW's two moments, 8n; from stage 1 of the share only
    Under dist.strategy hybrid and mirrored every device holds all of this (the process's
    share of the optimizer state included): the figures are per device.

    Activations follow Korthikanti et al. (2022): s*b*d*(34 + 5*heads*s/d) bytes per layer at
    16 bits (doubled for float32) for one micro-batch, plus the float32 logits and their
    gradient. With train.remat only each block's input is kept, plus one block recomputed."""
    mc, s, b, zero = c.model, c.data.seq_len, layout.micro, layout.zero
    n = param_count(mc)
    share = -(-n // layout.processes)  # the first ranks hold a row more of some tensors
    gradients = _gradients(c, layout, n, share)
    width = 4 if c.train.precision == "float32" else 2
    block = s * b * mc.hidden_dim * (34 + 5 * mc.num_query_heads * s / mc.hidden_dim) * width / 2
    blocks = (mc.num_layers * s * b * mc.hidden_dim * width + block) if c.train.remat \
        else mc.num_layers * block
    logits = 2 * b * s * mc.vocab_size * 4
    return {"weights": _weights(c, layout, n, share), "gradients": gradients,
            "optimizer": 8 * (share if zero else n), "activations": int(blocks + logits)}


def compiles(c, layout, on_gpu):
    """Whether a run's forward and backward passes are compiled with XLA: train.jit_compile
    "true", or "auto" on GPUs below stage 2: compiled, stage 2's backward pass could not
    reduce-scatter each layer's gradients as it goes, nor stage 3's forward pass gather each
    layer's weights (config.py refuses "true" there). step.build decides by this."""
    return c.train.jit_compile == "true" or (
        c.train.jit_compile == "auto" and on_gpu and layout.zero < 2)


def streams(layout, compiled):
    """Whether the backward pass reduce-scatters each layer's gradients as it goes: always at
    stage 3 (the all-gathers' gradient), and at stage 2 with one device per process,
    uncompiled (zero.stream_gradients). The step decides by this."""
    return layout.zero == 3 or (layout.zero == 2 and layout.devices == 1 and not compiled)


def _weights(c, layout, n, share):
    """Bytes of weights alive at once. Stages 1-2: the weights, the share, and with N > 1 the
    whole tensors of one of ShardedOptimizer's all-gather groups (dist.fusion_threshold_mb of
    them, or a larger tensor alone; under dist.autotune Horovod fuses by its own threshold,
    the groups keep this one). At stage 3, the share and the whole weights gathered: with
    train.remat those of the layer computing, and of the next one with dist.prefetch (a block,
    and the larger of a block and an embedding matrix, as in _gradients); without remat every
    layer's, which the backward pass keeps from the forward pass."""
    if layout.zero == 0:
        return 4 * n
    if layout.zero < 3:
        mc = c.model
        largest = 4 * mc.hidden_dim * max(mc.vocab_size, mc.intermediate_dim)
        group = min(4 * n, max(c.dist.fusion_threshold_mb << 20, largest))
        return 4 * n + 4 * share + (group if layout.processes > 1 else 0)
    layers = _neighbours(c.model, 2 if c.dist.prefetch else 1)
    return 4 * share + 4 * (layers if c.train.remat else n)


def _neighbours(mc, count):
    """Parameters of the `count` (1 or 2) largest layers next to each other in the backward
    order (output embedding, final norm, blocks, input embedding): the largest of a block and
    an embedding matrix, and a block beside it."""
    block = block_params(mc)
    return max(block, mc.vocab_size * mc.hidden_dim) + (block if count == 2 else 0)


def _gradients(c, layout, n, share):
    """Bytes of gradients alive at once. Uncompiled, TensorFlow runs each layer's share of the
    backward pass as soon as its inputs are ready: a layer's gradients are reduce-scattered
    (streams) or added to the accumulator (k > 1) as they come, so about two layers' are in
    flight, one consumed while the next is computed. Compiled (planned for as on a GPU), a
    micro-batch's whole gradient comes at once, and so does the in-process mean over devices
    (hybrid). Below stage 2 the step's collective then takes the whole gradient, and its
    output exists beside it until the update."""
    two_layers = 4 * _neighbours(c.model, 2)
    compiled = compiles(c, layout, on_gpu=True)
    fusion = c.dist.fusion_threshold_mb << 20 if layout.processes > 1 else 0
    if layout.zero >= 2:
        return fusion + 4 * share + (two_layers if streams(layout, compiled) else 4 * n)
    micro_batch = 0 if layout.grad_accum == 1 else (
        4 * n if compiled or layout.devices > 1 else two_layers)
    output = 0 if layout.processes == 1 else 4 * (share if layout.zero else n)
    return fusion + 4 * n + max(micro_batch, output)


def _total(c, layout):
    return sum(memory_per_replica(c, layout).values())


def _alternatives(c, layout):
    """Layouts in the order a user would try them: this micro-batch at dist.zero=0, 1, 2; then
    stage 2 at smaller micro-batches (a larger train.grad_accum, dividing the sequences each
    replica reads a step); then stage 3, which gathers every layer's weights, at this
    micro-batch and the smaller ones; then the same on each power-of-two process count above
    this one (starting at the smallest train.grad_accum from this one up that divides), down
    to one sequence a replica. dist.strategy=mirrored runs one process and no ZeRO, so there
    only the micro-batch changes; hybrid goes up to stage 2."""
    top = {"horovod": 3, "hybrid": 2}.get(c.dist.strategy, 0)
    processes = layout.processes
    while layout.global_batch % (processes * layout.devices) == 0:
        per_replica = layout.global_batch // (processes * layout.devices)

        def micro_batches(zero):
            return [dataclasses.replace(layout, processes=processes, zero=zero, grad_accum=k,
                                        micro=per_replica // k)
                    for k in range(min(layout.grad_accum, per_replica), per_replica + 1)
                    if per_replica % k == 0]
        at = micro_batches(min(top, 2))
        yield from (dataclasses.replace(at[0], zero=zero) for zero in range(min(top, 2)))
        yield from at
        if top == 3:
            yield from micro_batches(3)
        if not top:
            return
        processes = 1 << processes.bit_length()  # the next power of two


def what_fits(c, layout, capacity):
    """(layout, words): the first of _alternatives(c, layout) whose estimate fits `capacity`
    bytes per device (None if none does), and that said as a change to the run. The dry run
    and check_fits both print the words."""
    found = next((x for x in _alternatives(c, layout) if _total(c, x) <= capacity), None)
    if found is None:
        weights = 4 * param_count(c.model)
        if weights > capacity and c.dist.strategy != "horovod":
            return None, (f"nothing fits, as the float32 weights alone are "
                          f"{weights / GIB:.1f} GiB (ZeRO stages 1-2 shard only gradients and "
                          "optimizer state; stage 3 needs dist.strategy=horovod)")
        if c.dist.strategy == "mirrored":
            return None, "no micro-batch fits (dist.strategy=mirrored: one process, no ZeRO)"
        return None, "no ZeRO stage, micro-batch or power-of-two process count fits"
    settings = (f"dist.zero={found.zero} with train.grad_accum={found.grad_accum} "
                f"(micro-batch {found.micro})")
    if found.processes != layout.processes:
        return found, (f"no stage fits on {layout.processes} process(es) at any micro-batch; "
                       f"{found.processes} processes at {settings} do")
    if found.micro != layout.micro:
        return found, f"no stage fits at micro-batch {layout.micro}; {settings} does"
    return found, f"dist.zero={found.zero} fits"


def fit_line(c, layout, gpu="", device_gib=0.0):
    """The dry run's fit verdict for `device_gib` GiB per device, else for GPU `gpu` (a key of
    hardware.GPUS)."""
    gib = device_gib or (gpu and hardware.GPUS[gpu].memory_gib)
    if not gib:
        return "fit: unknown without --gpu or --device-memory"
    found, words = what_fits(c, layout, gib * GIB)
    total = f" ({_total(c, found) / GIB:.1f} GiB)" if found else ""
    return (f"fit in {gib:g} GiB per device ({'--device-memory' if device_gib else gpu}): "
            f"{words}{total}")


def describe(c, layout):
    """The figures of Layout `layout` as printable lines: the startup banner's, and the head
    of the dry run. Memory is shown for every ZeRO stage, the run's marked."""
    n = param_count(c.model)
    tokens_per_step = layout.tokens_per_step
    flops = flops_per_token(c.model, c.data.seq_len)
    columns = {name: max(len(name), 7) + 2 for name in  # name: width
               ("weights", "gradients", "optimizer", "activations", "total")}
    lines = [
        f"parameters: {n:,} ({n / 1e9:.2f}B)" if n >= 1e9 else
        f"parameters: {n:,} ({n / 1e6:.1f}M)",
        f"training FLOPs per token: {flops / 1e9:.2f} GFLOP "
        f"({flops * tokens_per_step / 1e15:.2f} PFLOP per step)",
        layout.describe(),
        f"run: {c.train.steps:,} steps = {c.train.steps * tokens_per_step:,} tokens",
        f"memory per {'device' if layout.devices > 1 else 'process'}, GiB ({c.train.precision}"
        f"{', remat' if c.train.remat else ''}):",
        " " * 13 + "".join(f"{name:>{width}}" for name, width in columns.items())]
    for zero in STAGES:
        mem = memory_per_replica(c, dataclasses.replace(layout, zero=zero))
        figures = [*mem.values(), sum(mem.values())]
        lines.append(f"  dist.zero={zero}" + "".join(
            f"{v / GIB:{width}.2f}" for width, v in zip(columns.values(), figures))
            + ("  <- this run" if zero == layout.zero else ""))
    return lines


def check_fits(c, layout, local_replicas, gpu=""):
    """Refuse, before any weight exists, a run whose estimate exceeds its memory. On a GPU
    (`gpu`: TensorFlow's name for this process's, e.g. "NVIDIA H100 80GB HBM3") that is the
    memory hardware.GPUS lists for it (an unlisted GPU is not checked), and the refusal names
    what would fit. On a CPU host (gpu "") it is the free memory, for this host's
    `local_replicas` replicas (each a copy of the weights, even as logical CPU devices)."""
    need = _total(c, layout)
    run = (f"a {param_count(c.model) / 1e9:.1f}B-parameter model at dist.zero={layout.zero}, "
           f"micro-batch {layout.micro}, data.seq_len={c.data.seq_len}")
    if gpu:
        known = hardware.gpu_model(gpu)
        capacity = known and hardware.GPUS[known].memory_gib * GIB
        if capacity and need > capacity:
            _, words = what_fits(c, layout, capacity)
            raise UserError(f"{run} needs about {need / GIB:.1f} GiB per GPU, but {known} "
                            f"GPUs have {capacity / GIB:g} GiB: {words} (see --dry-run)")
        return
    need *= local_replicas
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        raise UserError(f"{run} needs about {need / GIB:.1f} GiB for {local_replicas} "
                        f"replica(s) on this host (see --dry-run) but it has {free / GIB:.1f} "
                        "GiB free")
