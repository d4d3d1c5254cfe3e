"""Everything Horovod, for Keras 3. The only module of hvd_llama that imports horovod.

Horovod's own Keras wrapper (`horovod.tensorflow.keras`) does not work with Keras 3: it calls
`Variable.ref()` and hooks optimizer methods Keras 3 never calls. Its core TensorFlow ops do
work, given the `tf.Variable` behind each Keras variable (`v.value`), and that is all we use.

When the process was not started by horovodrun/mpirun/srun, this falls back to one plain
process without importing Horovod at all: every collective is then the identity.
"""

import os

import numpy as np
import tensorflow as tf

from hvd_llama.launcher import launched

_hvd = None  # horovod.tensorflow once init() ran under a launcher; None in one plain process


def init():
    """Start Horovod (under a launcher) and pin this process to one GPU, if there are GPUs."""
    global _hvd
    if launched() and _hvd is None:
        import horovod.tensorflow as hvd  # noqa: the one Horovod import of hvd_llama
        hvd.init()
        _hvd = hvd
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        # Processes sharing a host's cores: without this each would start a thread per core.
        tf.config.threading.set_intra_op_parallelism_threads(
            max(1, os.cpu_count() // local_size()))
    for gpu in gpus:
        # Several processes share a host: let each grow into its GPU instead of grabbing all.
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[local_rank() % len(gpus)], "GPU")


def rank():
    return _hvd.rank() if _hvd else 0


def size():
    return _hvd.size() if _hvd else 1


def local_rank():
    return _hvd.local_rank() if _hvd else 0


def local_size():
    return _hvd.local_size() if _hvd else 1


def is_chief():
    """Rank 0 alone prints, writes metrics, checkpoints and exports."""
    return rank() == 0


def controller():
    """'gloo', 'mpi' or 'none' (one plain process)."""
    if _hvd is None:
        return "none"
    return "gloo" if _hvd.gloo_enabled() else "mpi"


def allreduce_gradients(grads, op="average", compression="none"):
    """Average (or sum) a list of gradient tensors over all processes, fused into one group."""
    if _hvd is None or size() == 1:
        return list(grads)
    return _hvd.grouped_allreduce(
        list(grads),
        op=_hvd.Average if op == "average" else _hvd.Sum,
        compression=_hvd.Compression.fp16 if compression == "fp16" else _hvd.Compression.none,
    )


def allreduce_mean(value):
    """Mean of a scalar or array over all processes, as numpy (for metrics)."""
    value = np.asarray(value)
    if _hvd is None:
        return value
    return _hvd.allreduce(tf.constant(value), op=_hvd.Average).numpy()


def broadcast_variables(variables, root_rank=0):
    """Overwrite each process's variables with root's. Accepts Keras 3 or tf variables."""
    if _hvd is None:
        return
    tf_vars = [v.value if hasattr(v, "value") and not isinstance(v, tf.Variable) else v
               for v in variables]
    _hvd.broadcast_variables(tf_vars, root_rank=root_rank)


def broadcast_object(obj, root_rank=0):
    """Root's picklable Python object on every process."""
    if _hvd is None:
        return obj
    return _hvd.broadcast_object(obj, root_rank=root_rank)


def allgather_object(obj):
    """Every process's picklable object, as a list in rank order."""
    if _hvd is None:
        return [obj]
    return _hvd.allgather_object(obj)


def barrier():
    """Return once every process got here (an allreduce of nothing: every rank must join)."""
    if _hvd is not None:
        _hvd.allreduce(tf.constant(0.0), op=_hvd.Sum, name="barrier")


class _AllreducedGradients:
    """Mixin over a Keras 3 optimizer class: allreduce gradients right before they are applied.

    Keras 3 calls `_clip_gradients` exactly once per optimizer step with the final gradients
    (after its own `gradient_accumulation_steps` averaging, before weight decay and the update),
    from `apply`, `apply_gradients` and `model.fit` alike. Allreducing there means one allreduce
    per optimizer step, not per micro-batch, and clipping sees the averaged gradients, so it
    acts identically on every process.
    """

    hvd_op = "average"
    hvd_compression = "none"

    def _clip_gradients(self, grads):
        return super()._clip_gradients(
            allreduce_gradients(grads, op=self.hvd_op, compression=self.hvd_compression))


def DistributedOptimizer(optimizer, compression="none", op="average", backward_passes_per_step=1):
    """A copy of a Keras 3 optimizer whose gradients are allreduced across processes.

    compression: "none" | "fp16" (allreduce in half precision, apply in full).
    op: "average" | "sum".
    backward_passes_per_step: k > 1 accumulates k local micro-batches (their mean) and
        allreduces once per k, through Keras's own `gradient_accumulation_steps`.

    Use it as `model.compile(optimizer=DistributedOptimizer(keras.optimizers.AdamW(...)))`
    or call `apply(grads, variables)` from a custom train step.
    """
    if op not in ("average", "sum"):
        raise ValueError(f"op must be 'average' or 'sum', got {op!r}")
    if compression not in ("none", "fp16"):
        raise ValueError(f"compression must be 'none' or 'fp16', got {compression!r}")
    base = type(optimizer)
    cls = type(f"Distributed{base.__name__}", (_AllreducedGradients, base), {})
    config = optimizer.get_config()
    if backward_passes_per_step > 1:
        config["gradient_accumulation_steps"] = backward_passes_per_step
    wrapped = cls.from_config(config)
    wrapped.hvd_op = op
    wrapped.hvd_compression = compression
    return wrapped
