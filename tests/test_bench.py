"""python -m hvd_llama.bench and bench/peers.py end to end on the tiny config: the fields they
report and that every derived figure (MFU, scaling, bandwidth) follows from measured ones. Speed
itself is never asserted. The targets bench/peers.py checks, on made-up figures. And the FLOP
count behind MFU against an independent count."""

import json
import os
import sys

import numpy as np
import pytest

from conftest import MICRO, REPO, TINY, horovodrun, run

STEP = ["-m", "hvd_llama.bench", "--config", MICRO, "--steps", "1", "--json",
        "train.global_batch=4"]


def last_json(proc):
    line = proc.stdout.strip().splitlines()[-1]
    # Under horovodrun: after "[1,0]<stdout>:", perhaps with another rank's words after it.
    return json.JSONDecoder().raw_decode(line[line.index("{"):])[0]


def check_step_figures(r, processes):
    from hvd_llama import config, plan
    mc = config.load(MICRO).model
    assert r["processes"] == processes and r["global_batch"] == 4 and r["seq_len"] == 32
    assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_s"])
    assert r["tokens_per_s_per_process"] == pytest.approx(r["tokens_per_s"] / processes)
    assert r["flops_per_token"] == plan.flops_per_token(mc, 32)
    assert r["peak_tflops_per_process"] > 0 and r["peak_source"].startswith("measured")
    assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"]
                                     / (r["peak_tflops_per_process"] * 1e12 * processes))
    # stage 3: the gradient pass less its collectives timed alone, which may overlap all of it
    assert (0 <= r["compute_s"] if r["zero"] == 3 else 0 < r["compute_s"])
    assert r["other_s"] == pytest.approx(
        r["step_s"] - r["compute_s"] - r["communication_s"])
    assert r["peak_rss_gib"] > r["peak_rss_over_start_gib"] > 0
    # None where the CPU allocator keeps no statistics (oneDNN off)
    assert r["peak_tensors_gib"] is None or r["peak_rss_gib"] > r["peak_tensors_gib"] > 0


@pytest.mark.bench
def test_step_bench_one_process():
    r = last_json(run([sys.executable, *STEP]))
    check_step_figures(r, 1)
    assert r["communication_s"] == 0.0 and r["controller"] == "none"
    assert r["scaling_efficiency"] is None
    assert "targets" not in r  # measurements only: bench/peers.py checks the targets


@pytest.mark.bench
def test_step_bench_two_processes_with_a_given_single_figure():
    """At dist.zero=2 with 2 micro-batches: its collectives are what it times."""
    from hvd_llama import config, plan
    from hvd_llama.layout import Layout
    overrides = ["dist.zero=2", "train.grad_accum=2"]
    r = last_json(horovodrun("gloo", [*STEP, *overrides, "--single", "1000"]))
    check_step_figures(r, 2)
    c = config.load(MICRO, [*STEP[-1:], *overrides])
    assert r["zero"] == 2 and r["grad_accum"] == 2
    assert r["planned_gib"] * 2 ** 30 == pytest.approx(
        sum(plan.memory_per_replica(c, Layout.of(c, 2)).values()))
    assert r["controller"] == "gloo" and r["communication_s"] > 0
    assert r["scaling_efficiency"] == pytest.approx(r["tokens_per_s"] / 2000)


@pytest.mark.bench
def test_step_bench_measures_the_single_process_figure_under_mpi():
    """--measure-single: rank 0's child must run as a plain process although mpirun's
    environment surrounds it. At dist.zero=3 with remat, whose collectives (two all-gathers of
    the weights and a reduce-scatter) are timed alone."""
    r = last_json(horovodrun("mpi", [*STEP, "dist.zero=3", "train.remat=true",
                                     "--measure-single"]))
    check_step_figures(r, 2)
    assert r["zero"] == 3 and r["communication_s"] > 0
    assert r["controller"] == "mpi" and r["single_tokens_per_s"] > 0
    assert r["scaling_efficiency"] == pytest.approx(
        r["tokens_per_s"] / (2 * r["single_tokens_per_s"]))


