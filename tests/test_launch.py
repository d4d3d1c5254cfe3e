"""The launch path: Dockerfiles (hadolint), shell scripts (shellcheck), the refusals of
mpi/horovodrun.sh and mpi/mpirun.sh of bad hosts, slots and paths before any rank starts, their
command lines, and the Slurm script's (dry run). Both scripts train for real between two hosts
in tests/test_two_nodes.py, and on localhost inside the CPU image (make image-test)."""

import glob
import os
import shlex
import subprocess
import sys
import time

import pytest

from conftest import ENV, REPO, TINY

BIN = os.path.dirname(sys.executable)
LAUNCH_ENV = {**ENV, "PYTHON": sys.executable, "PATH": BIN + os.pathsep + ENV["PATH"]}
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "mpi", "*.sh")) + [
    os.path.join(REPO, "mpi", "slurm.sbatch"), os.path.join(REPO, ".ci", "run"),
    *glob.glob(os.path.join(REPO, "docker", "**", "*.sh"), recursive=True)])
DOCKERFILES = sorted(glob.glob(os.path.join(REPO, "docker", "Dockerfile.*")))


def sh(cmd, env=None, timeout=900):
    return subprocess.run(cmd, cwd=REPO, env={**LAUNCH_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=os.path.basename)
def test_dockerfile_is_hadolint_clean(dockerfile):
    proc = sh([os.path.join(BIN, "hadolint"), dockerfile])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(dockerfile) as f:
        lines = [line for line in f if line.strip() and not line.startswith("#")]
    # Versions and choices are ARGs above the first FROM; every RUN is bash -euo pipefail.
    assert lines[0].startswith("ARG "), dockerfile
    assert any(line.startswith('SHELL ["/bin/bash", "-euo", "pipefail", "-c"]') for line in lines)


def test_dockerfiles_use_the_makefiles_build():
    for dockerfile in DOCKERFILES:
        with open(dockerfile) as f:
            text = f.read()
        assert "make setup" in text and "pip install" not in text, dockerfile


def test_shell_scripts_are_shellcheck_clean():
    assert len(SCRIPTS) >= 7, SCRIPTS
    proc = sh([os.path.join(BIN, "shellcheck"), "-x", "-P", "SCRIPTDIR", *SCRIPTS])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("args, message", [
    (["-H", "localhost:2,127.0.0.1:2"], "host 127.0.0.1 is listed twice (as localhost before)"),
    (["-H", "localhost:2", "-np", "3"], "-np 3 exceeds the 2 slots of localhost:2"),
    (["-H", "localhost:2,nohost.invalid:2"], "host nohost.invalid: unreachable over ssh"),
    (["-H", "localhost:x"], "slots 'x' for localhost is not a positive integer"),
    (["--hostfile", "missing-hostfile"], "hostfile missing-hostfile: no such file"),
    (["-H", "localhost:2", "--container", "missing.sif"], "container image missing.sif"),
], ids=["duplicate", "slots", "unreachable", "bad-slots", "no-hostfile", "no-image"])
@pytest.mark.parametrize("launcher", ["horovodrun.sh", "mpirun.sh"])
def test_launcher_refuses_before_any_rank_starts(launcher, args, message, tmp_path):
    run_dir = tmp_path / "run"
    proc = sh(["bash", os.path.join("mpi", launcher), *args, TINY, f"run.dir={run_dir}"],
              timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"mpi/{launcher}: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stdout == "" and not run_dir.exists()


OPTIONS = ["-H", "--hostfile", "-np", "--iface", "--gloo", "--mpi", "--ssh-port", "--container",
           "--dry-run", "CONFIG"]


@pytest.mark.parametrize("launcher", ["horovodrun.sh", "mpirun.sh"])
def test_launcher_help_prints_the_usage_to_stdout_and_succeeds(launcher):
    for args in (["--help"], ["-h"], ["-H", "localhost:2", "--help", TINY]):  # before any check
        proc = sh(["bash", f"mpi/{launcher}", *args], timeout=60)
        assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
        assert proc.stdout.startswith(f"usage: mpi/{launcher} "), proc.stdout
        assert all(option in proc.stdout for option in OPTIONS), proc.stdout
    # Bad input stays an error: one line on stderr, exit 2 (without a config, the usage line).
    proc = sh(["bash", f"mpi/{launcher}", "-H", "localhost:2"], timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith(f"usage: mpi/{launcher} ") and \
        len(proc.stderr.splitlines()) == 1, proc.stderr
    proc = sh(["bash", f"mpi/{launcher}", "--bogus", TINY], timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2, "", f"mpi/{launcher}: unknown option --bogus (see --help)\n")


def test_launchers_refuse_a_missing_config_and_a_malformed_hostfile(tmp_path):
    bad = tmp_path / "hostfile"
    bad.write_text("localhost slots=2\nnode1 slots 8\n")
    for launcher in ["horovodrun.sh", "mpirun.sh"]:
        proc = sh(["bash", f"mpi/{launcher}", "-H", "localhost:2", "configs/nope.yaml"])
        assert (proc.returncode, proc.stderr) == (
            2, f"mpi/{launcher}: config configs/nope.yaml: no such file\n")
        proc = sh(["bash", f"mpi/{launcher}", "--hostfile", str(bad), TINY])
        assert (proc.returncode, proc.stderr) == (
            2, f"mpi/{launcher}: hostfile {bad} line 2: expected 'HOST slots=N', "
               "got 'node1 slots 8'\n")
    proc = sh(["bash", "mpi/mpirun.sh", "--gloo", "-H", "localhost:2", TINY])
    assert proc.returncode == 2 and "--gloo is horovodrun's" in proc.stderr
    proc = sh(["bash", "mpi/horovodrun.sh", "-H", "localhost:2", "-np"])
    assert (proc.returncode, proc.stderr) == (2, "mpi/horovodrun.sh: -np needs a value\n")


def test_launcher_dry_run_passes_interface_port_and_environment():
    proc = sh(["bash", "mpi/mpirun.sh", "-H", "localhost:2", "--iface", "ib0", "--ssh-port",
               "12345", "--dry-run", TINY, "train.steps=2"], env={"HOROVOD_LOG_LEVEL": "info"})
    assert proc.returncode == 0, proc.stderr
    line = shlex.split(proc.stdout)
    i = line.index(sys.executable)
    assert line[i:] == [sys.executable, "-m", "hvd_llama.train", "--config", TINY,
                        "train.steps=2"]
    pairs = set(zip(line, line[1:]))
    for pair in [("-bind-to", "none"), ("-map-by", "slot"), ("-x", "HOROVOD_LOG_LEVEL"),
                 ("-x", "NCCL_SOCKET_IFNAME"), ("-x", "NCCL_DEBUG"), ("-x", "PATH"),
                 ("btl_tcp_if_include", "ib0"), ("plm_rsh_args", "-p 12345")]:
        assert pair in pairs, (pair, line)
    proc = sh(["bash", "mpi/horovodrun.sh", "-H", "localhost:2", "--iface", "ib0", "--gloo",
               "--ssh-port", "12345", "--dry-run", TINY])
    assert shlex.split(proc.stdout)[:11] == ["horovodrun", "-np", "2", "-H", "localhost:2",
                                             "--gloo", "-p", "12345", "--network-interfaces",
                                             "ib0", sys.executable]


def slurm(*args, **env):
    return sh(["bash", "mpi/slurm.sbatch", *args], env={"DRY_RUN": "1", **env})


def test_slurm_dry_run_prints_the_srun_and_mpirun_lines(tmp_path):
    image = tmp_path / "hvd_llama.sif"
    image.write_bytes(b"")
    proc = slurm("configs/tiny.yaml", "train.steps=10", NODES="2", TASKS_PER_NODE="8",
                 IMAGE=str(image))
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == [
        "srun", "--mpi=pmix", "--nodes=2", "--ntasks-per-node=8", "--cpu-bind=none",
        "--kill-on-bad-exit=1", "apptainer", "exec", "--nv", str(image), "python", "-m",
        "hvd_llama.train", "--config", TINY, "train.resume=auto", "train.steps=10"]
    # Inside an allocation Slurm's own figures win over NODES/TASKS_PER_NODE.
    proc = slurm("configs/tiny.yaml", SLURM_JOB_NUM_NODES="4", SLURM_NTASKS_PER_NODE="4",
                 NODES="2", TASKS_PER_NODE="8", IMAGE=str(image), LAUNCHER="mpirun")
    line = shlex.split(proc.stdout)
    assert line[:5] == ["mpirun", "-np", "16", "--map-by", "ppr:4:node"], line
    assert line[line.index("apptainer"):][:4] == ["apptainer", "exec", "--nv", str(image)]


@pytest.mark.parametrize("env, args, message", [
    ({}, ["configs/nope.yaml"], "config configs/nope.yaml: no such file"),
    ({"IMAGE": "nope.sif"}, ["configs/tiny.yaml"], "image nope.sif: no such file"),
    ({"IMAGE": "IMG"}, ["configs/tiny.yaml"], "no Slurm allocation"),
    ({"IMAGE": "IMG", "NODES": "1", "TASKS_PER_NODE": "2", "LAUNCHER": "ssh"},
     ["configs/tiny.yaml"], "LAUNCHER=ssh: expected srun or mpirun"),
], ids=["config", "image", "allocation", "launcher"])
def test_slurm_refuses_bad_input(env, args, message, tmp_path):
    if env.get("IMAGE") == "IMG":
        env["IMAGE"] = str(tmp_path / "img.sif")
        (tmp_path / "img.sif").write_bytes(b"")
    proc = slurm(*args, **env)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith("mpi/slurm.sbatch: " + message), proc.stderr


WATCHED = ("import time\nfrom hvd_llama import launcher\nlauncher.exit_with_launcher()\n"
           "print('started', flush=True)\ntime.sleep(60)")


def test_a_launched_process_stops_when_its_output_pipe_hangs_up(tmp_path):
    """launcher.exit_with_launcher: under a launcher (HOROVOD_RANK set), the reader of the
    process's output pipe going away is a SIGTERM to it (the rank whose ssh session ended:
    test_two_nodes.py); output to files is never watched."""
    env = {**ENV, "HOROVOD_RANK": "0"}
    proc = subprocess.Popen([sys.executable, "-c", WATCHED], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout.readline() == b"started\n"
    proc.stdout.close()
    assert proc.wait(timeout=10) == -15  # SIGTERM: no handler installed here
    with open(tmp_path / "out", "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", WATCHED], cwd=REPO, env=env, stdout=out,
                                stderr=out)
        time.sleep(3)
        assert proc.poll() is None  # still running
        proc.kill()
        proc.wait()
    assert (tmp_path / "out").read_text() == "started\n"
