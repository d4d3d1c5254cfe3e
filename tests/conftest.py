"""Helpers for tests that run hvd_llama as real processes, alone or under horovodrun."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hvd_llama.launcher import plain_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")  # for tests of learning
MICRO = os.path.join(REPO, "configs", "micro.yaml")  # for tests of equivalence and plumbing
WORKER = os.path.join(REPO, "tests", "mp_worker.py")
HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")
CONTROLLERS = ["gloo", "mpi"]
STEPS = 5  # of the equivalence runs: all inside micro's warmup, so train.steps may differ
# The single-process runs must not think they were launched.
ENV = {**plain_env(), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


def run(cmd, check=True, timeout=900, env=None):
    """Run a command to completion (in ENV, updated by `env`; a None value removes a variable);
    on an unexpected exit, fail with the tail of its output."""
    full = {k: v for k, v in {**ENV, **(env or {})}.items() if v is not None}
    proc = subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        text = proc.stdout + proc.stderr
        if len(text) > 8000:  # the first error and the last words both matter
            text = text[:3000] + "\n[...]\n" + text[-5000:]
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text}")
    return proc


def horovodrun(controller, args, check=True, env=None):
    """`horovodrun -np 2 -H localhost:2 --gloo|--mpi python ARGS`."""
    return run([HOROVODRUN, "-np", "2", "-H", "localhost:2", f"--{controller}",
                sys.executable, *args], check=check, env=env)


def rank_lines(proc):
    """What the ranks of a horovodrun job printed: horovodrun prefixes it with [rank] (Gloo) or
    [1,rank] (MPI). horovodrun's own report of a failed job, after them, is not ours to judge."""
    return [line for line in (proc.stdout + proc.stderr).splitlines()
            if re.match(r"^\[(\d+,)?\d+\]<std(out|err)>:", line)]


def read_until(job, pattern, seen):
    """Read the job's output into `seen` until a line matches `pattern` (or the job ends)."""
    for line in job.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return
    raise AssertionError(f"the job ended before printing {pattern!r}:\n{''.join(seen)[-4000:]}")


def assert_one_line_error(proc, *fragments):
    """Exit status 2, no traceback, and an `error...` last line holding every fragment."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error"), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)


def train_cli(*overrides, check=True, config=TINY):
    return run([sys.executable, "-m", "hvd_llama.train", "--config", config, *overrides],
               check=check)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache (corpus, tokenizer, tokens) for the whole session: built once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def short(cache_dir):
    """Overrides for a short tiny run: 6 steps of 4 sequences, logged every step, checkpoints
    at 3 and 6."""
    return [f"data.cache_dir={cache_dir}", "train.steps=6", "train.global_batch=4",
            "train.log_every=1", "train.checkpoint_every=3"]


def arrays(path):
    """The arrays of an .npz in the order they were saved."""
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def losses(out):
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def assert_trains_like(out, reference, steps=STEPS):
    """OUT's run logged the reference's loss at every step and ended with its weights (rank 0's),
    to float32 rounding."""
    np.testing.assert_allclose(losses(out), losses(reference), rtol=1e-5)
    assert len(losses(out)) == steps
    for a, b in zip(arrays(os.path.join(out, "rank0.npz")),
                    arrays(os.path.join(reference, "rank0.npz")), strict=True):
        assert rel_err(a, b) < 1e-5


def train_args(out, cache_dir, *overrides, steps=STEPS):
    """mp_worker's micro run for `steps` steps at global batch 8, whatever the process and
    device count, in OUT/run, not exported (train.export=true where a test needs it). Its
    gradient norms are 0.6-0.75: clipping at 0.5 acts at every step. These runs check
    neither MFU nor validation: a stated peak spares each the second-long measurement of the
    CPU's, and no evaluation the ~8 s of tracing the model for it (test_launch evaluates)."""
    return [WORKER, "train", out, f"run.dir={out}/run", f"data.cache_dir={cache_dir}",
            f"train.steps={steps}", "train.global_batch=8", "train.log_every=1",
            "train.clip_norm=0.5", "train.export=false", "train.peak_tflops=1",
            "train.eval_every=0",
            f"train.checkpoint_every={steps}", *overrides]


@pytest.fixture(scope="session")
def one_process(tmp_path_factory, cache_dir):
    """The reference: 1 process x batch 8, no XLA, with checkpoints at steps 2, 4 and 5."""
    out = str(tmp_path_factory.mktemp("np1"))
    run([sys.executable, *train_args(out, cache_dir, "train.checkpoint_every=2",
                                     "train.jit_compile=false", "train.export=true")])
    return out


def stopped_after_step_2(reference, out):
    """OUT/run as the reference run (one_process) would have left it had it stopped after its
    step-2 checkpoint; returns OUT."""
    shutil.copytree(os.path.join(reference, "run"), os.path.join(out, "run"),
                    ignore=shutil.ignore_patterns("step-00000004", "step-00000005",
                                                  "saved_model*"))
    with open(os.path.join(out, "run", "metrics.jsonl"), "r+") as f:
        first_two = f.readlines()[:2]
        f.seek(0)
        f.writelines(first_two)
        f.truncate()
    return out


# The files with the most real launches first: `make test` runs two files at a time
# (pytest-xdist's loadfile, which hands out files in collection order), so the two workers
# then finish together instead of one running the longest file alone at the end.
LONGEST_FIRST = ["test_two_nodes.py", "test_zero.py", "test_faults.py", "test_multiproc.py",
                 "test_recipe.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: the order inside each file is kept
