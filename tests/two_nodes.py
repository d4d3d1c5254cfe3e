"""Two network hosts on this machine, node1 and node2, for real multi-host launches.

Each node is a network namespace holding one end of a veth pair made here (interface `data0`,
10.77.0.N/24), with a hostname of its own (a UTS namespace) and its own view of /etc/hosts and
of ssh's client config (a mount namespace), and an sshd on port 22 with a host key made here.
ssh between the nodes takes a key pair made here, never a password, and checks host keys
against a known_hosts file made here. The file system is this machine's, so the repository
and the virtualenv are at the same path on both nodes, as on a cluster's shared file system.

Nothing outside the namespaces changes: this machine's own network namespace gets no interface
or route (traffic goes only to the addresses made here), and its ~/.ssh, /etc/hosts and
/etc/ssh stay as they are. `down()` kills whatever still runs in the namespaces and deletes
them; `up()` first removes what a lab that was killed before its `down()` left behind.

    python tests/two_nodes.py run CMD...  # bring them up, run CMD on node1, take them down
    python tests/two_nodes.py shell       # the same with a shell on node1 (ssh node2 from it)
    python tests/two_nodes.py up          # keep them up (prints how to enter node1)
    python tests/two_nodes.py down
"""

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

NODES = ("node1", "node2")
PREFIX = "hvdl"  # of the namespaces' names: hvdl-node1, hvdl-node2
SUBNET = "10.77.0"
STATE = os.path.join(tempfile.gettempdir(), "hvd_llama-two-nodes")  # keys, configs, logs
LOCK = STATE + ".lock"
# iproute2's ip is in /usr/sbin, which a non-login PATH may lack.
IP = shutil.which("ip", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or "ip"
NEEDS = (IP, "unshare", "nsenter", "ssh", "ssh-keygen", "/usr/sbin/sshd")


def missing():
    """Why this machine cannot host the two nodes (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    lacking = [tool for tool in NEEDS if not shutil.which(tool)]
    return f"lacks {', '.join(lacking)}" if lacking else None


def address(node):
    return f"{SUBNET}.{NODES.index(node) + 1}"


def _sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Lab:
    """The two nodes. `run`/`popen` start a command on a node (in its namespaces, in `cwd`)."""

    def __init__(self, state=STATE, loopback_names=()):
        """loopback_names: the nodes whose own name resolves, on themselves, to 127.0.1.1
        (Debian's default /etc/hosts line); the other node still sees their address."""
        self.state, self.loopback_names = state, loopback_names
        self.sshd = {}  # node -> Popen of its sshd

    def ns(self, node):
        return f"{PREFIX}-{node}"

    def path(self, name):
        return os.path.join(self.state, name)

    # -- up and down -------------------------------------------------------------------

    def up(self):
        """Bring the nodes up (after removing a killed lab's leftovers); on a failure half-way,
        take down what was made. One lab at a time on this machine: a second waits."""
        self._lock = open(LOCK, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self):
        self.down(unlock=False)
        os.makedirs(self.state)
        self._keys()
        _sh(IP, "link", "add", f"{PREFIX}-v1", "type", "veth", "peer", "name", f"{PREFIX}-v2")
        for i, node in enumerate(NODES, 1):
            ns = self.ns(node)
            _sh(IP, "netns", "add", ns)
            _sh(IP, "link", "set", f"{PREFIX}-v{i}", "netns", ns)
            _sh(IP, "-n", ns, "link", "set", f"{PREFIX}-v{i}", "name", "data0")
            _sh(IP, "-n", ns, "addr", "add", f"{address(node)}/24", "dev", "data0")
            for dev in ("lo", "data0"):
                _sh(IP, "-n", ns, "link", "set", dev, "up")
            self._write_hosts(node)
            self.start_sshd(node)

    def down(self, unlock=True):
        """Kill every process left in the namespaces, delete them (their veth ends go with
        them), remove the state directory. Safe to call on a lab that is not (or half) up."""
        for proc in self.sshd.values():
            proc.kill()
            proc.wait()
        self.sshd = {}
        for node in NODES:
            ns = self.ns(node)
            if _sh(IP, "netns", "pids", ns, check=False).returncode != 0:
                continue
            for _ in range(50):  # a dying process may have just forked
                pids = self.pids(node, sshd=True)
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
            else:
                raise RuntimeError(f"{node}: processes {pids} outlived 50 SIGKILLs")
            _sh(IP, "netns", "del", ns, check=False)
        _sh(IP, "link", "del", f"{PREFIX}-v1", check=False)  # if up() stopped half-way
        shutil.rmtree(self.state, ignore_errors=True)
        if unlock and getattr(self, "_lock", None):
            self._lock.close()
            self._lock = None

    def _keys(self):
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "two-nodes", "-f",
            self.path("id"))
        shutil.copy(self.path("id.pub"), self.path("authorized_keys"))
        with open(self.path("ssh_config"), "w") as f:
            f.write(f"Host *\n  IdentityFile {self.path('id')}\n"
                    f"  UserKnownHostsFile {self.path('known_hosts')}\n"
                    "  StrictHostKeyChecking yes\n  ConnectTimeout 10\n")
        with open(self.path("known_hosts"), "w") as f:
            for node in NODES:
                f.write(f"{node},{address(node)} {self._host_key(node)}\n")

    def _host_key(self, node, name=None):
        """A new host key for the node (at path NAME, default hostkey-NODE): its public part."""
        key = self.path(name or f"hostkey-{node}")
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", node, "-f", key)
        with open(key + ".pub") as f:
            return " ".join(f.read().split()[:2])

    @contextlib.contextmanager
    def changed_host_key(self, node):
        """The node's sshd offers a host key other than the one in known_hosts (what a
        reinstalled node does), until the block ends."""
        self._host_key(node, f"hostkey-{node}-new")
        self.start_sshd(node, f"hostkey-{node}-new")
        try:
            yield
        finally:
            self.start_sshd(node)

    @contextlib.contextmanager
    def forgotten_host_key(self, node):
        """known_hosts lacks the node (a first contact), until the block ends."""
        path = self.path("known_hosts")
        with open(path) as f:
            kept = f.read()
        with open(path, "w") as f:
            f.writelines(line for line in kept.splitlines(True) if not line.startswith(node))
        try:
            yield
        finally:
            with open(path, "w") as f:
                f.write(kept)

    @contextlib.contextmanager
    def login_refused(self):
        """No node accepts the lab's key (an empty authorized_keys), until the block ends."""
        path = self.path("authorized_keys")
        os.rename(path, path + ".kept")
        open(path, "w").close()
        try:
            yield
        finally:
            os.replace(path + ".kept", path)

    def _write_hosts(self, node):
        with open(self.path(f"hosts-{node}"), "w") as f:
            f.write("127.0.0.1 localhost\n")
            for other in NODES:
                mine = other == node and node in self.loopback_names
                f.write(f"{'127.0.1.1' if mine else address(other)} {other}\n")

    def start_sshd(self, node, host_key=None):
        """(Re)start the node's sshd, in new UTS and mount namespaces inside its network
        namespace: every session it starts has the node's hostname, hosts file and ssh config.
        Key-only logins; otherwise Debian's defaults (no ClientAlive: a node's sessions outlive
        a cut link, as on most clusters)."""
        if node in self.sshd:
            self.stop_sshd(node)
        config = self.path(f"sshd_config-{node}")
        with open(config, "w") as f:
            f.write(f"Port 22\nListenAddress 0.0.0.0\n"
                    f"HostKey {self.path(host_key or 'hostkey-' + node)}\n"
                    f"AuthorizedKeysFile {self.path('authorized_keys')}\n"
                    "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                    "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
                    "PidFile none\nMaxStartups 100\nMaxSessions 100\n")
        home_ssh = os.path.join(os.path.expanduser("~root"), ".ssh")
        hide_home_ssh = f"mount -t tmpfs tmpfs {home_ssh}; " if os.path.isdir(home_ssh) else ""
        script = (f"hostname {node}; mount --bind {self.path('hosts-' + node)} /etc/hosts; "
                  f"mount --bind {self.path('ssh_config')} /etc/ssh/ssh_config; {hide_home_ssh}"
                  f"exec /usr/sbin/sshd -D -e -f {config}")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        log = self.path(f"sshd-{node}.log")
        seen = os.path.getsize(log) if os.path.exists(log) else 0  # an earlier sshd's lines
        with open(log, "a") as out:
            self.sshd[node] = subprocess.Popen(
                [IP, "netns", "exec", self.ns(node), "unshare", "--uts", "--mount",
                 "--propagation", "private", "sh", "-c", script], stdout=out, stderr=out)
        deadline = time.monotonic() + 20
        while True:
            with open(log, "rb") as f:  # bytes: sshd ends its lines CRLF
                if b"Server listening" in f.read()[seen:]:
                    break
            if self.sshd[node].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{node}: sshd did not start: see {log}")
            time.sleep(0.05)

    def stop_sshd(self, node):
        proc = self.sshd.pop(node)
        proc.terminate()
        proc.wait()

    # -- running things on a node --------------------------------------------------------

    def _leader(self, node):
        """The pid of the node's sshd listener, whose namespaces are the node's (also for
        a lab that another process brought up)."""
        if node in self.sshd:
            return self.sshd[node].pid
        for pid in _sh(IP, "netns", "pids", self.ns(node)).stdout.split():
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"[listener]" in f.read():
                    return int(pid)
        raise RuntimeError(f"{node}: no sshd runs there")

    def _enter(self, node, cwd):
        return ["nsenter", "-t", str(self._leader(node)), "-n", "-u", "-m", f"--wd={cwd}", "--"]

    def run(self, node, cmd, cwd="/", **kwargs):
        """subprocess.run of cmd on the node; text output captured unless told otherwise."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self._enter(node, cwd) + list(cmd), text=True, **kwargs)

    def popen(self, node, cmd, cwd="/", **kwargs):
        return subprocess.Popen(self._enter(node, cwd) + list(cmd), text=True, **kwargs)

    def pids(self, node, sshd=False):
        """The processes running on the node: without its sshd (listener and sessions) unless
        sshd=True."""
        out = _sh(IP, "netns", "pids", self.ns(node), check=False).stdout.split()
        pids = []
        for pid in map(int, out):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    is_sshd = f.read().startswith((b"sshd:", b"/usr/sbin/sshd"))
            except OSError:  # gone meanwhile
                continue
            if sshd or not is_sshd:
                pids.append(pid)
        return pids

    def link(self, node, up):
        """Take the node's data link down (a cable pulled, a switch port dead) or back up."""
        _sh(IP, "-n", self.ns(node), "link", "set", "data0", "up" if up else "down")

    @contextlib.contextmanager
    def hidden(self, node, directory):
        """`directory` is empty on `node` (a tmpfs over it in the node's mount namespace):
        a path the other node has and this one lacks."""
        enter = ["nsenter", "-t", str(self._leader(node)), "-m"]
        _sh(*enter, "mount", "-t", "tmpfs", "tmpfs", directory)
        try:
            yield
        finally:
            _sh(*enter, "umount", directory)

    @contextlib.contextmanager
    def extra_interface(self, name, cidr_of):
        """A second interface on every node, connected to nothing (one end of a veth pair
        whose other end stays down: this machine's kernel has no dummy devices): `cidr_of[node]`
        its address, e.g. the same 172.17.0.1/16 on every node, as Docker's bridge has on every
        host that runs Docker."""
        for node in NODES:
            ns = self.ns(node)
            _sh(IP, "-n", ns, "link", "add", name, "type", "veth", "peer", "name", name + "-p")
            _sh(IP, "-n", ns, "addr", "add", cidr_of[node], "dev", name)
            _sh(IP, "-n", ns, "link", "set", name, "up")
        try:
            yield
        finally:
            for node in NODES:
                _sh(IP, "-n", self.ns(node), "link", "del", name, check=False)


def main(argv):
    what, cmd = (argv[0], argv[1:]) if argv else ("help", [])
    if what == "down":
        Lab().down()
        return 0
    if what not in ("up", "shell", "run") or (what == "run") != bool(cmd):
        print(__doc__.split("\n\n")[-1].rstrip())
        return 2
    why = missing()
    if why:
        print(f"two_nodes.py: this machine cannot host the two nodes: {why}", file=sys.stderr)
        return 2
    lab = Lab().up()
    if what == "up":  # the lock goes with this process: another lab may take the names over
        print(f"node1 ({address('node1')}) and node2 ({address('node2')}) are up.\n"
              f"A shell on node1:  {' '.join(lab._enter('node1', os.getcwd()))} bash\n"
              f"Take them down:    python {sys.argv[0]} down")
        return 0
    # This Python's virtualenv first on the PATH: the launch scripts and horovodrun in it.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep
           + os.environ["PATH"], "PYTHON": sys.executable}
    try:
        return lab.run("node1", cmd or ["bash"], cwd=os.getcwd(), env=env,
                       capture_output=False).returncode
    finally:
        lab.down()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
