"""Two hosts on one machine (tests/two_nodes.py): node1 and node2, each a network namespace with
its own address, hostname and sshd. Every launch starts on node1 and reaches node2 over ssh, as
`horovodrun -H node1:2,node2:2` does on a cluster; each training run ends with the losses and
weights of one process with the same global batch (conftest.one_process, float32, 1e-5).

The lab is the kind of network that trips first multi-node runs. Both nodes have a second
interface, docker0, with the same address on each (Docker's bridge on every host that runs
Docker): OpenMPI tries it and hangs unless told the interface, horovodrun tests it and leaves
it out. node2 resolves its own name to 127.0.1.1, as Debian's default /etc/hosts does (an
unpatched Horovod's Gloo then advertises that address to the other ranks and dies).

One lab serves the whole module (about 2 s to bring up); the launches run one at a time.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

import two_nodes
from hvd_llama import checkpoint
from conftest import (ENV, HOROVODRUN, MICRO, REPO, arrays, assert_trains_like, losses,
                      read_until, rel_err, stopped_after_step_2, train_args)


BIN = os.path.dirname(sys.executable)
LAUNCH_ENV = {**ENV, "PYTHON": sys.executable, "PATH": BIN + os.pathsep + ENV["PATH"]}
IFACE = "data0"  # the interface between the nodes (two_nodes.Lab)
DOCKER0 = "172.17.0.1/16"


def lacking(what):
    """Skip without what the test needs: root, tools, sshd; under CI (HVD_LLAMA_TWO_NODES=
    required, set by .ci/run) fail instead, so that the tests cannot silently not run."""
    if what is None:
        return
    if os.environ.get("HVD_LLAMA_TWO_NODES") == "required":
        pytest.fail(f"two nodes: {what}")
    pytest.skip(f"two nodes: {what}")


@pytest.fixture(scope="module")
def lab():
    lacking(two_nodes.missing())
    lab = two_nodes.Lab(loopback_names=("node2",))
    try:
        lab.up()
        with lab.extra_interface("docker0", {node: DOCKER0 for node in two_nodes.NODES}):
            yield lab
    finally:
        lab.down()


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# the two nodes\nnode1 slots=2\nnode2 slots=2  # the remote one\n")
    return str(path)


def on_node1(lab, cmd, env=None, timeout=600):
    """Run cmd on node1 (in the repository), its output captured."""
    return lab.run("node1", cmd, cwd=REPO, env={**LAUNCH_ENV, **(env or {})}, timeout=timeout)


def start_on_node1(lab, cmd, env=None):
    return lab.popen("node1", cmd, cwd=REPO, env={**LAUNCH_ENV, **(env or {})},
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def nothing_left(lab, within=60):
    """Wait (at most `within` seconds) until no process but sshd runs on either node."""
    deadline = time.monotonic() + within
    while lab.pids("node1") or lab.pids("node2"):
        assert time.monotonic() < deadline, {n: lab.pids(n) for n in two_nodes.NODES}
        time.sleep(0.5)


def cli_args(out, cache_dir, *overrides):
    """hvd_llama.train's overrides for mp_worker's run (conftest.train_args) in OUT/run."""
    return train_args(out, cache_dir, *overrides)[3:]


def assert_checkpoint_trains_like(out, reference):
    """OUT/run (a hvd_llama.train run) logged the reference's losses, and its last checkpoint
    holds the reference's final weights."""
    np_losses = losses(out)
    assert len(np_losses) == len(losses(reference))
    for a, b in zip(np_losses, losses(reference)):
        assert abs(a - b) <= 1e-5 * abs(b), (np_losses, losses(reference))
    model = checkpoint.load_latest(os.path.join(out, "run"))[1]
    for a, b in zip([v.numpy() for v in model.weights],
                    arrays(os.path.join(reference, "rank0.npz")), strict=True):
        assert rel_err(a, b) < 1e-5


