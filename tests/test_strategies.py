"""dist.strategy: horovod, mirrored and hybrid train alike, on the CPU split into logical devices.

The reference is one plain process at global batch 8 (conftest.one_process); mirrored runs 2
devices of 4 sequences. Hybrid, 2 processes x 2 devices of 2 sequences, trains alike under
horovodrun with the Gloo controller between two hosts (test_two_nodes.py) and under MPI on
this one (test_zero.py, which also resumes one checkpoint under every strategy and ZeRO stage
in turn).
"""

import json
import os
import sys

import numpy as np
import pytest

from conftest import (CONTROLLERS, TINY, assert_one_line_error, assert_trains_like,
                      horovodrun, rank_lines, run, train_args)

MIRRORED = ["dist.strategy=mirrored", "dist.logical_cpus=2"]
HYBRID = ["dist.strategy=hybrid", "dist.logical_cpus=2"]


def copies(out, rank=0):
    """How many device copies each weight has, and their largest difference."""
    with open(os.path.join(out, f"rank{rank}-copies.json")) as f:
        report = json.load(f)
    return {key: report[key] for key in ("copies", "spread")}


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory, cache_dir):
    out = str(tmp_path_factory.mktemp("mirrored"))
    proc = run([sys.executable, *train_args(out, cache_dir, *MIRRORED, "train.export=true")])
    return out, proc.stdout


def test_mirrored_over_two_devices_trains_like_one_process_with_twice_the_batch(
        one_process, mirrored):
    out, stdout = mirrored
    assert "dist.strategy=mirrored: MirroredStrategy over 2 device(s) per process" in stdout
    assert "8 sequences = 256 tokens = 1 process(es) x 2 device(s) x 1 micro-batch(es) x 4" \
        in stdout
    assert_trains_like(out, one_process)
    assert copies(out) == {"copies": 2, "spread": 0.0}


def test_the_export_of_a_mirrored_run_serves_the_same_logits(one_process, mirrored):
    import tensorflow as tf
    tokens = np.random.default_rng(0).integers(0, 8000, (2, 16)).astype(np.int32)
    logits = []
    for out in (one_process, mirrored[0]):
        served = tf.saved_model.load(os.path.join(out, "run", "saved_model", "1"))
        logits.append(served.signatures["serving_default"](
            token_ids=tf.constant(tokens), padding_mask=tf.ones_like(tokens))["logits"].numpy())
    assert logits[0].shape == (2, 16, 8000)
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-3, atol=1e-4)


def refused(proc, run_dir, *words):
    """The run stopped before any compute (no run dir) with one error line naming `words`."""
    assert_one_line_error(proc, *words)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines()
              if line.startswith("error")]  # the CLI's lines, not TensorFlow's
    assert len(errors) == 1, errors
    assert not os.path.exists(run_dir)


def test_hybrid_without_a_launcher_is_refused(tmp_path, cache_dir):
    """Refused after TensorFlow has loaded, with nothing else on stderr: the oneDNN notice
    (AVX-512 CPUs) and CUDA's stub lines, which TF_CPP_MIN_LOG_LEVEL does not stop, are kept
    off it."""
    run_dir = str(tmp_path / "run")
    proc = run([sys.executable, "-m", "hvd_llama.train", "--config", TINY, f"run.dir={run_dir}",
                f"data.cache_dir={cache_dir}", *HYBRID], check=False,
               env={"TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": None})
    refused(proc, run_dir, "dist.strategy=hybrid", "horovodrun")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("devices, named", [("CPU:0,GPU:1", "'GPU:1'"),
                                            ("CPU:0,CPU:7", "'CPU:7'"),
                                            ("cpu:1,/device:CPU:1", "named twice"),
                                            ("tpu0", "'tpu0'")])
def test_devices_that_this_process_lacks_are_refused(tmp_path, cache_dir, devices, named):
    run_dir = str(tmp_path / "run")
    proc = run([sys.executable, "-m", "hvd_llama.train", "--config", TINY, f"run.dir={run_dir}",
                f"data.cache_dir={cache_dir}", *MIRRORED, f"dist.devices={devices}"],
               check=False)
    refused(proc, run_dir, "'dist.devices'", named)


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_mirrored_under_a_launcher_of_two_processes_is_refused_by_every_rank(
        tmp_path, cache_dir, controller):
    run_dir = str(tmp_path / "run")
    proc = horovodrun(controller, ["-m", "hvd_llama.train", "--config", TINY,
                                   f"run.dir={run_dir}", f"data.cache_dir={cache_dir}",
                                   *MIRRORED], check=False)
    assert proc.returncode != 0
    lines = rank_lines(proc)
    assert not [line for line in lines if "Traceback" in line]
    errors = [line for line in lines if "error: dist.strategy=mirrored runs as one process, "
              "but the launcher started 2" in line]
    assert len(errors) == 2, lines  # one line from each rank
    assert not os.path.exists(run_dir)
