"""What the planner and MFU know of a device: a GPU's datasheet peak FLOP/s and memory, or a
CPU's measured peak.

GPUs: the vendor's dense peak for the compute dtype (float32 runs on TF32 tensor cores, which
TensorFlow enables by default on Ampere and later). CPUs have no datasheet figure worth
trusting, so a CPU's peak is measured: the best rate of a square matmul on this process's
threads, at the compute dtype. TensorFlow is imported only where a device is looked at: the
dry run reads the table without it.
"""

import time
from typing import NamedTuple


class Gpu(NamedTuple):
    tflops: tuple  # dense peak TFLOP/s at (float32 via TF32, bfloat16, float16)
    memory_gib: float


# SXM parts where there is a choice. A100s (40 or 80 GB) and V100s (16 or 32 GB) are not told
# apart: the larger size is listed, so a too-big run may pass the check, never a fitting one fail.
GPUS = {
    "H200": Gpu((494.0, 989.0, 989.0), 141),
    "H100": Gpu((494.0, 989.0, 989.0), 80),
    "A100": Gpu((156.0, 312.0, 312.0), 80),
    "L40S": Gpu((183.0, 362.0, 362.0), 48),
    "A10": Gpu((62.5, 125.0, 125.0), 24),
    "V100": Gpu((15.7, 0.0, 125.0), 32),  # no bfloat16 tensor cores
}
_COLUMN = {"float32": 0, "bfloat16": 1, "float16": 2}


def gpu_model(name):
    """GPUS's key for a device name such as "NVIDIA A100-SXM4-80GB" (or a key, any case);
    None if not listed. The longest key wins: an A100 is no A10."""
    return max((key for key in GPUS if key in name.upper()), key=len, default=None)


def gpu_name():
    """This process's first visible GPU as TensorFlow names it; "" on a host without one."""
    import tensorflow as tf
    gpus = tf.config.get_visible_devices("GPU")
    if not gpus:
        return ""
    return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")


def stated_peak(precision, configured=0.0, gpu="", devices=1):
    """(TFLOP/s per process of `devices` GPUs named `gpu`, where the figure comes from), known
    without measuring: train.peak_tflops (`configured`) if set, else the datasheet's; 0.0 when
    neither knows (the source then says why, or is "" when no GPU is named)."""
    if configured:
        return configured, "train.peak_tflops"
    model = gpu_model(gpu)
    peak = GPUS[model].tflops[_COLUMN[precision]] if model else 0.0
    if peak:
        return devices * peak, f"{gpu} datasheet, {precision}"
    return 0.0, gpu and f"{gpu}: unknown {precision} peak"


def peak_tflops(precision, configured=0.0, devices=1):
    """(TFLOP/s per process of `devices` GPUs, where the figure comes from). A CPU's is
    measured on this process's threads: run it in every process at once (after a barrier) so
    that each sees its share of the cores, as in training."""
    gpu = gpu_name()
    if configured or gpu:
        peak, source = stated_peak(precision, configured, gpu, devices)
        return peak, source if peak else f"{source} (set train.peak_tflops)"
    return measure_matmul_tflops(precision), f"measured: CPU {precision} matmul"


def measure_matmul_tflops(precision, n=2048, seconds=0.5):
    import tensorflow as tf
    dtype = tf.as_dtype(precision)
    a = tf.random.stateless_normal([n, n], seed=[1, 2], dtype=tf.float32)
    a = tf.cast(a, dtype)
    matmul = tf.function(lambda x: tf.reduce_sum(tf.cast(tf.matmul(x, x), tf.float32)))
    matmul(a).numpy()  # trace and warm up
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        matmul(a).numpy()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best / 1e12
