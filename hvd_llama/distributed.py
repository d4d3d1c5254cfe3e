"""Everything Horovod, for Keras 3. The only module of hvd_llama that imports horovod.

Horovod's own Keras wrapper (`horovod.tensorflow.keras`) does not work with Keras 3: it calls
`Variable.ref()` and hooks optimizer methods Keras 3 never calls. Its core TensorFlow ops do
work, given the `tf.Variable` behind each Keras variable (compat.tf_variables), and that is
all we use.

When the process was not started by horovodrun/mpirun/srun, or runs dist.strategy=mirrored,
this falls back to one plain process without importing Horovod at all: every collective is then
the identity. Under dist.strategy=hybrid a process holds several replicas (replicas.py); the
gradients reach `apply` already averaged over them, so Horovod sees one process as one.
"""

import contextlib
import os
import socket

import keras
import numpy as np
import tensorflow as tf

from hvd_llama import compat
from hvd_llama.errors import RanksLost, UserError
from hvd_llama.launcher import exit_with_launcher, launched, launched_size

_hvd = None  # horovod.tensorflow once init() ran under a launcher; None in one plain process
_local = False  # inside local_collectives(): every collective acts as in one process


def init(dc=None, run_dir=".", threads=0):
    """Start Horovod (under a launcher, unless dist.strategy is mirrored) with DistConfig
    `dc`'s knobs and set the CPU threads (0: the host's cores over its processes). Before
    TensorFlow's runtime starts, and so before replicas.setup chooses this process's devices."""
    global _hvd
    strategy = dc.strategy if dc is not None else "horovod"
    if strategy == "mirrored" and launched_size() > 1:
        raise UserError(f"dist.strategy=mirrored runs as one process, but the launcher started "
                        f"{launched_size()}: run it without horovodrun/mpirun, or use "
                        "dist.strategy=hybrid (one process per host)")
    if strategy == "hybrid" and not launched():
        raise UserError("dist.strategy=hybrid runs one process per host under horovodrun, "
                        "mpirun or srun, and none started this one (dist.strategy=mirrored is "
                        "the one-process form)")
    elastic_launch = os.environ.get("HOROVOD_ELASTIC") == "1"
    if dc is not None and dc.elastic != elastic_launch:
        raise UserError("dist.elastic=true runs under horovodrun --gloo --min-np/--max-np "
                        "--host-discovery-script (Horovod's elastic mode), and this process was "
                        "not started so" if dc.elastic else "horovodrun started an elastic job "
                        "(--min-np/--max-np): set dist.elastic=true, or launch without them")
    if launched() and strategy != "mirrored" and _hvd is None:
        exit_with_launcher()  # a rank over ssh outlives its launcher otherwise
        if dc is not None:
            os.environ.update(horovod_env(dc, run_dir,
                                          bool(tf.config.list_physical_devices("GPU"))))
            if dc.timeline:  # Horovod opens the file in init()
                os.makedirs(os.path.dirname(os.environ["HOROVOD_TIMELINE"]) or ".",
                            exist_ok=True)
        import horovod.tensorflow as hvd  # noqa: the one Horovod import of hvd_llama
        hvd.init()
        _hvd = hvd
    if threads or not tf.config.list_physical_devices("GPU"):
        # Processes sharing a host's cores: without this each would start a thread per core.
        tf.config.threading.set_intra_op_parallelism_threads(
            threads or max(1, os.cpu_count() // local_size()))


# dist.cycle_time_ms=0 without GPUs: Horovod's thread, woken every 1 ms, takes cores from compute
# (BENCHMARKS.md, "Horovod's cycle time"). On such hosts our build's HOROVOD_CYCLE_WAKE
# (docker/horovod/cycle-wake-on-enqueue.patch) starts a cycle as soon as a collective is
# enqueued, so a long cycle delays none: dist.zero's three collectives in a row included.
CPU_CYCLE_TIME_MS = 20.0


def horovod_env(dc, run_dir, gpus=False):
    """The HOROVOD_* variables for DistConfig `dc`; Horovod reads them once, in init()."""
    env = {}
    if dc.autotune:  # fusion threshold and cycle time are then Horovod's to choose
        env["HOROVOD_AUTOTUNE"] = "1"
        env["HOROVOD_AUTOTUNE_LOG"] = os.path.join(run_dir, "autotune.csv")
    else:
        env["HOROVOD_FUSION_THRESHOLD"] = str(dc.fusion_threshold_mb * 1024 * 1024)
        env["HOROVOD_CYCLE_TIME"] = str(dc.cycle_time_ms
                                        or (1.0 if gpus else CPU_CYCLE_TIME_MS))
    if not gpus:  # where a cycle also batches gradients as they come, it keeps its wait
        env["HOROVOD_CYCLE_WAKE"] = "1"
    if dc.timeline:
        env["HOROVOD_TIMELINE"] = os.path.join(run_dir, dc.timeline)
    if dc.stall_warning_seconds:
        env["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(dc.stall_warning_seconds)
        env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(dc.stall_shutdown_seconds)
    else:
        env["HOROVOD_STALL_CHECK_DISABLE"] = "1"
    return env


def rank():
    return _hvd.rank() if _hvd else 0


def size():
    return _hvd.size() if _hvd else 1


def local_rank():
    return _hvd.local_rank() if _hvd else 0


def local_size():
    return _hvd.local_size() if _hvd else 1


def is_chief():
    """Rank 0 alone prints, writes metrics and exports, and completes each checkpoint (which
    every rank writes its share of)."""
    return rank() == 0


def controller():
    """'gloo', 'mpi' or 'none' (one plain process)."""
    if _hvd is None:
        return "none"
    return "gloo" if _hvd.gloo_enabled() else "mpi"


def world():
    """What the startup summary shows of the Horovod world."""
    hosts = sorted(set(allgather_object(socket.gethostname())))
    if _hvd is None:
        ops = "none"
    else:
        ops = ", ".join(name for name, built in (("NCCL", _hvd.nccl_built()),
                                                 ("MPI", _hvd.mpi_built()),
                                                 ("Gloo", _hvd.gloo_built())) if built)
    return {"size": size(), "hosts": hosts, "controller": controller(), "tensor_ops": ops}


def _compression(name):
    return _hvd.Compression.fp16 if name == "fp16" else _hvd.Compression.none


def allreduce_gradients(grads, op="average", compression="none"):
    """Average (or sum) a list of gradient tensors over all processes, fused into one group."""
    if _hvd is None or size() == 1:
        return list(grads)
    return _hvd.grouped_allreduce(
        list(grads),
        op=_hvd.Average if op == "average" else _hvd.Sum,
        compression=_compression(compression),
    )


def reducescatter_gradients(grads, compression="none"):
    """This process's share (Layout.share's rows) of each gradient averaged over all processes.
    One reduce-scatter per tensor, not a group: each starts as soon as its gradient exists, so
    the backward pass can free a full gradient while it computes the next (Horovod still fuses
    the tensors that are ready together)."""
    if _hvd is None or size() == 1:
        return list(grads)
    return [_hvd.reducescatter(g, op=_hvd.Average, compression=_compression(compression))
            for g in grads]


def allgather_shares(shares):
    """Each tensor's shares from every process, joined along the first dimension in rank
    order: the whole tensor, on every process. One all-gather per tensor, as for the
    reduce-scatter: each whole tensor can be used (and freed) as soon as it has arrived."""
    if _hvd is None or size() == 1:
        return [tf.convert_to_tensor(s) for s in shares]
    return [_hvd.allgather(tf.convert_to_tensor(s)) for s in shares]


def allreduce_sum(tensor):
    """The sum over all processes of a tensor (inside a tf.function too)."""
    if _hvd is None or size() == 1:
        return tensor
    return _hvd.allreduce(tensor, op=_hvd.Sum)


def allreduce_max(value):
    """The largest of a number over all processes, as a Python int."""
    if _hvd is None:
        return int(value)
    return int(_hvd.allreduce(tf.constant(int(value), tf.int64), op=_hvd.Max).numpy())


def allreduce_mean(value):
    """Mean of a scalar or array over all processes, as numpy (for metrics)."""
    value = np.asarray(value)
    if _hvd is None or _local:
        return value
    return _hvd.allreduce(tf.constant(value), op=_hvd.Average).numpy()


def broadcast_variables(variables, root_rank=0):
    """Overwrite each process's variables with root's. Accepts Keras 3 or tf variables."""
    if _hvd is None or _local:
        return
    _hvd.broadcast_variables(compat.tf_variables(variables), root_rank=root_rank)


def broadcast_object(obj, root_rank=0):
    """Root's picklable Python object on every process."""
    if _hvd is None or _local:
        return obj
    return _hvd.broadcast_object(obj, root_rank=root_rank)


def allgather_object(obj):
    """Every process's picklable object, as a list in rank order."""
    if _hvd is None or _local:
        return [obj]
    return _hvd.allgather_object(obj)


def barrier():
    """Return once every process got here (an allreduce of nothing: every rank must join)."""
    if _hvd is not None and not _local:
        _hvd.allreduce(tf.constant(0.0), op=_hvd.Sum, name="barrier")


@contextlib.contextmanager
def local_collectives():
    """Inside the block the collectives of the trainer's setup act as in one process: a
    broadcast keeps this process's value, a gather returns it alone, a barrier and a mean
    return at once (the gradients' collectives are untouched, and rank() is still the real
    rank). Elastic training's setup runs in it: a worker that joins a running job must reach
    no collective before the state's sync, which the others wait in (Horovod's rule)."""
    global _local
    _local = True
    try:
        yield
    finally:
        _local = False


def elastic_run(train, state):
    """train(state) under Horovod's elastic mode (horovodrun --min-np/--max-np, Gloo): state
    (ElasticState) is synced from rank 0 first; when a rank dies the survivors restore its
    last commit, when hosts come or go every rank stops at its next commit, and in both cases
    Horovod restarts over the new set of processes, the state's reset callbacks run, and
    train(state) starts again from the synced state. Returns what train returns."""
    from horovod.common.elastic import run_fn

    def reset():
        _hvd.shutdown()
        _hvd.init()

    def collectives_fail_as_horovod_errors(state):
        with _as_horovod_errors():
            return train(state)
    return run_fn(collectives_fail_as_horovod_errors, reset)(state)


@contextlib.contextmanager
def _as_horovod_errors():
    """A failed Horovod collective (a rank died) as HorovodInternalError: elastic mode's cue
    to roll back and reset, where TensorFlow raises an OpError."""
    from horovod.common.exceptions import HorovodInternalError
    try:
        yield
    except tf.errors.OpError as e:
        if lost_ranks(e) is None:
            raise
        raise HorovodInternalError(e) from e


def ElasticState(model, optimizer, **objects):
    """Horovod's elastic state of a Keras 3 model and optimizer (weights, moments, step
    counter), plus picklable `objects` (attributes of the state): `commit()` copies them
    aside (on their devices: one more copy of the weights and optimizer state), a rank's
    death restores the copy, a reset broadcasts rank 0's to every process."""
    from horovod.tensorflow.elastic import TensorFlowKerasState

    class State(TensorFlowKerasState):
        def sync(self):  # outside train(): a rank dying here must roll back too
            with _as_horovod_errors():
                super().sync()
    return State(model, optimizer, **objects)


def lost_ranks(error):
    """A RanksLost for a tf.errors.OpError raised by a Horovod collective (a rank died or
    Horovod shut down), else None."""
    text = f"{error.message} {getattr(error, '_node_def', '') or ''}"
    if _hvd is None or "Horovod" not in text:
        return None
    # TensorFlow's message: where the op was made, then the op's own error, then its node.
    lines = [x.strip() for x in error.message.splitlines() if x.strip()]
    cause = next((x for x in reversed(lines) if not x.startswith("[[")), "no message")
    return RanksLost(f"a collective failed: another rank died, hung up or stalled ({cause})")


class _AllreducedGradients:
    """Mixin over a Keras 3 optimizer class: allreduce the gradients as they enter `apply`.

    `apply` is where `model.fit` (through `apply_gradients`) and custom train steps alike hand
    over gradients, once per optimizer step. Everything after it sees the averaged gradients,
    identical on every process: clipping, weight decay, and a LossScaleOptimizer's overflow test,
    so an overflow on one process skips the step on all. Other optimizers skip a step whose
    averaged gradients hold a NaN/Inf rather than poison the weights. `apply` returns the global
    norm of the averaged (still loss-scaled) gradients.
    """

    hvd_op = "average"
    hvd_compression = "none"

    def apply(self, grads, trainable_variables=None):
        grads = allreduce_gradients(grads, op=self.hvd_op, compression=self.hvd_compression)
        norm = tf.linalg.global_norm(grads)
        base = super(_AllreducedGradients, self)
        if isinstance(self, keras.optimizers.LossScaleOptimizer):
            base.apply(grads, trainable_variables)
            return norm

        def update():
            base.apply(grads, trainable_variables)
            return tf.constant(True)

        tf.cond(tf.math.is_finite(norm), update, lambda: tf.constant(False))
        return norm


def DistributedOptimizer(optimizer, compression="none", op="average"):
    """Make a Keras 3 optimizer allreduce its gradients across processes; returns it.

    The optimizer itself is changed (its class becomes a subclass of its own class), so its
    settings survive, such as the variables excluded from weight decay.
    compression: "none" | "fp16" (allreduce in half precision, apply in full).
    op: "average" | "sum".

    Use it as `model.compile(optimizer=DistributedOptimizer(keras.optimizers.AdamW(...)))`
    or call `apply(grads, variables)` from a custom train step. Accumulate micro-batches before
    `apply` (as step.py does): Keras's own gradient_accumulation_steps would allreduce every
    micro-batch and evaluates learning-rate schedules at the micro-batch count, so it is refused.
    """
    if op not in ("average", "sum"):
        raise ValueError(f"op must be 'average' or 'sum', got {op!r}")
    if compression not in ("none", "fp16"):
        raise ValueError(f"compression must be 'none' or 'fp16', got {compression!r}")
    if optimizer.gradient_accumulation_steps:
        raise ValueError("accumulate gradients before apply() instead of "
                         "gradient_accumulation_steps (see DistributedOptimizer's doc)")
    compat.subclass_in_place(optimizer, _AllreducedGradients, "Distributed")
    optimizer.hvd_op = op
    optimizer.hvd_compression = compression
    return optimizer
