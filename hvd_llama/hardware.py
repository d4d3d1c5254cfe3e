"""The device's peak FLOP/s, the denominator of MFU (model FLOPs utilisation).

GPUs: the vendor's dense peak for the compute dtype (float32 runs on TF32 tensor cores, which
TensorFlow enables by default on Ampere and later). CPUs have no datasheet figure worth
trusting, so a CPU's peak is measured: the best rate of a square matmul on this process's
threads, at the compute dtype.
"""

import time

import tensorflow as tf

# Dense TFLOP/s per GPU: (float32 via TF32, bfloat16, float16). SXM parts.
GPU_PEAK_TFLOPS = {
    "H200": (494.0, 989.0, 989.0),
    "H100": (494.0, 989.0, 989.0),
    "A100": (156.0, 312.0, 312.0),
    "L40S": (183.0, 362.0, 362.0),
    "A10": (62.5, 125.0, 125.0),
    "V100": (15.7, 0.0, 125.0),  # no bfloat16 tensor cores
}
_COLUMN = {"float32": 0, "bfloat16": 1, "float16": 2}


def peak_tflops(precision, configured=0.0, devices=1):
    """(TFLOP/s per process of `devices` GPUs, where the figure comes from). A CPU's is
    measured on this process's threads: run it in every process at once (after a barrier) so
    that each sees its share of the cores, as in training."""
    if configured:
        return configured, "train.peak_tflops"
    gpus = tf.config.get_visible_devices("GPU")
    if gpus:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        for model, peaks in GPU_PEAK_TFLOPS.items():
            if model in name and peaks[_COLUMN[precision]]:
                return devices * peaks[_COLUMN[precision]], f"{name} datasheet, {precision}"
        return 0.0, f"{name}: unknown peak (set train.peak_tflops)"
    return measure_matmul_tflops(precision), f"measured: CPU {precision} matmul"


def measure_matmul_tflops(precision, n=2048, seconds=0.5):
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