def refused(proc, *fragments):
    """The launch script's one-line refusal, exit status 2, naming every fragment."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == "", proc.stdout + proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


def test_launch_scripts_refuse_a_bad_node_before_any_rank_starts(lab, hostfile, tmp_path):
    """Each refusal is one line naming node2 and what to do, before ssh starts anything there
    (docs/multinode.md's table)."""
    run_dir = tmp_path / "run"
    config = tmp_path / "node1-only" / "micro.yaml"
    config.parent.mkdir()
    config.write_text(open(MICRO).read())
    site = next(p for p in sys.path if p.endswith("site-packages"))

    def launch(script, *args, cfg=str(config)):
        proc = on_node1(lab, ["bash", f"mpi/{script}", *args, cfg, f"run.dir={run_dir}"],
                        timeout=120)
        assert lab.pids("node2") == [] and not run_dir.exists()
        return proc

    with lab.hidden("node2", str(config.parent)):  # the config is on node1 only
        refused(launch("horovodrun.sh", "--hostfile", hostfile, "--gloo"),
                f"mpi/horovodrun.sh: host node2: {config} does not exist there")
    with lab.hidden("node2", os.path.join(site, "horovod")):  # node2's python lacks Horovod
        refused(launch("mpirun.sh", "--hostfile", hostfile, "--iface", IFACE),
                f"mpi/mpirun.sh: host node2: {sys.executable} there finds no "
                "horovod.tensorflow or hvd_llama", "install the same environment")
    with lab.changed_host_key("node2"):
        refused(launch("mpirun.sh", "-H", "node1:2,node2:2", "--iface", IFACE),
                "host node2: its ssh host key is not the one in known_hosts",
                "ssh-keygen -R node2")
    with lab.forgotten_host_key("node2"):
        refused(launch("horovodrun.sh", "-H", "node1:1,node2:1"),
                "host node2: its ssh host key is unknown here; connect once (ssh node2)")
    with lab.login_refused():
        refused(launch("mpirun.sh", "-H", "node1:1,node2:1", "--iface", IFACE),
                "host node2: ssh refused the login without a password (", "publickey",
                "authorized_keys")
    lab.link("node2", up=False)
    try:
        refused(launch("horovodrun.sh", "-H", "node1:1,node2:1"),
                "host node2: unreachable over ssh", "is it up")
    finally:
        lab.link("node2", up=True)
    # docker0's unconnected peer end, given an address on node1 only.
    subprocess.run([two_nodes.IP, "-n", lab.ns("node1"), "addr", "add", "192.0.2.9/24", "dev",
                    "docker0-p"], check=True)
    refused(launch("horovodrun.sh", "-H", "node1:1,node2:1", "--iface", "docker0-p"),
            "host node2: no interface docker0-p with an IPv4 address (it has: docker0 data0)")
    refused(launch("horovodrun.sh", "-H", "node1:1,node2:1", "--iface", "ib0"),
            "host node1 (this one): no interface ib0 with an IPv4 address")
    refused(launch("horovodrun.sh", "-H", f"node1:1,node2:1,{two_nodes.address('node2')}:1"),
            f"host {two_nodes.address('node2')} is the machine listed as node2 (both are node2)")
    refused(launch("mpirun.sh", "-H", f"node1:1,{two_nodes.address('node1')}:1"),
            f"host {two_nodes.address('node1')} is the machine listed as node1 (both are node1)")
    # Without --iface, mpirun would try docker0 (test below): the check names it and the fix.
    refused(launch("mpirun.sh", "--hostfile", hostfile),
            "host node2: its docker0 address 172.17.0.1 cannot be reached from node1 (it is "
            "node1's own address too), and mpirun would try it and hang; give --iface data0")


def test_mpirun_without_the_interface_tries_docker0_and_hangs(lab):
    """What the check above prevents: plain mpirun over both nodes, one MPI allreduce. OpenMPI's
    TCP transport connects from node2 to docker0's address, which is node2's own, and the
    allreduce never completes."""
    job = start_on_node1(lab, ["mpirun", "--allow-run-as-root", "-np", "2", "-H",
                               "node1:1,node2:1", "-mca", "pml", "ob1", "-mca", "btl", "^openib",
                               "-mca", "btl_base_verbose", "30", sys.executable, "-c",
                               "from mpi4py import MPI; "
                               "print('sum', MPI.COMM_WORLD.allreduce(1), flush=True)"])
    try:
        seen = []
        read_until(job, r"\[node2:\d+\] btl: tcp: attempting to connect\(\) to .* address "
                        r"172\.17\.0\.1 ", seen)
        time.sleep(10)  # an allreduce of one integer takes milliseconds
        assert job.poll() is None and "sum" not in "".join(seen)
    finally:
        job.kill()
        job.communicate()
        for pid in lab.pids("node1") + lab.pids("node2"):
            os.kill(pid, signal.SIGKILL)


def test_a_rank_whose_ssh_session_ends_exits_with_it(lab):
    """horovodrun starts a remote rank as `ssh node2 CMD`; when it stops the job it kills the
    ssh client, and nothing else reaches the rank. Started so (a sleep standing for a rank
    stuck in hvd.init or a collective), the rank that calls launcher.exit_with_launcher ends
    within seconds of its ssh client; one that does not, runs on."""
    sleeper = ("import sys, time\nfrom hvd_llama import launcher\n"
               "if sys.argv[1] == 'watch':\n    launcher.exit_with_launcher()\n"
               "print('started', flush=True)\ntime.sleep(120)")
    left = {}
    for how in ("watch", "plain"):
        ssh = start_on_node1(lab, ["ssh", "node2", "env", "HOROVOD_RANK=1", sys.executable,
                                   "-c", shlex.quote(sleeper), how])
        read_until(ssh, "started", [])
        assert len(lab.pids("node2")) == 1
        ssh.kill()
        ssh.wait()
        time.sleep(3)
        left[how] = lab.pids("node2")
        for pid in left[how]:
            os.kill(pid, signal.SIGKILL)
    assert left["watch"] == [] and len(left["plain"]) == 1, left


def test_gloo_starts_on_a_host_whose_name_does_not_resolve(tmp_path):
    """Horovod as published segfaults in hvd.init() under Gloo there (lookupAddrForHostname:
    seen in a podman build); ours binds to the interface horovodrun chose, so the name is not
    looked up. A UTS and mount namespace of this machine stands for such a host."""
    lacking(None if os.geteuid() == 0 else "needs root (a UTS and mount namespace)")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    script = ("import horovod.tensorflow as hvd, tensorflow as tf\nhvd.init()\n"
              "print('sum', int(hvd.allreduce(tf.constant(1), op=hvd.Sum)), flush=True)")
    proc = subprocess.run(
        ["unshare", "--uts", "--mount", "sh", "-c",
         f"hostname nowhere.invalid && mount --bind {hosts} /etc/hosts && ! getent hosts "
         f"nowhere.invalid && exec {HOROVODRUN} -np 2 -H localhost:2 --gloo {sys.executable} "
         f"-c {shlex.quote(script)}"], env=LAUNCH_ENV, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.count("sum 2") == 2, proc.stdout


def test_horovodrun_sh_with_a_hostfile_gloo(lab, hostfile, one_process, tmp_path, cache_dir):
    """mpi/horovodrun.sh --hostfile --gloo --iface data0 runs `horovodrun -np 4 -H
    node1:2,node2:2 --gloo --network-interfaces data0`: 4 ranks, 2 per node."""
    out = str(tmp_path)
    proc = on_node1(lab, ["bash", "mpi/horovodrun.sh", "--hostfile", hostfile, "--gloo",
                          "--iface", IFACE, MICRO, *cli_args(out, cache_dir)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert shlex.split(proc.stdout.splitlines()[0])[:10] == [
        "horovodrun", "-np", "4", "-H", "node1:2,node2:2", "--gloo", "--network-interfaces",
        IFACE, sys.executable, "-m"]
    assert "4 process(es) on 2 host(s) (node1, node2), controller gloo" in proc.stdout
    assert_checkpoint_trains_like(out, one_process)


def test_mpirun_sh_with_a_hostfile_and_the_interface(lab, one_process, tmp_path, cache_dir):
    """mpi/mpirun.sh --hostfile (one slot per node) --iface data0: plain mpirun, told the
    interface."""
    out, hostfile = str(tmp_path), tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2\n")  # a host without slots= has one
    proc = on_node1(lab, ["bash", "mpi/mpirun.sh", "--hostfile", str(hostfile), "--iface",
                          IFACE, MICRO, *cli_args(out, cache_dir)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    line = shlex.split(proc.stdout.splitlines()[0])
    assert line[:5] == ["mpirun", "-np", "2", "-H", "node1:1,node2:1"]
    assert ("btl_tcp_if_include", IFACE) in set(zip(line, line[1:]))
    assert "2 process(es) on 2 host(s) (node1, node2), controller mpi" in proc.stdout
    assert_checkpoint_trains_like(out, one_process)


def test_hybrid_one_process_per_node_of_two_devices(lab, one_process, tmp_path, cache_dir):
    """dist.strategy=hybrid under horovodrun -H node1:1,node2:1 --gloo: 2 logical devices per
    process mirrored by TensorFlow, Horovod between the nodes."""
    out = str(tmp_path)
    proc = on_node1(lab, [HOROVODRUN, "-np", "2", "-H", "node1:1,node2:1", "--gloo",
                          sys.executable, *train_args(out, cache_dir, "dist.strategy=hybrid",
                                                      "dist.logical_cpus=2")])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "2 process(es) x 2 device(s) x 1 micro-batch(es) x 2 sequences" in proc.stdout
    assert "2 process(es) on 2 host(s) (node1, node2)" in proc.stdout
    assert_trains_like(out, one_process)
    for rank in (0, 1):  # every copy on every device of every process is the same
        with open(os.path.join(out, f"rank{rank}-copies.json")) as f:
            assert {k: v for k, v in json.load(f).items() if k in ("copies", "spread")} == {
                "copies": 2, "spread": 0.0}
    for a, b in zip(arrays(os.path.join(out, "rank0.npz")),
                    arrays(os.path.join(out, "rank1.npz")), strict=True):
        assert (a == b).all()


def test_a_node_lost_mid_run_ends_the_job_naming_it_and_resume_continues_exactly(
        lab, one_process, tmp_path, cache_dir):
    """node2's link goes down during step 4 under horovodrun --gloo: within 60 s the job ends
    naming node2, and nothing is left running on either node. Resumed under mpi/mpirun.sh, the
    link goes down again as training starts: mpirun names node2 (its keepalives, set by the
    script). Resumed once more, with twice the processes, under `horovodrun -np 4 -H
    node1:2,node2:2 --mpi` with no interface named (horovodrun tests the nodes' interfaces,
    keeps data0 and passes it to mpirun): the run ends exactly where the one-process run
    ends."""
    out = stopped_after_step_2(one_process, str(tmp_path))  # a checkpoint to fall back on
    args = train_args(out, cache_dir, "train.checkpoint_every=2", "train.resume=true")
    gloo = [HOROVODRUN, "-np", "2", "-H", "node1:1,node2:1", "--gloo", sys.executable, *args]

    for launch, when, names_node2 in [
            (gloo, r"step 3/5 \|", r"horovodrun: rank 1 on host node2 exited with status 255 "
                                   r"first \(255 is ssh's status when it loses the host: is "
                                   r"node2 down\?\)"),
            (["bash", "mpi/mpirun.sh", "-H", "node1:1,node2:1", "--iface", IFACE, MICRO,
              *args[3:]], r"^hvd_llama: 2 process",
             r"Remote daemon: \S+ on node node2")]:
        job = start_on_node1(lab, launch, env={"STEP_SECONDS": "0.5"})
        seen = []
        try:
            read_until(job, when, seen)
            lab.link("node2", up=False)
            lost = time.monotonic()
            seen.append(job.communicate(timeout=60)[0])
            assert time.monotonic() - lost < 60 and job.returncode != 0
            assert re.search(names_node2, "".join(seen), re.M), "".join(seen)[-4000:]
            nothing_left(lab)
        finally:
            job.kill()
            lab.link("node2", up=True)
    proc = on_node1(lab, [HOROVODRUN, "-np", "4", "-H", "node1:2,node2:2", "--mpi",
                          sys.executable, *args])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "4 process(es) on 2 host(s) (node1, node2), controller mpi" in proc.stdout
    assert_trains_like(out, one_process)


def test_elastic_goes_on_without_a_lost_node_and_takes_it_back(lab, one_process, tmp_path,
                                                               cache_dir):
    """horovodrun --gloo --min-np 1 --max-np 3 --host-discovery-script, node1 and node2 one slot
    each; node2's rank is killed after step 3 (the node dies; the discovery script drops it):
    node1 rolls back to its last commit and goes on alone; node2 comes back with 2 slots: of 3
    processes, which cannot split a global batch of 8, two read data and the third waits. Every
    step is logged once with the one-process run's loss, and the final weights are its weights.
    (A link down instead costs Gloo's 30 s timeout before node1 goes on: measured by hand,
    BENCHMARKS.md; the test above takes node2's link down.)"""
    out, hosts, discover = str(tmp_path), tmp_path / "hosts", tmp_path / "discover.sh"
    hosts.write_text("node1:1\nnode2:1\n")
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    job = start_on_node1(lab, [
        HOROVODRUN, "--gloo", "-np", "2", "--min-np", "1", "--max-np", "3",
        "--host-discovery-script", str(discover), "--blacklist-cooldown-range", "1", "2",
        sys.executable, *train_args(out, cache_dir, "dist.elastic=true", "dist.commit_every=2")],
        env={"STEP_SECONDS": "2"})  # node1 alone commits at step 4: Horovod polls hosts each 1 s
    seen = []
    try:
        read_until(job, r"step 3/5 \|", seen)
        hosts.write_text("node1:1\n")
        for pid in lab.pids("node2"):
            os.kill(pid, signal.SIGKILL)
        read_until(job, r"elastic: 1 process\(es\) on node1 ", seen)
        hosts.write_text("node1:1\nnode2:2\n")
        read_until(job, r"elastic: 3 process\(es\)", seen)
        seen.append(job.communicate(timeout=180)[0])
    finally:
        job.kill()
    text = "".join(seen)
    assert job.returncode == 0, text[-4000:]
    assert re.search(r"elastic: 3 process\(es\) on node1, node2 .* global batch: 8 sequences = "
                     r".* 2 process\(es\) x 1 micro-batch\(es\) x 4 sequences; 1 waits", text), \
        text[-4000:]
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5]
    assert checkpoint.read_meta(checkpoint.latest(os.path.join(out, "run")))["rows"] == 5 * 8
    assert_trains_like(out, one_process)
    nothing_left(lab)
