"""A real N-node Slurm cluster on one machine, for Flowcept's multi-node tests.

Each node is a network namespace (own address on a private bridge) with its own UTS namespace
(own hostname) and a private mount namespace in which ``/etc/hosts`` lists the cluster. One
``slurmd`` runs per node, ``slurmctld`` runs in a head namespace, and a login namespace serves as
the submit host. Slurm and MPI traffic between nodes is real TCP over veth pairs and the bridge.

Like a cluster's shared filesystem, the filesystem, ``/tmp`` and the pid space are shared by all
nodes; only the network and the hostname differ. That is the point: anything node-local in
Flowcept (daemon runtime directory, ipc socket, ready and pid files) must be keyed by node.

Nothing under ``/etc`` is written: the rig runs its own ``munged`` (own key and socket) and its own
``slurm.conf`` selected through ``SLURM_CONF`` in the environment the rig hands to its callers.
Tear-down stops only the processes the rig started (pid files whose command name is checked, and
whatever runs inside the rig's own namespaces), then deletes every namespace and link it made.

Usage::

    python tests/cluster/rig.py up --nodes 4      # prints the env file to source
    python tests/cluster/rig.py down
    # from Python (tests): with NamespaceCluster(nodes=4) as cluster: cluster.run(["srun", ...])
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BASE = Path("/tmp/flowcept-nscluster")
REQUIRED_COMMANDS = ("ip", "nsenter", "unshare", "runuser", "munged", "slurmctld", "slurmd", "sinfo", "srun")
STUB_CONF = "# flowcept namespace cluster is down\nFLOWCEPT_NSCLUSTER_IS_DOWN=1\n"


class RigError(RuntimeError):
    """The cluster could not be brought up; the message says which step and shows its log."""


def missing_requirements() -> list[str]:
    """What this machine lacks to run the rig (empty when it can)."""
    missing = [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def _sh(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise RigError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def check_base(base: Path, *, create: bool) -> None:
    """Refuse a base directory another user could have prepared (planted key, swapped script, symlink).

    Every component of the path, the base included, must be a real directory (not a symlink) owned
    by root; the base must not be writable by group or others, and an ancestor may be only if it is
    sticky (as ``/tmp`` is: others cannot rename or remove what root made there). With ``create``,
    missing components are made (mode 0755) one at a time, each checked as it is reached; without
    it, the walk stops at the first missing component (nothing there to distrust).
    """
    base = Path(os.path.abspath(base))
    parts = base.parts
    for depth in range(1, len(parts) + 1):
        path = Path(*parts[:depth])
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                return
            try:
                os.mkdir(path, 0o755)
                os.chmod(path, 0o755)  # ours: the umask may have left it group-writable
            except FileExistsError:
                pass  # made meanwhile by someone else: the checks below judge it like any other
            st = os.lstat(path)
        is_base = depth == len(parts)
        if stat.S_ISLNK(st.st_mode):
            raise RigError(f"refusing rig base {base}: {path} is a symlink (to {os.readlink(path)})")
        if not stat.S_ISDIR(st.st_mode):
            raise RigError(f"refusing rig base {base}: {path} is not a directory")
        if st.st_uid != 0:
            raise RigError(f"refusing rig base {base}: {path} is owned by uid {st.st_uid}, not root; "
                           f"remove it (or pick another --base)")
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and (is_base or not st.st_mode & stat.S_ISVTX):
            raise RigError(f"refusing rig base {base}: {path} is writable by group or others "
                           f"(mode {stat.S_IMODE(st.st_mode):o})")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` as a file this process creates itself (never through a planted file or link)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not weaken or widen it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RigError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


@dataclass
class NamespaceCluster:
    """One rig: ``up()`` builds it, ``down()`` removes everything it made (also after a failed up)."""

    nodes: int = 4
    base: Path = DEFAULT_BASE
    tag: int = 0  # rigs with different tags coexist: own bridge, namespaces, subnet 10.79.<tag>.0/24
    cpus_per_node: int = 4
    mem_mb: int = 2000
    warm_up: bool = True
    node_names: list[str] = field(init=False)
    _lock_fd: int | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 200:
            raise ValueError(f"nodes must be 1..200, got {self.nodes}")
        if not 0 <= self.tag <= 99:
            raise ValueError(f"tag must be 0..99, got {self.tag}")
        self.base = Path(self.base)
        self.node_names = [f"node{i}" for i in range(1, self.nodes + 1)]
        suffix = str(self.tag) if self.tag else ""
        self.bridge = f"fcpbr{self.tag}"
        self.ns_prefix = f"fcp{suffix}-"
        self.veth_prefix = f"fcpv{suffix}-"
        self.subnet = f"10.79.{self.tag}"
        self.root_ip, self.head_ip, self.login_ip = f"{self.subnet}.254", f"{self.subnet}.1", f"{self.subnet}.2"

    def node_ip(self, index: int) -> str:
        return f"{self.subnet}.{10 + index}"

    # ------------------------------------------------------------------ paths
    @property
    def conf(self) -> Path:
        return self.base / "etc" / "slurm.conf"

    @property
    def in_node(self) -> Path:
        return self.base / "bin" / "in_node"

    @property
    def munge_dir(self) -> Path:
        return self.base / "munge"

    @property
    def lock_path(self) -> Path:
        return self.base / ".lock"

    def namespaces(self) -> list[str]:
        nodes = [f"{self.ns_prefix}n{i}" for i in range(1, self.nodes + 1)]
        return [f"{self.ns_prefix}head", f"{self.ns_prefix}login", *nodes]

    def env(self, base_env: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a Slurm client of this cluster (and for MPI across its nodes).

        Open MPI is pointed at the rig's subnet: the loopback-only settings the rest of the test
        suite uses would stop ranks on different nodes from reaching each other.
        """
        env = dict(os.environ if base_env is None else base_env)
        env.update(
            SLURM_CONF=str(self.conf),
            OMPI_ALLOW_RUN_AS_ROOT="1",
            OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            OMPI_MCA_pml="ob1",
            OMPI_MCA_btl="self,vader,tcp",
            OMPI_MCA_btl_tcp_if_include=f"{self.subnet}.0/24",
            OMPI_MCA_oob_tcp_if_include=f"{self.subnet}.0/24",
            PMIX_MCA_gds="hash",
        )
        for key in list(env):
            if key.startswith("SLURM_") and key != "SLURM_CONF":
                del env[key]  # a test run inside an allocation must not leak its job into ours
        return env

    # ------------------------------------------------------------------ running things
    def run(self, args: list[str], *, where: str = "login", timeout: float = 120, env: dict | None = None,
            check: bool = True, cwd: str | None = None) -> subprocess.CompletedProcess:
        """Run ``args`` on a host of the cluster: ``login`` (default, the submit host) or a node name."""
        ns, host = (f"{self.ns_prefix}login", "login") if where == "login" else (self._ns_of(where), where)
        proc = subprocess.run([str(self.in_node), ns, host, *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env(env), cwd=cwd)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, args, proc.stdout, proc.stderr)
        return proc

    def popen(self, args: list[str], *, where: str = "login", env: dict | None = None, **kwargs) -> subprocess.Popen:
        ns, host = (f"{self.ns_prefix}login", "login") if where == "login" else (self._ns_of(where), where)
        return subprocess.Popen([str(self.in_node), ns, host, *args], env=self.env(env), **kwargs)

    def _ns_of(self, node: str) -> str:
        if node not in self.node_names:
            raise ValueError(f"unknown node {node!r}; this cluster has {', '.join(self.node_names)}")
        return f"{self.ns_prefix}n{node.removeprefix('node')}"

    def wait_job_done(self, job_id: str, timeout: float = 120) -> None:
        def gone() -> bool:
            return not self.run(["squeue", "-h", "-j", job_id], check=False).stdout.strip()
        _wait(gone, timeout, f"job {job_id} to leave the queue", poll_s=0.1)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> NamespaceCluster:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> float:
        """Build the cluster; returns the seconds it took. On failure everything made is removed."""
        missing = missing_requirements()
        if missing:
            raise RigError(f"cannot build the cluster here, missing: {', '.join(missing)}")
        started = time.monotonic()
        check_base(self.base, create=True)
        self._lock()  # held until down(): a second user of this base is refused, not clobbered
        try:
            self._check_tag_not_taken()
            self._teardown()  # what a crashed earlier run of this rig left
            self._check_subnet_free()
        except BaseException:
            self._unlock()
            raise
        try:
            self._make_dirs()
            self._start_munge()
            self._make_network()
            self._write_config()
            self._start_slurm()
            self._wait_idle()
            if self.warm_up:
                self._warm_up()
        except BaseException:
            if os.environ.get("FLOWCEPT_RIG_KEEP_ON_FAIL") != "1":
                self.down()
            raise
        return time.monotonic() - started

    # ------------------------------------------------------------------ safety
    def _lock(self) -> None:
        """Take ``<base>/.lock`` (flock, exclusive) for this object's life; refuse at once if held."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RigError(f"the rig at {self.base} is in use by pid {holder} (it holds {self.lock_path}); "
                           f"use another --base and --tag, or stop that process first") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.ftruncate(fd, 0)
            os.close(fd)  # closing the last fd of the open file releases the flock

    def _check_tag_not_taken(self) -> None:
        """The lock is per base; names and subnet are per tag. A bridge of this tag that this base did
        not record (its ``run/namespaces``, written before any link is made) belongs to another
        base's rig, which the tear-down of leftovers would destroy: refuse instead."""
        bridge_there = _sh("ip", "link", "show", self.bridge, check=False).returncode == 0
        if bridge_there and not (self.base / "run" / "namespaces").exists():
            raise RigError(f"tag {self.tag} is in use by a rig with another base (its bridge {self.bridge} exists, "
                           f"{self.base} did not make it); pick another --tag, or take that rig down first")

    def _check_subnet_free(self) -> None:
        """Refuse to build over a network this host already uses: the rig's connected route would take
        its traffic. Any IPv4 address or route (all tables; the default route aside) that overlaps
        ``10.79.<tag>.0/24`` is a conflict."""
        subnet = ipaddress.ip_network(f"{self.subnet}.0/24")
        conflicts = []
        for line in _sh("ip", "-4", "-o", "addr", "show").stdout.splitlines():
            words = line.split()
            if "inet" in words:
                iface = ipaddress.ip_interface(words[words.index("inet") + 1])
                if iface.network.overlaps(subnet):
                    conflicts.append(f"address {iface} on {words[1]}")
        for line in _sh("ip", "-4", "-o", "route", "show", "table", "all").stdout.splitlines():
            words = line.split()
            if words and words[0] in _ROUTE_TYPES:
                words = words[1:]
            if not words or words[0] == "default":
                continue
            try:
                dest = ipaddress.ip_network(words[0], strict=False)
            except ValueError:
                continue
            if dest.prefixlen and dest.overlaps(subnet):
                conflicts.append(f"route {line.strip()}")
        if conflicts:
            raise RigError(f"refusing to build the rig on {subnet}: this host already uses it "
                           f"({'; '.join(conflicts[:5])}); pick another --tag")

    def _check_routed_to_bridge(self) -> None:
        """After the bridge is up, the kernel must send the rig's addresses to it (policy routing could
        still pick another table): otherwise rig traffic would leave through a real interface."""
        for addr in (self.head_ip, self.node_ip(self.nodes)):
            words = _sh("ip", "-4", "-o", "route", "get", addr).stdout.split()
            dev = words[words.index("dev") + 1] if "dev" in words else None
            if dev != self.bridge:
                raise RigError(f"{addr} is routed via {dev}, not the rig's bridge {self.bridge}; refusing")

    def _make_dirs(self) -> None:
        for sub in ("etc", "run", "log", "spool", "tmp", "bin"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        for name in self.node_names:
            (self.base / "tmp" / name).mkdir(exist_ok=True)
            (self.base / "spool" / f"slurmd-{name}").mkdir(exist_ok=True)
        (self.base / "spool" / "ctld").mkdir(exist_ok=True)
        # remembered so down() from another process removes exactly what this one made
        (self.base / "run" / "namespaces").write_text(" ".join(self.namespaces()) + "\n")
        # written under a fresh name in the checked base and renamed over: never through a planted file
        tmp = self.in_node.with_name(f".in_node.{os.getpid()}")
        _write_new(tmp, _IN_NODE_SCRIPT.replace("@BASE@", str(self.base)).encode(), 0o755)
        os.replace(tmp, self.in_node)

    def _start_munge(self) -> None:
        d = self.munge_dir
        d.mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
        d.chmod(0o755)  # munged refuses a socket directory others cannot traverse
        key = d / "munge.key"
        _write_new(key, os.urandom(1024), 0o400)  # a fresh key on every up(): never one found there
        shutil.chown(key, "munge", "munge")
        _sh("runuser", "-u", "munge", "--", "munged", f"--socket={d / 'munge.socket'}", f"--key-file={key}",
            f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}")
        _wait(lambda: (d / "munge.socket").is_socket(), 5, "munged's socket")

    def _make_network(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sysctl(f"/proc/sys/net/ipv6/conf/{self.bridge}/disable_ipv6")
        # The bridge address gives the root namespace a connected route to the subnet, so nothing
        # for the rig's addresses can follow the default route off the machine.
        _sh("ip", "addr", "add", f"{self.root_ip}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        hosts = ["127.0.0.1 localhost", f"{self.head_ip} head", f"{self.login_ip} login", f"{self.root_ip} rigroot"]
        hosts += [f"{self.node_ip(i)} {name}" for i, name in enumerate(self.node_names, 1)]
        (self.base / "etc" / "hosts").write_text("\n".join(hosts) + "\n")
        addresses = {f"{self.ns_prefix}head": self.head_ip, f"{self.ns_prefix}login": self.login_ip}
        addresses.update({f"{self.ns_prefix}n{i}": self.node_ip(i) for i in range(1, self.nodes + 1)})
        for ns, addr in addresses.items():
            tag = ns.removeprefix(self.ns_prefix)
            suffix = str(self.tag) if self.tag else ""
            host_end, node_end = f"{self.veth_prefix}{tag}", f"fcpp{suffix}-{tag}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _sh("ip", "link", "set", node_end, "netns", ns)
            _sh("ip", "-n", ns, "link", "set", node_end, "name", "eth0")
            _sysctl(f"/proc/sys/net/ipv6/conf/{host_end}/disable_ipv6")
            _sh("ip", "link", "set", host_end, "master", self.bridge, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        self._check_routed_to_bridge()

    def _write_config(self) -> None:
        b = self.base
        (b / "etc" / "plugstack.conf").write_text("")  # keep the system's SPANK plugins out
        lines = [
            f"# written by tests/cluster/rig.py: {self.nodes} nodes, one network+UTS namespace each",
            "ClusterName=flowcept-ns",
            f"SlurmctldHost=head({self.head_ip})",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_dir / 'munge.socket'}",
            "MpiDefault=pmix",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "SchedulerParameters=batch_sched_delay=0",
            "SlurmdParameters=config_overrides", "ReturnToService=2",
            "SlurmctldPort=6817", "SlurmdPort=6818",
            f"PlugStackConfig={b / 'etc' / 'plugstack.conf'}",
            f"SlurmctldPidFile={b / 'run' / 'slurmctld.pid'}",
            f"SlurmctldLogFile={b / 'log' / 'slurmctld.log'}",
            f"StateSaveLocation={b / 'spool' / 'ctld'}",
            # %n: the node's name. The filesystem is shared, so every node-local path must carry it;
            # TmpFS is also where the PMIx plugin puts its per-step directories.
            f"SlurmdPidFile={b / 'run' / 'slurmd-%n.pid'}",
            f"SlurmdSpoolDir={b / 'spool' / 'slurmd-%n'}",
            f"SlurmdLogFile={b / 'log' / 'slurmd-%n.log'}",
            f"TmpFS={b / 'tmp' / '%n'}",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "InactiveLimit=0", "KillWait=5", "MinJobAge=60",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "Waittime=0",
        ]
        for i, name in enumerate(self.node_names, 1):
            lines.append(f"NodeName={name} NodeAddr={self.node_ip(i)} NodeHostname={name} CPUs={self.cpus_per_node} "
                         f"Boards=1 SocketsPerBoard=1 CoresPerSocket={self.cpus_per_node} ThreadsPerCore=1 "
                         f"RealMemory={self.mem_mb} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (b / "env.sh").write_text(
            "# source me to use the namespace cluster from a shell\n"
            + "".join(f"export {k}={v}\n" for k, v in self.env({}).items())
        )

    def _start_slurm(self) -> None:
        clean = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"]
        _sh(str(self.in_node), f"{self.ns_prefix}head", "head", *clean, "slurmctld", "-f", str(self.conf), "-c", "-i")
        for i, name in enumerate(self.node_names, 1):
            _sh(str(self.in_node), f"{self.ns_prefix}n{i}", name, *clean, "slurmd", "-f", str(self.conf), "-N", name)

    def _wait_idle(self) -> None:
        def idle() -> bool:
            out = self.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], check=False, timeout=10).stdout
            return len(set(out.split())) == self.nodes
        try:
            _wait(idle, 30, "every node to be idle", poll_s=0.1)
        except RigError as exc:
            raise RigError(f"{exc}\n{self.log_tail()}") from None

    def _warm_up(self) -> None:
        """One srun over all nodes and one batch job, so the first test does not pay scheduling start-up."""
        self.run(["srun", "-N", str(self.nodes), "-n", str(self.nodes), "true"], timeout=60)
        job = self.run(["sbatch", "--parsable", "-N1", "-o", "/dev/null", "-J", "rig-warmup", "--wrap", "true"]).stdout
        self.wait_job_done(job.strip().split(";")[0], timeout=60)

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for log in [self.base / "log" / "slurmctld.log", *sorted((self.base / "log").glob("slurmd-*.log"))[:2]]:
            if log.exists():
                out.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def down(self, force: bool = False) -> None:
        """Remove everything this rig made; safe to call when nothing or only part of it is up.

        The rig that holds the base's lock (this object after ``up()``) tears down and releases it.
        Another process (``rig.py down``) may tear down only while nobody holds the lock, unless
        ``force``: a live owner would otherwise lose its cluster under its feet.
        """
        if self._lock_fd is not None:
            try:
                self._teardown()
            finally:
                self._unlock()
            return
        check_base(self.base, create=False)  # never rmtree through a symlinked or foreign base
        if self.base.is_dir():
            try:
                self._lock()
            except RigError:
                if not force:
                    raise
        try:
            self._teardown()
        finally:
            self._unlock()

    def _teardown(self) -> None:
        check_base(self.base, create=False)
        ours = set(self.namespaces())
        recorded = self.base / "run" / "namespaces"
        if recorded.exists():
            ours |= set(recorded.read_text().split())
        listed = _sh("ip", "netns", "list", check=False).stdout.split("\n")
        ours |= {line.split()[0] for line in listed if line.startswith(self.ns_prefix)}
        present = [ns for ns in ours if Path(f"/run/netns/{ns}").exists()]

        if self.conf.exists() and "IS_DOWN" not in self.conf.read_text() and f"{self.ns_prefix}login" in present:
            # cancel jobs while the controller is up, so slurmstepd cleans up after itself
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False, timeout=10)
        # Each victim is pinned by a pidfd, checked after opening it (so the check is about the
        # process the fd refers to), and signalled only through it: a pid that exits and is reused
        # meanwhile is never hit. A pid whose pidfd cannot be opened is gone, and left alone.
        pidfds: dict[int, int] = {}

        def take(pid: int, still_ours) -> None:
            if pid == os.getpid() or pid in pidfds:
                return
            fd = _pidfd(pid)
            if fd is None:
                return
            if still_ours():
                pidfds[pid] = fd
            else:
                os.close(fd)

        try:
            for pidfile, comm in [*[(p, "slurmd") for p in (self.base / "run").glob("slurmd-*.pid")],
                                  (self.base / "run" / "slurmctld.pid", "slurmctld"),
                                  (self.munge_dir / "munged.pid", "munged")]:
                pid = _read_pid(pidfile)
                if pid:
                    take(pid, lambda pid=pid, comm=comm: _comm(pid) == comm)
            for ns in present:  # job steps and anything else still running on our nodes
                try:
                    ns_ino = os.stat(f"/run/netns/{ns}").st_ino
                except OSError:
                    continue
                for word in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
                    if word.isdigit():
                        take(int(word), lambda pid=int(word), ino=ns_ino: _netns_inode(pid) == ino)
        except BaseException:
            for fd in pidfds.values():
                os.close(fd)
            raise
        _stop_all(list(pidfds.values()))
        for ns in present:
            _sh("ip", "netns", "del", ns, check=False)
        links = _sh("ip", "-o", "link", "show", check=False).stdout
        for line in links.splitlines():
            name = line.split(": ")[1].split("@")[0] if ": " in line else ""
            if name.startswith(self.veth_prefix) or name == self.bridge:
                _sh("ip", "link", "del", name, check=False)
        for sub in ("run", "spool", "tmp"):
            shutil.rmtree(self.base / sub, ignore_errors=True)
        for f in ("munge.socket", "munge.socket.lock", "munged.pid"):
            (self.munge_dir / f).unlink(missing_ok=True)
        if self.conf.exists():
            # a client still pointed at this file fails at once rather than sending to a dead subnet
            self.conf.write_text(STUB_CONF)


