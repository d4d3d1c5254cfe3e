"""The training recipe: schedule, weight decay, accumulation, mixed precision, recomputation,
XLA, NaN handling, Horovod's knobs, progress metrics and the plot."""

import json
import math
import os
import re
import sys

import numpy as np
import pytest

from conftest import (MICRO, REPO, TINY, assert_trains_like, horovodrun, losses, run,
                      train_args, train_cli)
from hvd_llama import config, distributed, optim, plan
from hvd_llama.errors import UserError
from hvd_llama.layout import Layout


def test_schedule_values_at_chosen_steps():
    tc = config.load(None, ["train.learning_rate=1.0", "train.warmup_steps=10",
                            "train.steps=110"]).train
    lr = optim.schedule(tc)
    expected = {0: 0.1, 4: 0.5, 9: 1.0,  # linear warmup: step i uses (i + 1) / warmup
                10: 1.0, 60: 0.1 + 0.9 * 0.5, 110: 0.1, 500: 0.1}  # cosine to 10%, then flat
    for step, value in expected.items():
        assert float(lr(step)) == pytest.approx(value, rel=1e-6), step


@pytest.mark.parametrize("decay_all", [False, True])
def test_norms_and_embeddings_decay_only_when_asked(decay_all):
    import keras
    from hvd_llama import model as model_lib
    c = config.load(None, ["model.vocab_size=64", "model.num_layers=1", "model.hidden_dim=16",
                           "model.intermediate_dim=24", "model.num_query_heads=2",
                           "model.num_key_value_heads=1", "train.warmup_steps=0",
                           f"train.decay_norms_and_embeddings={str(decay_all).lower()}"])
    model = model_lib.build(c.model, seed=0)
    variables = model.trainable_variables
    opt = optim.build(c.train, 0.01, variables)
    before = [v.numpy() for v in variables]
    opt.apply([keras.ops.zeros_like(v) for v in variables], variables)  # decay alone moves
    decayed = {v.path for v, b in zip(variables, before) if not np.array_equal(v.numpy(), b)}
    kernels = {v.path for v in variables if len(v.shape) > 1 and "embedding" not in v.path}
    assert kernels  # attention and MLP kernels
    assert decayed == ({v.path for v in variables} if decay_all else kernels)


def test_remat_gives_the_same_gradients():
    import tensorflow as tf
    from hvd_llama import model as model_lib
    c = config.load(TINY, ["model.num_layers=2"])
    tokens = np.random.default_rng(0).integers(0, 8000, (2, 65)).astype("int32")
    grads, matmuls = [], []
    for remat in (False, True):
        model = model_lib.build(c.model, seed=0, remat=remat)

        @tf.function
        def grad(t):
            with tf.GradientTape() as tape:
                logits = model({"token_ids": t[:, :-1], "padding_mask": tf.ones_like(t[:, :-1])},
                               training=True)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(t[:, 1:], logits))
            return [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]

        graph = grad.get_concrete_function(tf.TensorSpec([2, 65], tf.int32)).graph.as_graph_def()
        nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
        matmuls.append(sum(n.op in ("Einsum", "MatMul", "BatchMatMulV2") for n in nodes))
        grads.append([g.numpy() for g in grad(tokens)])
    assert matmuls[1] > matmuls[0]  # the backward pass recomputes the blocks' forward matmuls
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_global_batch_must_divide_over_processes_and_micro_batches():
    c = config.load(TINY, ["train.global_batch=8", "train.grad_accum=2"])
    assert Layout.of(c, 2).micro == 2
    with pytest.raises(UserError, match="'train.global_batch' 8 does not divide into 3 repl"):
        Layout.of(c, 3)
    with pytest.raises(UserError, match="train.grad_accum 3"):
        config.load(TINY, ["train.grad_accum=3"])


@pytest.mark.parametrize("override, key", [
    ("train.precision=float8", "train.precision"),
    ("train.jit_compile=maybe", "train.jit_compile"),
    ("train.on_nonfinite=ignore", "train.on_nonfinite"),
    ("dist.cycle_time_ms=-1", "dist.cycle_time_ms"),
])
def test_bad_recipe_keys_are_one_line_errors_before_any_compute(override, key, tmp_path):
    proc = train_cli(f"run.dir={tmp_path / 'r'}", override, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and key in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "r")