@pytest.mark.bench
def test_allreduce_bench_figures_follow_from_the_timings(tmp_path):
    horovodrun("gloo", ["-m", "hvd_llama.bench", "allreduce", "--output",
                        str(tmp_path / "r.json"), "--max-bytes", str(1 << 20), "--seconds",
                        "0.05"])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["processes"] == 2 and r["controller"] == "gloo" and r["copy_gbps"] > 0
    sizes = [1 << k for k in range(10, 21, 2)]
    assert [(x["bytes"], x["compression"]) for x in r["rows"]] == \
        [(s, c) for c in ("none", "fp16") for s in sizes]
    for x in r["rows"]:
        assert x["algbw_gbps"] == pytest.approx(x["bytes"] / x["seconds"] / 1e9)
        assert x["busbw_gbps"] == pytest.approx(x["algbw_gbps"] * 2 * (2 - 1) / 2)
        assert x["busbw_over_copy"] == pytest.approx(x["busbw_gbps"] / r["copy_gbps"])
    assert "targets" not in r


def test_allreduce_bench_needs_a_launcher():
    proc = run([sys.executable, "-m", "hvd_llama.bench", "allreduce"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the allreduce benchmark "
                                                           "needs 2 or more processes")


@pytest.mark.parametrize("mfu, met", [(0.60, True), (0.59, False)])
def test_peers_targets_follow_from_the_figures(mfu, met, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    from peers import targets
    rows = [{"system": system, "processes": p, "threads": t, "tokens_per_s": s}
            for system, p, t, s in [("hvd_llama (horovodrun)", 2, 1, 400.0),
                                    ("PyTorch eager", 1, 2, 100.0), ("PyTorch eager", 1, 1, 60.0),
                                    ("tf.distribute MWMS", 2, 1, 500.0),
                                    ("PyTorch DDP (Gloo)", 2, 1, 200.0)]]
    one = {"tokens_per_s": 130.0, "threads_per_process": 2, "mfu": mfu}
    many = {"scaling_efficiency": 0.95}

    def allreduce(busbw_over_copy, max_bytes):
        return {"rows": [{"bytes": b, "compression": c, "busbw_over_copy": busbw_over_copy}
                         for c in ("none", "fp16") for b in (1 << 20, 64 << 20) if b <= max_bytes]}
    got = targets(rows, one, many, 2, {"gloo": allreduce(0.8, 64 << 20),
                                       "mpi": allreduce(0.9, 1 << 20)})
    assert [(t["what"], t["value"], t["at_least"], t["met"]) for t in got] == [
        ("hvd_llama 1 process over PyTorch eager 1 process", 1.3, 1.2, True),
        ("hvd_llama 1 process: MFU against the measured matmul peak", mfu, 0.60, met),
        ("hvd_llama 2 processes: scaling efficiency", 0.95, 0.95, True),
        ("hvd_llama 2 processes over MWMS 2 workers", 0.8, 1.0, False),
        ("hvd_llama 2 processes over DDP 2 processes", 2.0, 1.0, True),
        # mpi measured up to 1 MiB only: no bandwidth target for it.
        ("gloo: bus bandwidth at 64 MiB over the copy bound", 0.8, 0.80, True)]


def matmul_flops(graph):
    """FLOPs of every matrix product in a traced graph: 2 x output elements x the contracted
    size, read from the ops' static shapes."""
    total = 0
    for op in graph.get_operations():
        if op.type in ("MatMul", "BatchMatMulV2", "BatchMatMulV3"):
            a = [int(n) for n in op.inputs[0].shape]
            moved = op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
            total += 2 * int(np.prod(op.outputs[0].shape)) * (a[-2] if moved else a[-1])
    return total


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_agrees_with_the_traced_graph(tied):
    """plan.flops_per_token (the MFU numerator) against the matrix products TensorFlow runs in
    the forward pass, times 3 for forward + backward: they differ by exactly the RMSNorm scales,
    which the 6 x parameters rule counts at 6 FLOPs each."""
    import tensorflow as tf
    from hvd_llama import config, model as model_lib, plan
    mc = config.load(TINY, ["model.num_layers=2", f"model.tie_word_embeddings={tied}"]).model
    seq = 64
    model = model_lib.build(mc, seed=0)
    forward = tf.function(lambda t: model({"token_ids": t, "padding_mask": tf.ones_like(t)}))
    graph = forward.get_concrete_function(tf.TensorSpec([1, seq], tf.int32)).graph
    norms = mc.num_layers * 2 * mc.hidden_dim + mc.hidden_dim
    assert 3 * matmul_flops(graph) / seq == plan.flops_per_token(mc, seq) - 6 * norms


@pytest.mark.bench
def test_peers_end_to_end(tmp_path):
    """bench/peers.py on the tiny config, one timed step per system; PyTorch from this
    environment (the suite's own torch) instead of a virtualenv of its own."""
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# B\n\nbefore\n<!-- peers:begin -->\nold\n<!-- peers:end -->\nafter\n")
    run([sys.executable, os.path.join(REPO, "bench", "peers.py"), "--config", MICRO,
         "--steps", "1", "--torch-python", sys.executable, "--allreduce-max-bytes",
         str(1 << 20), "--results", str(tmp_path / "results"), "--benchmarks",
         str(benchmarks)], timeout=1800)
    [stem] = {name.rsplit(".", 1)[0] for name in os.listdir(tmp_path / "results")}
    result = json.loads((tmp_path / "results" / f"{stem}.json").read_text())
    systems = [(r["system"], r["processes"]) for r in result["rows"]]
    assert systems == [("hvd_llama", 1), ("hvd_llama, XLA", 1), ("hvd_llama", 1),
                       ("hvd_llama (horovodrun)", 2),
                       ("keras-hub fit", 1), ("tf.distribute MWMS", 1),
                       ("tf.distribute MWMS", 2), ("PyTorch eager", 1), ("PyTorch eager", 1),
                       ("PyTorch DDP (Gloo)", 2)]
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    for i in (3, 6, 9):  # scaling: N processes over N x the one-process share row before them
        assert result["rows"][i]["scaling_efficiency"] == pytest.approx(
            result["rows"][i]["tokens_per_s"] / (2 * result["rows"][i - 1]["tokens_per_s"]))
    assert set(result["allreduce"]) == {"gloo", "mpi"}
    assert len(result["targets"]) == 5  # 64 MiB allreduce not measured: no bandwidth target
    text = benchmarks.read_text()
    assert "old" not in text and text.startswith("# B\n\nbefore\n") and \
        text.endswith("<!-- peers:end -->\nafter\n")
    assert f"| PyTorch DDP (Gloo) | 2 x {max(1, os.cpu_count() // 2)} |" in text
    assert (tmp_path / "results" / f"{stem}.png").stat().st_size > 0
    assert (tmp_path / "results" / f"{stem}.md").read_text() in text


@pytest.mark.bench
def test_faults_bench_end_to_end(tmp_path, cache_dir):
    """bench/faults.py with the Gloo controller: a killed rank, a preemption signal and a
    killed rank of an elastic job, each measured from a real 2-process run."""
    run([sys.executable, os.path.join(REPO, "bench", "faults.py"), "--controllers", "gloo",
         "--faults", "sigkill", "sigusr1", "elastic", "--cache-dir", cache_dir, "--results",
         str(tmp_path), "--benchmarks", ""])
    [stem] = {name.rsplit(".", 1)[0] for name in os.listdir(tmp_path)}
    killed, preempted, elastic = json.loads((tmp_path / f"{stem}.json").read_text())["rows"]
    assert elastic["survived"] and elastic["seconds_to_end"] < 60
    assert 0 < elastic["work_lost_steps"] <= 8  # steps since the commit every 8th step
    assert killed["detected"] and killed["exit_status"] == 137 and killed["rank_and_host_named"]
    assert 0 < killed["work_lost_steps"] < 8  # steps since the checkpoint every 8th step
    assert preempted["exit_status"] == 75 and preempted["work_lost_steps"] == 0
    assert preempted["steps_after_fault"] in (0, 1)
