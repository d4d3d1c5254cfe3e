"""Synthetic benchmarks, in the spirit of Horovod's tensorflow_synthetic_benchmark.py.

    python -m hvd_llama.bench [--config configs/small.yaml] [section.key=value ...] [--json]
    horovodrun -np 2 -H localhost:2 python -m hvd_llama.bench --measure-single
    horovodrun -np 2 -H localhost:2 python -m hvd_llama.bench allreduce [--json]

The first form times the training step of a config on random tokens (no data on disk): tokens/s
per process and in all; the step split into compute (forward and backward, and the mean over a
process's devices under dist.strategy mirrored/hybrid), communication (the allreduce, or under
dist.zero the reduce-scatters, the norm's allreduce and the all-gather) and the rest (the
update), each timed on its own; MFU against the device's peak (on a CPU, a matmul measured
at start, all processes at once); peak memory, next to the dry run's estimate; and scaling
efficiency, tokens/s of N processes over N times
one process given a rank's share of the host (--single TOKENS_PER_S, or --measure-single: rank 0
runs that one process first while the others wait).

`allreduce` measures Horovod's allreduce (the launcher's controller: Gloo or MPI, NCCL for GPU
tensors) from 1 KB to 256 MB of float32, with fp16 compression off and on: bus bandwidth in
nccl-tests' sense (bytes x 2(N-1)/N per second) next to a memory-copy bandwidth measured by all
processes at once, the bound for processes sharing one host.

Both report measurements only; bench/peers.py compares them with the targets (BENCHMARKS.md).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from hvd_llama import cli
from hvd_llama.atomic import writable_file, write_bytes
from hvd_llama.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "small.yaml")
SIZES = [1 << k for k in range(10, 29, 2)]  # 1 KiB .. 256 MiB, x4 per row
BOUND_BYTES = 256 << 20  # copy bandwidth beyond every cache


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    what = "allreduce" if argv[:1] == ["allreduce"] else "step"
    return cli.main(_parser(what), lambda args: _bench(what, args),
                    argv[1:] if what == "allreduce" else argv)


def _bench(what, args):
    from hvd_llama import config as config_lib
    c = config_lib.load(args.config, args.overrides) if what == "step" else None
    if args.output:  # refused now, not after the whole run
        writable_file(args.output)
    cli.import_tensorflow()
    from hvd_llama import distributed as dist, replicas
    dist.init(c.dist if c else None, threads=args.threads)
    replicas.setup(c.dist if c else None, dist.local_rank(), dist.local_size())
    result = run_step(c, args) if what == "step" else run_allreduce(args)
    if result is not None:  # rank 0
        if args.output:
            write_bytes(args.output, json.dumps(result, indent=1).encode())
        print(json.dumps(result) if args.json else "\n".join(
            (step_table if what == "step" else allreduce_table)(result)), flush=True)


def _parser(what):
    parser = argparse.ArgumentParser(
        prog="python -m hvd_llama.bench" + (" allreduce" if what == "allreduce" else ""),
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--output", metavar="PATH", help="also write the JSON object to PATH")
    parser.add_argument("--threads", type=cli.at_least(0), default=0,
                        help="intra-op threads per process (default: the host's cores over "
                             "its processes)")
    if what == "allreduce":
        parser.add_argument("--max-bytes", type=int, default=SIZES[-1])
        parser.add_argument("--seconds", type=float, default=0.5,
                            help="time spent on each size and compression (at least 3 calls)")
        return parser
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=cli.at_least(1), default=5,
                        help="timed steps (after 2 untimed)")
    parser.add_argument("--single", type=float, default=0.0, metavar="TOKENS_PER_S",
                        help="tokens/s of one process on a rank's share of the host")
    parser.add_argument("--measure-single", action="store_true",
                        help="rank 0 measures --single first, in a plain child process")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def run_step(c, args):
    """Time the training step of Config c on this process's part of a random global batch;
    the figures of all processes on rank 0 (None elsewhere)."""
    import tensorflow as tf
    from hvd_llama import distributed as dist, hardware, plan, replicas, step as step_lib
    from hvd_llama.layout import Layout
    layout = Layout.of(c, dist.size(), replicas.count(), dist.rank())
    n, d = layout.processes, layout.devices
    single = args.single or (measure_single(args, n) if args.measure_single else 0.0)

    start_rss = rss_gib()  # TensorFlow loaded, nothing built
    model, optimizer, jit = step_lib.build(c, layout)
    dist.barrier()  # every process measures a CPU's peak at once, each on its share
    peak, peak_source = hardware.peak_tflops(c.train.precision, c.train.peak_tflops, d)
    peak = float(dist.allreduce_mean(peak))
    step_s, compute_s, communication_s, peak_rss, peak_tensors = _time_parts(
        c, layout, model, optimizer, jit, args.steps)

    # Every process ran the same number of steps; the slowest one sets the pace.
    step_s = max(dist.allgather_object(step_s))
    rss = dist.allgather_object((peak_rss, peak_rss - start_rss, peak_tensors))
    world = dist.world()  # a collective: every rank
    if not dist.is_chief():
        return None
    tokens_per_s = layout.tokens_per_step / step_s
    flops_per_token = plan.flops_per_token(c.model, c.data.seq_len)
    r = {"config": args.config, "overrides": args.overrides, "processes": n,
         "strategy": c.dist.strategy, "devices_per_process": d,
         "hosts": world["hosts"], "controller": world["controller"],
         "threads_per_process": tf.config.threading.get_intra_op_parallelism_threads(),
         "precision": c.train.precision, "xla": jit, "remat": c.train.remat,
         "global_batch": c.train.global_batch, "seq_len": c.data.seq_len,
         "grad_accum": c.train.grad_accum, "zero": c.dist.zero, "steps": args.steps,
         "tokens_per_s": tokens_per_s, "tokens_per_s_per_process": tokens_per_s / n,
         "step_s": step_s, "compute_s": compute_s, "communication_s": communication_s,
         "other_s": step_s - compute_s - communication_s,
         "flops_per_token": flops_per_token, "peak_tflops_per_process": peak,
         "peak_source": peak_source,
         "mfu": flops_per_token * tokens_per_s / (peak * 1e12 * n) if peak else None,
         "peak_rss_gib": max(r[0] for r in rss),
         "peak_rss_over_start_gib": max(r[1] for r in rss),
         "peak_tensors_gib": None if rss[0][2] is None else max(r[2] for r in rss),
         "planned_gib": sum(plan.memory_per_replica(c, layout).values()) / 2 ** 30,
         "single_tokens_per_s": single or None,
         "scaling_efficiency": tokens_per_s / (n * single) if single else None}
    return r


def _time_parts(c, layout, model, optimizer, jit, steps):
    """Seconds per call of the whole step, of its compute (forward and backward, the mean over
    a process's devices) and of its collectives, on random tokens; and, before the parts hold
    gradients of their own, the peak RSS (GiB) of the process so far and the peak bytes (GiB)
    of tensors alive at once during the timed steps, as the first device's TensorFlow
    allocator counts them (None where it keeps no count): what the dry run estimates. The
    RSS also holds the runtime and memory the C allocator keeps after tensors are freed."""
    import numpy as np
    import tensorflow as tf
    from hvd_llama import step as step_lib, zero
    tokens = tf.constant(np.random.default_rng(layout.rank).integers(
        0, c.model.vocab_size, (layout.grad_accum, layout.process_batch, layout.seq_len + 1),
        np.int32))
    step = step_lib.make_train_step(model, optimizer, layout, jit)
    device = "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"
    try:  # a CPU's allocator keeps statistics only under oneDNN (TF_ENABLE_ONEDNN_OPTS)
        counted = bool(tf.config.experimental.get_memory_info(device))
    except ValueError:
        counted = False
    step_s = _seconds_per_call(
        lambda: float(step(tokens)[0]), steps,
        after_warmup=lambda: counted and tf.config.experimental.reset_memory_stats(device))
    peak_tensors = (tf.config.experimental.get_memory_info(device)["peak"] / 2 ** 30
                    if counted else None)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

    # Built after the peaks: stage 3's gradient pass has an accumulator of its own.
    gathered = layout.zero == 3  # the gradient pass gathers the weights: its collectives inside
    gradients = zero.gathered_gradients(
        optimizer, lambda t: step_lib.token_loss(model, t, training=True)) if gathered \
        else step_lib.make_gradients(model, layout, jit)
    communicate = tf.function(lambda g: _collectives(g, layout, c, model))
    split = max(1, min(steps, 2))  # the parts again, fewer times: they only divide it
    one = tf.constant(1.0)  # the loss scale
    compute_s = _seconds_per_call(lambda: float(gradients(tokens, one)[0]), split)
    grads = gradients(tokens, one)[1]
    communication_s = _seconds_per_call(lambda: [g.numpy() for g in communicate(grads)], split) \
        if layout.processes > 1 else 0.0  # one process does not communicate
    if gathered:  # the collectives, timed alone, out of the gradient pass that holds them;
        # none left where they overlapped all of its compute (prefetch, tiny models)
        compute_s = max(0.0, compute_s - communication_s)
    return step_s, compute_s, communication_s, peak_rss, peak_tensors


def _collectives(grads, layout, c, model):
    """A step's collectives on its gradients: stage 0's allreduce; ZeRO's reduce-scatter (one
    per micro-batch from stage 2), the allreduce of the norm's two sums, and the all-gather
    (at stage 3 one per micro-batch, two with remat, and none after the update)."""
    import tensorflow as tf
    from hvd_llama import distributed as dist
    if not layout.zero:
        return dist.allreduce_gradients(grads, compression=c.dist.compression)
    if layout.zero == 3:  # grads are the shares'; the collectives carry whole tensors
        wholes = [tf.zeros(v.shape) for v in model.trainable_variables]
        gathers = layout.grad_accum * (2 if c.train.remat else 1)
        for _ in range(gathers):
            wholes = [w + g for w, g in zip(wholes, dist.allgather_shares(grads))]
        shares = dist.reducescatter_gradients(wholes, c.dist.compression)
    else:
        shares = dist.reducescatter_gradients(grads, c.dist.compression)
    for _ in range(layout.grad_accum - 1 if layout.zero >= 2 else 0):  # all used: none pruned
        more = dist.reducescatter_gradients(wholes if layout.zero == 3 else grads,
                                            c.dist.compression)
        shares = [s + m for s, m in zip(shares, more)]
    sums = dist.allreduce_sum(tf.stack([tf.reduce_sum(shares[0]), tf.reduce_sum(shares[-1])]))
    with tf.control_dependencies([sums]):  # as in the step: the gather waits for the norm
        return dist.allgather_shares(shares) if layout.zero < 3 else [*shares, sums]


def measure_single(args, n):
    """Rank 0: tokens/s of one plain process with a rank's share of the host's threads, run as
    a child before the N-process measurement. The other ranks on rank 0's host wait by polling
    a file, asleep: a rank blocked in a collective busy-polls (MPI does) and would take a core
    from the child. Ranks on other hosts wait in the barrier."""
    import socket
    import tempfile
    from hvd_llama import distributed as dist, launcher
    # One collective agrees on where rank 0 reports; every rank joins it.
    host, done = dist.broadcast_object(
        (socket.gethostname(), os.path.join(tempfile.mkdtemp(prefix="hvd_llama_single_"),
                                            "tokens_per_s")) if dist.is_chief() else None)
    if dist.is_chief():
        threads = args.threads or max(1, (os.cpu_count() or 1) // dist.local_size())
        cmd = [sys.executable, "-m", "hvd_llama.bench", "--json", "--config", args.config,
               "--steps", str(args.steps), "--threads", str(threads), *args.overrides]
        out = subprocess.run(cmd, env=launcher.plain_env(), capture_output=True, text=True)
        single = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"] \
            if out.returncode == 0 else 0.0  # rank 0 raises after the others are released
        write_bytes(done, str(single).encode())  # appears whole
    elif socket.gethostname() == host:
        while not os.path.exists(done):
            time.sleep(0.2)
    dist.barrier()
    if dist.is_chief():
        os.remove(done)
        os.rmdir(os.path.dirname(done))
        if not single:
            raise UserError(f"the single-process measurement failed: {out.stderr.strip()}")
    return dist.broadcast_object(single if dist.is_chief() else None)


def _seconds_per_call(fn, calls, warmup=2, after_warmup=lambda: None):
    """Mean seconds of `calls` calls of fn (which waits for its result), after `warmup` calls
    (tracing), after_warmup() and a barrier, so that every process starts timing together."""
    from hvd_llama import distributed as dist
    for _ in range(warmup):
        fn()
    after_warmup()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def step_table(r):
    lines = [f"{r['config']} {' '.join(r['overrides'])}: {r['processes']} process(es) x "
             f"{r['devices_per_process']} device(s) x {r['threads_per_process']} threads on "
             f"{', '.join(r['hosts'])} "
             f"(controller {r['controller']}); {r['precision']}, XLA {r['xla']}, "
             f"remat {r['remat']}, dist.zero={r['zero']}; global batch {r['global_batch']} x "
             f"{r['seq_len']} tokens",
             "| figure | value |", "|---|---:|",
             f"| tokens/s, all processes | {r['tokens_per_s']:,.0f} |",
             f"| tokens/s per process | {r['tokens_per_s_per_process']:,.0f} |"]
    for key, label in (("step_s", "step"), ("compute_s", "compute (forward + backward)"),
                       ("communication_s", "communication"), ("other_s", "the rest (update)")):
        lines.append(f"| {label}, ms | {1000 * r[key]:,.1f} |")
    if r["mfu"] is not None:
        lines.append(f"| MFU ({r['peak_tflops_per_process']:.3g} TFLOP/s per process, "
                     f"{r['peak_source']}) | {100 * r['mfu']:.1f}% |")
    lines += [f"| peak RSS per process, GiB (over its RSS before the build) | "
              f"{r['peak_rss_gib']:.2f} ({r['peak_rss_over_start_gib']:.2f}) |",
              f"| peak tensor memory per process, GiB (TensorFlow's allocator) | "
              f"{_gib(r['peak_tensors_gib'])} |",
              f"| the dry run's estimate per process, GiB | {r['planned_gib']:.2f} |"]
    if r["scaling_efficiency"] is not None:
        lines.append(f"| scaling efficiency (one process: {r['single_tokens_per_s']:,.0f} "
                     f"tokens/s) | {100 * r['scaling_efficiency']:.1f}% |")
    return lines


def _gib(value):
    return "n/a" if value is None else f"{value:.2f}"


def rss_gib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def run_allreduce(args):
    """Bus bandwidth of Horovod's allreduce per size and compression; rank 0's result."""
    import tensorflow as tf
    from hvd_llama import distributed as dist
    n = dist.size()
    if n < 2:
        raise UserError("the allreduce benchmark needs 2 or more processes: launch it with "
                        "horovodrun -np N (or mpirun)")
    bound = _copy_bandwidth()
    rows = []
    for compression in ("none", "fp16"):
        reduce = tf.function(lambda x, c=compression: dist.allreduce_gradients([x], compression=c))
        for size in [s for s in SIZES if s <= args.max_bytes]:
            x = tf.ones([size // 4], tf.float32)
            seconds = _seconds_collective(lambda: reduce(x)[0].numpy(), args.seconds)
            algbw = size / seconds
            rows.append({"bytes": size, "compression": compression, "seconds": seconds,
                         "algbw_gbps": algbw / 1e9, "busbw_gbps": algbw * 2 * (n - 1) / n / 1e9,
                         "busbw_over_copy": algbw * 2 * (n - 1) / n / bound})
    world = dist.world()  # a collective: every rank
    if not dist.is_chief():
        return None
    return {"processes": n, "hosts": world["hosts"], "controller": world["controller"],
            "tensor_ops": world["tensor_ops"], "device": "GPU" if tf.config.list_logical_devices(
                "GPU") else "CPU",
            "copy_gbps": bound / 1e9, "rows": rows}


def _copy_bandwidth():
    """Bytes/s of copying a 256 MiB buffer, measured by every process at once (they share the
    memory bus, as the processes of an allreduce do), averaged over ranks."""
    import numpy as np
    from hvd_llama import distributed as dist
    src = np.ones(BOUND_BYTES // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    dist.barrier()
    seconds = _seconds_until(lambda: np.copyto(dst, src), 0.5)
    return float(dist.allreduce_mean(BOUND_BYTES / seconds))


def _seconds_until(fn, budget):
    """Mean seconds per call of fn, called at least 3 times and until `budget` seconds passed,
    after one untimed call. Not for collectives: ranks would stop at different counts."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < budget:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def _seconds_collective(fn, budget):
    """Mean seconds per call of the collective fn, as the slowest rank saw it: every rank makes
    the same number of calls (at least 3, about `budget` seconds by rank 0's first call)."""
    from hvd_llama import distributed as dist
    fn()  # trace, and connect
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    calls = dist.broadcast_object(max(3, min(1000, int(budget / max(first, 1e-6)))))
    return max(dist.allgather_object(_seconds_per_call(fn, calls, warmup=0)))


def allreduce_table(r):
    lines = [f"Horovod allreduce, {r['processes']} processes on {', '.join(r['hosts'])}, "
             f"controller {r['controller']} (tensor ops {r['tensor_ops']}), {r['device']} "
             f"tensors; copy bound {r['copy_gbps']:.2f} GB/s (256 MiB, all processes at once)",
             "| bytes | compression | ms | algbw GB/s | busbw GB/s | busbw / copy |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {_size(row['bytes'])} | {row['compression']} | "
                     f"{1000 * row['seconds']:.3f} | {row['algbw_gbps']:.3f} | "
                     f"{row['busbw_gbps']:.3f} | {100 * row['busbw_over_copy']:.0f}% |")
    return lines


def _size(n):
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


if __name__ == "__main__":
    sys.exit(main())