def test_jit_compile_accepts_yaml_booleans():
    assert config.load(None, ["train.jit_compile=true"]).train.jit_compile == "true"
    assert config.load(None, ["train.jit_compile=false"]).train.jit_compile == "false"


def test_dry_run_refuses_a_process_count_the_batch_does_not_divide():
    proc = run([sys.executable, "-m", "hvd_llama.train", "--config", TINY, "--dry-run",
                "--processes", "3"], check=False)
    assert proc.returncode == 2
    assert "'train.global_batch' 8 does not divide into 3 replica(s)" in proc.stderr


def test_a_launch_the_global_batch_does_not_divide_stops_every_rank(tmp_path, cache_dir):
    proc = horovodrun("gloo", ["-m", "hvd_llama.train", "--config", TINY,
                               f"run.dir={tmp_path / 'r'}", f"data.cache_dir={cache_dir}",
                               "train.global_batch=3"], check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines()
              if "'train.global_batch' 3 does not divide into 2 replica(s)" in line]
    assert errors and all(re.match(r"^\[\d\]<stderr>:error \(rank \d\): ", e) for e in errors)
    assert not os.path.exists(tmp_path / "r")


def test_dry_run_memory_follows_precision_and_remat():
    c = config.load(os.path.join(REPO, "configs", "llama-7b.yaml"))
    act = {}
    for precision in ("float32", "bfloat16"):
        for remat in (False, True):
            cc = config.load(os.path.join(REPO, "configs", "llama-7b.yaml"),
                             [f"train.precision={precision}", f"train.remat={str(remat).lower()}"])
            act[precision, remat] = plan.memory_per_replica(cc, Layout.of(cc, 64))["activations"]
    assert act["float32", False] > act["bfloat16", False] > act["bfloat16", True]
    assert plan.memory_per_replica(c, Layout.of(c, 64))["weights"] == \
        4 * plan.param_count(c.model)


def test_horovod_knobs_become_horovod_variables():
    dc = config.load(None, ["dist.fusion_threshold_mb=32", "dist.cycle_time_ms=2.5",
                            "dist.timeline=tl.json", "dist.stall_shutdown_seconds=90"]).dist
    env = distributed.horovod_env(dc, "/r")
    assert env == {"HOROVOD_FUSION_THRESHOLD": str(32 * 1024 * 1024),
                   "HOROVOD_CYCLE_TIME": "2.5", "HOROVOD_CYCLE_WAKE": "1",
                   "HOROVOD_TIMELINE": "/r/tl.json", "HOROVOD_STALL_CHECK_TIME_SECONDS": "60",
                   "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "90"}
    auto = config.load(None).dist  # cycle_time_ms 0: Horovod's 1 ms with GPUs, longer without
    gpus = distributed.horovod_env(auto, "/r", gpus=True)
    assert gpus["HOROVOD_CYCLE_TIME"] == "1.0" and "HOROVOD_CYCLE_WAKE" not in gpus
    assert distributed.horovod_env(auto, "/r")["HOROVOD_CYCLE_TIME"] == \
        str(distributed.CPU_CYCLE_TIME_MS)
    env = distributed.horovod_env(config.load(
        None, ["dist.autotune=true", "dist.stall_warning_seconds=0"]).dist, "/r")
    assert env == {"HOROVOD_AUTOTUNE": "1", "HOROVOD_AUTOTUNE_LOG": "/r/autotune.csv",
                   "HOROVOD_CYCLE_WAKE": "1", "HOROVOD_STALL_CHECK_DISABLE": "1"}


# --- Short real runs of the tiny config -----------------------------------------------------

def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_accumulating_k_micro_batches_equals_one_batch_of_k_times_b(
        one_process, tmp_path, cache_dir):
    """4 micro-batches of 2 against the reference's one batch of 8 (conftest.one_process)."""
    out = str(tmp_path)
    run([sys.executable, *train_args(out, cache_dir, "train.grad_accum=4")])
    np.testing.assert_allclose([r["grad_norm"] for r in records(f"{out}/run")],
                               [r["grad_norm"] for r in records(f"{one_process}/run")],
                               rtol=1e-4)
    assert_trains_like(out, one_process)  # losses to 1e-5, weights to 1e-5


def test_xla_compiled_steps_match_the_plain_ones(one_process, tmp_path, cache_dir):
    out = str(tmp_path)  # the reference runs with train.jit_compile=false
    run([sys.executable, *train_args(out, cache_dir, "train.jit_compile=true")])
    np.testing.assert_allclose(losses(out), losses(one_process), rtol=1e-4)


PRECISION_STEPS = 15
# The micro config at ten times its learning rate: it learns fast enough to tell apart.
PRECISION_RUN = [f"train.steps={PRECISION_STEPS}", "train.learning_rate=1.0e-2",
                 "train.export=false"]


@pytest.fixture(scope="module")
def by_precision(tmp_path_factory, cache_dir):
    """Final loss of PRECISION_STEPS micro steps at each precision."""
    final = {}
    for precision in ("float32", "bfloat16", "float16"):
        run_dir = str(tmp_path_factory.mktemp(precision))
        train_cli(f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", *PRECISION_RUN,
                  f"train.precision={precision}", "train.checkpoint_every=100",
                  "train.eval_every=0", config=MICRO)
        final[precision] = records(run_dir)[-1]
    return final


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_trains_like_float32(by_precision, precision):
    """Within 2% of float32's loss after 15 steps (the loss falls from 9.0 to about 7.1)."""
    ref, got = by_precision["float32"]["loss"], by_precision[precision]["loss"]
    assert ref < 8.5  # it learned
    assert abs(got - ref) < 0.02 * ref, (precision, got, ref)
    if precision == "float16":
        assert by_precision[precision]["loss_scale"] > 1.0


def test_progress_records_hold_every_metric(by_precision):
    r = by_precision["float32"]
    assert r["step"] == PRECISION_STEPS and r["eta_sec"] == 0
    assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)
    assert 0 < r["mfu"] < 1 and r["tokens_per_sec"] > 0 and r["grad_norm"] > 0
    assert r["learning_rate"] == pytest.approx(
        float(optim.schedule(config.load(MICRO, PRECISION_RUN).train)(PRECISION_STEPS - 1)),
        rel=1e-6)