def _pidfd(pid: int) -> int | None:
    """A handle on process ``pid`` that stays bound to it: signals through it never reach a reused pid."""
    try:
        return os.pidfd_open(pid)
    except OSError:  # gone already (ESRCH), or cannot be opened: then it is not signalled later
        return None


def _pidfd_signal(fd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass  # exited (perhaps a zombie already reaped): nothing to do


def _stop_all(pidfds: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM every process, wait until each has exited (a pidfd turns readable) or ``grace_s``
    passed, SIGKILL those still running; closes the fds."""
    try:
        for fd in pidfds:
            _pidfd_signal(fd, signal.SIGTERM)
        poller = select.poll()
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        running = set(pidfds)
        deadline = time.monotonic() + grace_s
        while running and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                running.discard(fd)
                poller.unregister(fd)
        for fd in running:
            _pidfd_signal(fd, signal.SIGKILL)
    finally:
        for fd in pidfds:
            os.close(fd)


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


_ROUTE_TYPES = {"unicast", "local", "broadcast", "multicast", "anycast", "unreachable", "blackhole", "prohibit",
                "throw", "nat"}


def _sysctl(path: str) -> None:
    try:
        Path(path).write_text("1")
    except OSError:
        pass


# in_node NS HOST CMD...: CMD in network namespace NS, a new UTS namespace named HOST, and a private
# mount namespace whose /etc/hosts is the rig's. `nsenter --net` rather than `ip netns exec`, which
# remounts /sys and so hides the cgroup tree slurmd insists on reading.
_IN_NODE_SCRIPT = """#!/bin/sh
# generated by tests/cluster/rig.py
ns=$1; host=$2; shift 2
exec nsenter --net=/run/netns/"$ns" unshare --uts --mount --propagation private -- \\
  /bin/sh -c 'mount -n --bind @BASE@/etc/hosts /etc/hosts && hostname "$0" && exec "$@"' "$host" "$@"
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--tag", type=int, default=0, help="rig number: several rigs can coexist")
    parser.add_argument("--no-warm-up", action="store_true")
    parser.add_argument("--force", action="store_true",
                        help="down: tear down even while another live process holds the rig's lock")
    args = parser.parse_args(argv)
    cluster = NamespaceCluster(nodes=args.nodes, base=args.base, tag=args.tag, warm_up=not args.no_warm_up)
    if args.action == "down":
        try:
            cluster.down(force=args.force)
        except RigError as exc:
            print(f"cluster not torn down: {exc}" + ("" if args.force else " (--force to do it anyway)"),
                  file=sys.stderr)
            return 1
        print("cluster down")
        return 0
    try:
        took = cluster.up()
    except RigError as exc:
        print(f"cluster did not come up: {exc}", file=sys.stderr)
        return 1
    cluster._unlock()  # the CLI exits now: the rig stays up, and `rig.py down` may take it down
    print(f"{args.nodes}-node cluster up in {took:.1f} s; use it with: source {cluster.base / 'env.sh'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
