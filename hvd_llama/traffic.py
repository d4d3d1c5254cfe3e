"""What an optimizer step sends between processes at each ZeRO stage, and the step time that
and its compute take at a stated MFU and bus bandwidth: the dry run's second half, from the
config alone.

With N processes, k micro-batches a step, n parameters, G gradient bytes (4n; 2n with
dist.compression=fp16) and float32 weights (4n), each process sends in a step (a ring
reduce-scatter or all-gather sends (N-1)/N of the buffer; an allreduce is one of each):
    dist.zero=0   one allreduce                              2(N-1)/N G
    dist.zero=1   a reduce-scatter, then an all-gather        (N-1)/N G + (N-1)/N 4n
    dist.zero=2   a reduce-scatter per micro-batch, 1 gather  k (N-1)/N G + (N-1)/N 4n
    dist.zero=3   per micro-batch an all-gather of the        k (N-1)/N (G + 4n), a tied
                  weights each layer call reads, and the      embedding's twice (its two
                  reduce-scatter of their gradients           calls); train.remat gathers the
                                                              blocks again, to recompute
A parameter server would have each worker send G and receive 4n, and a single server receive
N G and send N 4n. The bus bandwidth is NCCL's "busbw", defined so that a collective takes
its bytes sent per process over it.
"""

from hvd_llama.plan import STAGES, block_params, flops_per_token, param_count

GB = 1e9  # bandwidths come in GB/s


def _sig(x):
    """Three significant figures, without an exponent: 0.00112, 25.3, 202, 1,959."""
    return f"{x:.3g}" if x < 100 else f"{x:,.0f}"


def _gradient_bytes(c):
    """G: a full gradient as the collectives carry it (dist.compression=fp16 halves it)."""
    return (2 if c.dist.compression == "fp16" else 4) * param_count(c.model)


def sent(c, layout, zero):
    """[(collective, bytes each process sends)] in one optimizer step at ZeRO stage `zero`."""
    n, N, gradients = param_count(c.model), layout.processes, _gradient_bytes(c)
    ring = (N - 1) / N
    if zero == 0:
        return [("allreduce", 2 * ring * gradients)]
    if zero == 3:  # zero3.py: each layer call gathers the weights it reads
        k, mc = layout.grad_accum, c.model
        called = n + (mc.vocab_size * mc.hidden_dim if mc.tie_word_embeddings else 0)
        recomputed = mc.num_layers * block_params(mc) if c.train.remat else 0
        gathers = k * (2 if c.train.remat else 1)  # passes: the forward, the recomputation
        return [(f"{gathers} all-gathers" if gathers > 1 else "all-gather",
                 k * ring * 4 * (called + recomputed)),
                (f"{k} reduce-scatters" if k > 1 else "reduce-scatter",
                 k * ring * gradients * called / n)]
    scatters = layout.grad_accum if zero == 2 else 1
    return [(f"{scatters} reduce-scatters" if scatters > 1 else "reduce-scatter",
             scatters * ring * gradients), ("all-gather", ring * 4 * n)]


def parameter_server(c, layout):
    """Bytes a step in a parameter-server design: (a worker sends, a worker receives, a single
    server receives, it sends)."""
    n, N, gradients = param_count(c.model), layout.processes, _gradient_bytes(c)
    return gradients, 4 * n, N * gradients, N * 4 * n


def compute_seconds(c, layout, peak_tflops, mfu):
    """Seconds of one optimizer step's compute in a process whose devices peak at
    `peak_tflops` together and run at `mfu` of that."""
    tokens = layout.tokens_per_step / layout.processes
    return flops_per_token(c.model, c.data.seq_len) * tokens / (mfu * peak_tflops * 1e12)


def comm_seconds(c, layout, zero, bus_gbps):
    """Seconds of one optimizer step's collectives at ZeRO stage `zero` on a `bus_gbps` bus."""
    return sum(b for _, b in sent(c, layout, zero)) / (bus_gbps * GB)


def describe(c, layout, peak_tflops, peak_source, mfu, bus_gbps):
    """The dry run's lines: bytes sent per stage (and a parameter server's), then step times;
    communication alone when the peak is unknown (`peak_tflops` 0)."""
    gradients = "fp16" if c.dist.compression == "fp16" else "float32"
    lines = [f"sent per process per step over {layout.processes} process(es), GB "
             f"({gradients} gradients, float32 weights):"]
    for zero in STAGES:
        parts = sent(c, layout, zero)
        lines.append(f"  dist.zero={zero}  " + " + ".join(f"{name} {_sig(b / GB)}"
                                                          for name, b in parts)
                     + (f" = {_sig(sum(b for _, b in parts) / GB)}" if len(parts) > 1 else ""))
    w_sends, w_receives, s_receives, s_sends = (b / GB for b in parameter_server(c, layout))
    lines.append(f"  a parameter server instead: each worker sends {_sig(w_sends)} and receives "
                 f"{_sig(w_receives)}; a single server receives {_sig(s_receives)} and sends "
                 f"{_sig(s_sends)} (with S servers, 1/S of that each)")
    compute = peak_tflops and compute_seconds(c, layout, peak_tflops, mfu)
    peak = f" of {peak_tflops:g} TFLOP/s per process ({peak_source})" if compute else ""
    unknown = "" if compute else "; compute unknown without --gpu or train.peak_tflops" + (
        f" ({peak_source})" if peak_source else "")
    lines.append(f"step time, assuming --mfu {mfu:g}{peak} and --bus-gbps {bus_gbps:g} (GB/s "
                 f"bus bandwidth){unknown}:")
    for zero in STAGES:
        comm = comm_seconds(c, layout, zero, bus_gbps)
        lines.append(f"  dist.zero={zero}  " + (
            f"compute {_sig(compute)} s + comm {_sig(comm)} s: no overlap "
            f"{_sig(compute + comm)} s, full overlap {_sig(max(compute, comm))} s"
            if compute else f"comm {_sig(comm)} s"))
    return lines
