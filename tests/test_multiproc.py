"""Real processes under `horovodrun -np 2 -H localhost:2`, with the Gloo and the MPI controller.

Each fixture launches once and every rank writes what it saw; the tests read those files.
"""

import os
import shutil
import sys

import numpy as np
import pytest

from conftest import (CONTROLLERS, MICRO, WORKER, arrays, assert_trains_like, horovodrun, rel_err,
                      rank_lines, run, train_args)


@pytest.fixture(scope="module", params=CONTROLLERS)
def two_processes(request, tmp_path_factory, cache_dir):
    """2 processes x batch 4 under horovodrun with the given controller, recording Horovod's
    timeline."""
    out = str(tmp_path_factory.mktemp(f"np2-{request.param}"))
    proc = horovodrun(request.param, train_args(out, cache_dir, "dist.timeline=timeline.json"))
    return request.param, out, proc.stdout


def test_two_processes_train_like_one_with_twice_the_batch(one_process, two_processes):
    controller, out, stdout = two_processes
    assert "2 process(es) on 1 host(s)" in stdout and f"controller {controller}" in stdout
    assert "8 sequences = 256 tokens = 2 process(es) x 1 micro-batch(es) x 4" in stdout
    assert_trains_like(out, one_process)


def test_horovod_timeline_records_the_allreduces(two_processes):
    _, out, _ = two_processes
    with open(os.path.join(out, "run", "timeline.json")) as f:
        trace = f.read()
    assert "ALLREDUCE" in trace


def test_parameters_are_bitwise_identical_on_both_ranks(two_processes):
    _, out, _ = two_processes
    for a, b in zip(arrays(os.path.join(out, "rank0.npz")), arrays(os.path.join(out, "rank1.npz"))):
        assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def collectives_one(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("coll1"))
    run([sys.executable, WORKER, "collectives", out])
    return dict(np.load(os.path.join(out, "rank0.npz")))


@pytest.fixture(scope="module", params=CONTROLLERS)
def collectives(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(f"coll-{request.param}"))
    # A 500 ms cycle that only HOROVOD_CYCLE_WAKE keeps from slowing every collective down.
    horovodrun(request.param, [WORKER, "collectives", out],
               env={"HOROVOD_CYCLE_TIME": "500", "HOROVOD_CYCLE_WAKE": "1"})
    return [dict(np.load(os.path.join(out, f"rank{r}.npz"))) for r in (0, 1)]


def test_a_collective_starts_horovods_cycle_at_once(collectives):
    """docker/horovod/cycle-wake-on-enqueue.patch: ten allreduces in a row, each waiting for the
    last, take far less than ten 500 ms cycles (about 5 s on a build without it). The ranks
    reach them apart (rank 0 leaves model.fit first), which needs the patch's early retry
    while a tensor waits for the other rank: without it the first few took 500 ms each."""
    for rank in collectives:
        assert rank["ten_allreduces_s"] < 2.0


def test_broadcast_gives_every_rank_rank0s_weights(collectives):
    r0, r1 = collectives
    assert not np.array_equal(r0["init"], r1["init"]), "ranks should start differently"
    assert np.array_equal(r0["after_broadcast"], r0["init"])
    assert np.array_equal(r1["after_broadcast"], r0["init"])


@pytest.mark.parametrize("variant, reduce, rtol", [
    ("average", np.mean, 1e-6), ("sum", np.sum, 1e-6), ("fp16", np.mean, 2e-3),
])
def test_applied_gradient_is_the_reduction_of_local_gradients(collectives, variant, reduce,
                                                              rtol):
    local = np.stack([r[f"{variant}_local"] for r in collectives])  # each rank's own gradient
    expected = reduce(local, axis=0)
    assert not np.allclose(local[0], local[1]), "ranks should see different data"
    for r in collectives:
        assert rel_err(r[f"{variant}_delta"], expected) < rtol


def test_clipping_acts_on_the_averaged_gradient(collectives):
    for r in collectives:  # mean (2, 0) clipped to norm 1; per-rank clipping would give 0.5
        np.testing.assert_allclose(r["clip_delta"], [1.0, 0.0], rtol=1e-6)


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(collectives):
    for r in collectives:
        assert np.isnan(r["nan_norm"])
        assert np.array_equal(r["nan_delta"], [0.0, 0.0])
        np.testing.assert_allclose(r["after_nan_delta"], [1.0, 2.0])


def test_loss_scale_overflow_on_one_rank_skips_the_step_on_every_rank(collectives):
    for r in collectives:
        assert np.array_equal(r["overflow_delta"], [0.0, 0.0])
        assert r["overflow_scale"] == 512.0
        np.testing.assert_allclose(r["after_overflow_delta"], [1.0, 2.0])


def test_model_fit_with_distributed_optimizer(collectives, collectives_one):
    r0, r1 = collectives
    assert np.array_equal(r0["fit"], r1["fit"])
    assert rel_err(r0["fit"], collectives_one["fit"]) < 1e-5


def test_bad_run_dir_stops_every_rank_with_one_line(two_processes, tmp_path):
    controller, out, _ = two_processes
    other = str(tmp_path / "other")
    shutil.copytree(os.path.join(out, "run"), other)
    proc = horovodrun(controller, ["-m", "hvd_llama.train", "--config", MICRO,
                                   f"run.dir={other}", "train.resume=true",
                                   "model.hidden_dim=128"], check=False)
    assert proc.returncode != 0
    ranks = rank_lines(proc)
    assert not [line for line in ranks if "Traceback" in line]
    for rank in (0, 1):
        errors = [line for line in ranks if f"error (rank {rank}): " in line]
        assert len(errors) == 1 and "model.hidden_dim" in errors[0], ranks
