"""Helpers for tests that run hvd_llama as real processes, alone or under horovodrun."""

import os
import subprocess
import sys

import pytest

from hvd_llama.launcher import plain_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
WORKER = os.path.join(REPO, "tests", "mp_worker.py")
HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")
# The single-process runs must not think they were launched.
ENV = {**plain_env(), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


def run(cmd, check=True, timeout=900):
    """Run a command to completion; on an unexpected exit, fail with the tail of its output."""
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        text = proc.stdout + proc.stderr
        if len(text) > 8000:  # the first error and the last words both matter
            text = text[:3000] + "\n[...]\n" + text[-5000:]
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text}")
    return proc


def horovodrun(controller, args, check=True):
    """`horovodrun -np 2 -H localhost:2 --gloo|--mpi python ARGS`."""
    return run([HOROVODRUN, "-np", "2", "-H", "localhost:2", f"--{controller}",
                sys.executable, *args], check=check)


def train_cli(*overrides, check=True):
    return run([sys.executable, "-m", "hvd_llama.train", "--config", TINY, *overrides],
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
