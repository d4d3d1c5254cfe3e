"""Bad input across every CLI and launcher: exit status 2, one line naming the culprit, no
traceback, and nothing written or changed (the case's files are compared before and after).

Most cases fail before TensorFlow starts; those that need a checkpoint read one copied from
the one-process reference run (conftest.one_process).
"""

import os
import shutil
import sys

import pytest

from conftest import MICRO, run

PY = [sys.executable, "-m"]
# (command, arguments, what the error line must name); {name} is a path of `world` below.
CASES = [
    # train: the config, its overrides, the launch plan
    ("hvd_llama.train", ["--config", "{nothing}"], "config file not found: {nothing}"),
    ("hvd_llama.train", ["--config", "{binary}"], "{binary}: not valid YAML"),
    ("hvd_llama.train", ["--config", "{list_yaml}"], "expected a mapping of sections"),
    ("hvd_llama.train", ["--config", MICRO, "train.stpes=3"], "'train.stpes'"),
    ("hvd_llama.train", ["--config", MICRO, "train.steps=abc"], "'train.steps' must be int"),
    ("hvd_llama.train", ["--config", MICRO, "train.steps=0"], "'train.steps' must be > 0"),
    ("hvd_llama.train", ["--config", MICRO, "train.steps"], "expected section.key=value"),
    ("hvd_llama.train", ["--config", MICRO, "train.precision=fp8"], "'train.precision'"),
    ("hvd_llama.train", ["--config", MICRO, "model.hidden_dim=30"], "'model.hidden_dim'"),
    ("hvd_llama.train", ["--config", MICRO, "train.resume=maybe"], "'train.resume'"),
    ("hvd_llama.train", ["--config", MICRO, "dist.zero=5"], "'dist.zero'"),
    ("hvd_llama.train", ["--config", MICRO, "dist.elastic=true", "dist.zero=1"],
     "'dist.elastic' needs dist.strategy=horovod and dist.zero=0"),
    ("hvd_llama.train", ["--config", MICRO, "run.dir={empty}/r", "dist.elastic=true"],
     "dist.elastic=true runs under horovodrun --gloo --min-np"),
    ("hvd_llama.train", ["--config", MICRO, "dist.stall_shutdown_seconds=10"],
     "'dist.stall_shutdown_seconds'"),
    ("hvd_llama.train", ["--config", MICRO, "run.dir={text}"], "{text} exists and is not a dir"),
    ("hvd_llama.train", ["--config", MICRO, "data.path={nothing}"], "'data.path'"),
    ("hvd_llama.train", ["--config", "{copy}/config.yaml"], "pass run.dir={copy}"),
    ("hvd_llama.train", ["--config", MICRO, "--dry-run", "--mfu", "2"], "--mfu must be in"),
    ("hvd_llama.train", ["--config", MICRO, "--dry-run", "--processes", "0"], "--processes"),
    ("hvd_llama.train", ["--config", MICRO, "--bogus"], "--bogus"),
    # ... and what only the start of a run finds (TensorFlow running, nothing written yet)
    ("hvd_llama.train", ["--config", MICRO, "run.dir={empty}/r", "train.resume=true",
                         "data.cache_dir={cache}"], "holds no checkpoint"),
    ("hvd_llama.train", ["--config", MICRO, "run.dir={empty}/r", "data.path={empty}"],
     "{empty}"),
    # prepare and data
    ("hvd_llama.prepare", ["--input", "{text}", "--output", "{empty}/d", "--tokenizer", "{text}"],
     "{text}: not a sentencepiece model"),
    ("hvd_llama.prepare", ["--input", "{text}", "--output", "{empty}/d", "--workers", "0"],
     "--workers: must be >= 1, got 0"),
    ("hvd_llama.prepare", ["--input", "{text}", "--output", "{empty}/d", "--workers", "-3"],
     "--workers"),
    ("hvd_llama.prepare", ["--input", "{text}", "--output", "{empty}/d", "--min-chars", "-5"],
     "--min-chars"),
    ("hvd_llama.prepare", ["--input", "{text}", "--output", "{empty}", "--vocab-size", "64"],
     "{empty}: already exists"),
    ("hvd_llama.prepare", ["--input", "{text}", "--output", "{empty}/d", "--val-fraction", "1"],
     "--val-fraction"),
    ("hvd_llama.data", ["inspect", "{empty}", "--batch-size", "-1"], "--batch-size"),
    ("hvd_llama.data", ["inspect", "{empty}"], "{empty}"),
    # generate, export, convert, plot
    ("hvd_llama.generate", ["{copy}", "--prompt", "x", "--max-new-tokens", "-5"],
     "--max-new-tokens"),
    ("hvd_llama.generate", ["{copy}", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    ("hvd_llama.generate", ["{nothing}", "--prompt", "x"], "{nothing}"),
    ("hvd_llama.export", ["{copy}", "--version", "-1"], "--version: must be >= 1, got -1"),
    ("hvd_llama.export", ["{empty}"], "{empty}: not a run directory"),
    ("hvd_llama.export", ["{truncated}"], "state.data-00000-of-00001: checkpoint file is"),
    ("hvd_llama.export", ["{copy}", "--version", "1"], "already exists"),
    ("hvd_llama.convert", ["export-gguf", "{copy}", "{empty}/hf"], "invalid choice"),
    ("hvd_llama.convert", ["export-hf", "{copy}", "{empty}"], "{empty} already exists"),
    ("hvd_llama.convert", ["import-hf", "{empty}", "{empty}/run"], "{empty}"),
    ("hvd_llama.plot", ["{empty}"], "{empty}"),
    ("hvd_llama.plot", ["{binary_run}"], "not a JSON record"),
    # benchmarks
    ("hvd_llama.bench", ["--steps", "0"], "--steps: must be >= 1, got 0"),
    ("hvd_llama.bench", ["--output", "{empty}"], "{empty} is a directory"),
    ("hvd_llama.bench", ["--config", MICRO, "train.stpes=1"], "'train.stpes'"),
    ("hvd_llama.bench", ["allreduce", "--threads", "-1"], "--threads"),
    # launchers: hostfiles, slots, configs, Slurm's figures
    ("mpi/horovodrun.sh", ["-H", "localhost:2", "--gloo", MICRO, "train.stpes=3"],
     "'train.stpes'"),
    ("mpi/mpirun.sh", ["-H", "localhost:2", "-np", "0", MICRO], "-np '0'"),
    ("mpi/mpirun.sh", ["-H", "localhost:2", "--iface"], "--iface needs a value"),
    ("mpi/horovodrun.sh", ["--hostfile", "{text}", MICRO], "hostfile {text} line 1"),
    ("mpi/slurm.sbatch", ["--bogus"], "unknown option --bogus"),
    ("mpi/slurm.sbatch", [MICRO], "nodes '0' is not a positive integer"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_process, cache_dir):
    """The paths the cases name: a copy of a finished run (and one with a truncated
    checkpoint), an empty directory, a text file, a binary file, a YAML list."""
    root = tmp_path_factory.mktemp("bad")
    paths = {"nothing": str(root / "no-such-file"), "empty": str(root / "empty"),
             "text": str(root / "notes.txt"), "binary": str(root / "binary.yaml"),
             "list_yaml": str(root / "list.yaml"), "copy": str(root / "copy"),
             "truncated": str(root / "truncated"), "binary_run": str(root / "binary_run"),
             "cache": cache_dir}
    os.makedirs(paths["empty"])
    with open(paths["text"], "w") as f:
        f.write("some text, which is neither a model nor a hostfile = x\n")
    with open(paths["binary"], "wb") as f:
        f.write(bytes(range(256)))
    with open(paths["list_yaml"], "w") as f:
        f.write("- a\n- b\n")
    for name in ("copy", "truncated"):  # their config.yaml names the original as run.dir
        shutil.copytree(os.path.join(one_process, "run"), paths[name])
    data = os.path.join(paths["truncated"], "checkpoints", "step-00000005",
                        "state.data-00000-of-00001")
    os.truncate(data, os.path.getsize(data) // 2)
    os.makedirs(paths["binary_run"])
    with open(os.path.join(paths["binary_run"], "metrics.jsonl"), "wb") as f:
        f.write(b"\x00\x01garbage\n")
    return str(root), paths


def snapshot(root):
    """Every file and directory under root with its size and modification time."""
    seen = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            st = os.stat(path)
            seen[path] = (st.st_size if name in files else -1, st.st_mtime_ns)
    return seen


@pytest.mark.parametrize("command, args, culprit", CASES,
                         ids=[f"{i}-{c[0].split('.')[-1]}" for i, c in enumerate(CASES)])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(world, command, args, culprit):
    root, paths = world
    args, culprit = [a.format(**paths) for a in args], culprit.format(**paths)
    launcher = command.startswith("mpi/")
    cmd = ["bash", command, *args] if launcher else [*PY, command, *args]
    env = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "NODES": "0", "TASKS_PER_NODE": "8", "DRY_RUN": "1", "IMAGE": paths["text"]}
    before = snapshot(root)
    proc = run(cmd, check=False, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{command}: " if launcher else "error"), lines[0]
    assert culprit in lines[0], (culprit, lines[0])
    assert snapshot(root) == before
