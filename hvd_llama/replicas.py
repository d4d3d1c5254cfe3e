"""This process's devices, per dist.strategy, and the tf.distribute strategy over them.

A replica is one device holding a full copy of the model and a micro-batch of b sequences.
- horovod: one replica per process: its GPU (by local rank) or the CPU. TensorFlow's default
  strategy; Horovod averages the gradients between processes.
- mirrored, hybrid: tf.distribute.MirroredStrategy over this process's devices. Variables made
  under `strategy().scope()` are MirroredVariables, one copy per device, kept identical by
  updating every copy with the same gradient. `mean` averages the replicas' gradients inside
  the process; under hybrid Horovod then averages them between processes, once per step.

The optimizer's update runs outside the strategy's scope (the default replica context, where
an update of a MirroredVariable writes every copy): Keras's own in-step all-reduce, clipping
and loss scaling would otherwise see each replica's gradients before they are averaged.
"""

import tensorflow as tf

from hvd_llama import compat
from hvd_llama.errors import UserError

_strategy = None  # the MirroredStrategy under mirrored/hybrid; None under horovod


def setup(dc, local_rank=0, local_size=1):
    """Choose this process's devices for DistConfig `dc` (before TensorFlow starts its runtime)
    and make the strategy over them."""
    global _strategy
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # Several processes may share a host: each grows into its GPUs instead of grabbing all.
        tf.config.experimental.set_memory_growth(gpu, True)
    if dc is None or dc.strategy == "horovod":
        if gpus:
            tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")
        return
    if dc.strategy == "hybrid" and gpus and not dc.devices:
        if len(gpus) % local_size:
            raise UserError(f"dist.strategy=hybrid: this host's {len(gpus)} GPUs do not split "
                            f"evenly over its {local_size} processes")
        share = len(gpus) // local_size
        tf.config.set_visible_devices(gpus[local_rank * share:(local_rank + 1) * share], "GPU")
    if dc.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * dc.logical_cpus)
    _strategy = tf.distribute.MirroredStrategy(_devices(dc))


def _devices(dc):
    """The device names of dist.devices, checked against this process's; by default its GPUs,
    else its (logical) CPUs."""
    have = {_key(d.name): d.name for d in tf.config.list_logical_devices()}
    if not dc.devices:
        return [name for key, name in have.items() if key[0] == "GPU"] or \
            [name for key, name in have.items() if key[0] == "CPU"]
    names = [n.strip() for n in dc.devices.split(",")]
    keys = []
    for name in names:
        try:
            key = _key(name)
        except ValueError:
            key = None
        if key not in have:
            raise UserError(f"'dist.devices': no device {name!r} in this process (it has "
                            f"{', '.join(f'{t}:{i}' for t, i in have)})")
        if key in keys:
            raise UserError(f"'dist.devices': {name!r} is named twice")
        keys.append(key)
    return [have[key] for key in keys]


def _key(name):
    """("GPU", 0) for "GPU:0", "/gpu:0", "/job:localhost/replica:0/task:0/device:GPU:0"."""
    spec = tf.DeviceSpec.from_string(name)
    if spec.device_type is None or spec.device_index is None:
        raise ValueError(name)
    return spec.device_type.upper(), spec.device_index


def strategy():
    """The strategy to build variables under and to run replicas with."""
    return _strategy or tf.distribute.get_strategy()


def count():
    """Replicas in this process."""
    return _strategy.num_replicas_in_sync if _strategy else 1


def describe():
    if _strategy is None:
        return "one device per process"
    names = _strategy.extended.worker_devices
    return (f"MirroredStrategy over {len(names)} device(s) per process "
            f"({', '.join(n.split('device:')[-1] for n in names)})")


def mean(per_replica):
    """The replicas' mean of each tensor in a nest of per-replica values (strategy().run's
    result), on the first device: one batched all-reduce inside the process (NCCL between
    GPUs)."""
    if _strategy is None:
        return per_replica
    flat = tf.nest.flatten(per_replica)
    reduced = compat.batch_mean(_strategy, flat)
    first = [_strategy.experimental_local_results(r)[0] for r in reduced]
    return tf.nest.pack_sequence_as(per_replica, first)