def test_nan_stops_every_rank_at_the_same_step(tmp_path, cache_dir):
    # A learning rate of 1e30 blows the weights up after the first update.
    run_dir = str(tmp_path / "r")
    proc = horovodrun("gloo", ["-m", "hvd_llama.train", "--config", MICRO, f"run.dir={run_dir}",
                               f"data.cache_dir={cache_dir}", "train.steps=6",
                               "train.learning_rate=1.0e+30", "train.warmup_steps=0",
                               "train.checkpoint_every=1", "train.log_every=1"], check=False)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines()
              if "NaN/Inf; stopped" in line]
    # Each rank stops by itself (their gradient norms are the same allreduced figure); the
    # first to exit makes horovodrun end the other, sometimes before it has printed.
    assert 1 <= len(errors) <= 2 and all(re.match(r"^\[\d\]<stderr>:error \(rank \d\): step", e)
                                         for e in errors), errors
    steps = {line.split("): step ")[1].split(":")[0] for line in errors}
    assert len(steps) == 1  # the same step on both
    bad = int(steps.pop())
    assert {r["step"] for r in records(run_dir)} == set(range(1, bad))
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert ckpts[-1] == f"step-{bad - 1:08d}"  # nothing written for the bad step


def test_nan_steps_can_be_skipped(tmp_path, cache_dir):
    run_dir = str(tmp_path / "r")
    proc = train_cli(f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "train.steps=4",
                     "train.learning_rate=1.0e+30", "train.warmup_steps=0",
                     "train.on_nonfinite=skip", "train.log_every=1", "train.eval_every=0",
                     "train.export=false",
                     config=MICRO)
    last = records(run_dir)[-1]
    assert last["step"] == 4 and last["skipped_steps"] >= 1
    assert "NaN/Inf gradients, step skipped" in proc.stdout


def test_plot_draws_the_metrics(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "loss": 9.0 - step, "perplexity": 1e3 / step,
                                "learning_rate": 1e-3, "tokens_per_sec": 2000.0}) + "\n")
    run([sys.executable, "-m", "hvd_llama.plot", str(run_dir)])
    png = (run_dir / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1100
    (run_dir / "metrics.jsonl").write_text("{broken\n")
    proc = run([sys.executable, "-m", "hvd_llama.plot", str(run_dir)], check=False)
    assert proc.returncode == 2 and "metrics.jsonl:1: not a JSON record" in proc.stderr
    assert (run_dir / "metrics.png").read_bytes() == png  # the old picture survives
