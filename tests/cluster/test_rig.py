"""The rig itself: real nodes (own address, own hostname, TCP between them), and a clean tear-down."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cluster.rig import NamespaceCluster, RigError, missing_requirements

pytestmark = pytest.mark.cluster


def _netns() -> set:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout.splitlines() if line.strip()}


def _links() -> set:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited daemon stays one until pid 1 gets round to reaping it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _spare_tag(offset: int) -> int:
    """A tag beside the session rig's (FLOWCEPT_RIG_TAG), for rigs these tests make themselves."""
    return (int(os.environ.get("FLOWCEPT_RIG_TAG", "0")) + offset) % 100


@pytest.fixture
def rig_host() -> None:
    if missing_requirements():
        pytest.skip("needs root, Slurm and iproute2")


def test_every_node_has_its_own_address_and_hostname(ns_cluster) -> None:
    names = ns_cluster.node_names
    out = ns_cluster.run(["srun", "-N", str(len(names)), "--ntasks-per-node=1", "-l", "sh", "-c",
                          "echo $(hostname) $SLURMD_NODENAME $(ip -4 -o addr show eth0 | awk '{print $4}')"]).stdout
    rows = sorted(line.split(": ", 1)[1].split() for line in out.strip().splitlines())
    assert rows == sorted([name, name, f"{ns_cluster.node_ip(i)}/24"] for i, name in enumerate(names, 1))


def test_a_second_rig_comes_up_and_leaves_nothing_behind(ns_cluster, tmp_path: Path) -> None:
    """A tagged rig beside the session's: its own subnet; down() removes exactly what it made."""
    if missing_requirements():
        pytest.skip("needs root, Slurm and iproute2")
    before_ns, before_links = _netns(), _links()
    # munged runs as user munge: its directory must be reachable by it (not under pytest's 0700 tmp)
    base = Path(f"/tmp/flowcept-nscluster-test-{os.getpid()}")
    rig = NamespaceCluster(nodes=2, base=base, tag=ns_cluster.tag + 7, warm_up=False)
    rig.up()
    try:
        assert _netns() - before_ns == set(rig.namespaces())
        out = rig.run(["srun", "-N", "2", "-l", "hostname"]).stdout
        assert sorted(line.split(": ")[1] for line in out.strip().splitlines()) == ["node1", "node2"]
        daemons = [int((base / "run" / f).read_text()) for f in ("slurmd-node1.pid", "slurmctld.pid")]
        daemons.append(int((base / "munge" / "munged.pid").read_text()))
    finally:
        rig.down()
    assert _netns() == before_ns
    assert _links() == before_links
    assert not any(_running(pid) for pid in daemons)  # slurmd, slurmctld and munged
    assert "IS_DOWN" in rig.conf.read_text()
    shutil.rmtree(base)
    # the session's rig is untouched
    assert ns_cluster.run(["sinfo", "-h", "-t", "idle", "-o", "%D"]).stdout.strip() == str(len(ns_cluster.node_names))


@pytest.mark.parametrize("hostile", ["foreign-owner", "foreign-parent", "symlink", "group-writable"])
def test_a_base_another_user_could_have_prepared_is_refused(rig_host, tmp_path: Path, hostile: str) -> None:
    """A planted munge key, in_node script or symlinked base must never be used: up() and down() refuse
    before touching anything (the check comes first, so the rig is never brought up here)."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "run").mkdir(parents=True)
    (elsewhere / "run" / "precious").write_text("keep me")
    base = tmp_path / "base"
    if hostile == "symlink":
        os.symlink(elsewhere, base)
    elif hostile == "foreign-parent":
        (tmp_path / "evil").mkdir()
        os.chown(tmp_path / "evil", 65534, 65534)
        base = tmp_path / "evil" / "base"
    else:
        base.mkdir()
        (base / "munge").mkdir()
        (base / "munge" / "munge.key").write_bytes(b"k" * 64)
        if hostile == "foreign-owner":
            os.chown(base, 65534, 65534)
        else:
            base.chmod(0o775)
    rig = NamespaceCluster(nodes=1, base=base, tag=_spare_tag(8), warm_up=False)
    with pytest.raises(RigError, match="refusing rig base"):
        rig.up()
    with pytest.raises(RigError, match="refusing rig base"):
        rig.down()
    assert (elsewhere / "run" / "precious").read_text() == "keep me"
    if hostile != "symlink":
        assert not (base / ".lock").exists() and not (base / "etc").exists()
    assert f"{rig.ns_prefix}head" not in _netns() and rig.bridge not in _links()


def test_a_second_user_of_a_rig_is_refused_while_the_first_holds_it(rig_host, tmp_path: Path) -> None:
    """up() on a base whose lock another live process holds fails at once, naming it; so does a plain
    down() (rig.py down) — only --force tears down under a live owner."""
    base = tmp_path / "rig"
    base.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('locked', flush=True); "
         "sys.stdin.read()", str(base / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rig = NamespaceCluster(nodes=1, base=base, tag=_spare_tag(8), warm_up=False)
        with pytest.raises(RigError, match=f"in use by pid {holder.pid}"):
            rig.up()
        cli = subprocess.run([sys.executable, str(Path(__file__).with_name("rig.py")), "down", "--base", str(base),
                              "--tag", str(rig.tag)], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 1 and f"pid {holder.pid}" in cli.stderr and "--force" in cli.stderr
        assert not (base / "etc").exists()  # nothing was built or torn down
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    rig.down()  # the lock is free again: a plain down() works (nothing to remove)


@pytest.mark.parametrize("how", ["route", "address"])
def test_a_subnet_the_host_already_uses_is_refused(rig_host, tmp_path: Path, how: str) -> None:
    """The rig's connected route would take a real network's traffic: refuse before building anything."""
    tag = _spare_tag(9)
    rig = NamespaceCluster(nodes=1, base=tmp_path / "rig", tag=tag, warm_up=False)
    if how == "route":
        add = ["ip", "route", "add", "blackhole", f"10.79.{tag}.128/25"]
        remove = ["ip", "route", "del", "blackhole", f"10.79.{tag}.128/25"]
    else:
        add = ["sh", "-c", f"ip link add fcptv{tag}a type veth peer name fcptv{tag}b && "
               f"ip addr add 10.79.{tag}.200/28 dev fcptv{tag}a"]
        remove = ["ip", "link", "del", f"fcptv{tag}a"]  # its peer goes with it
    made = subprocess.run(add, capture_output=True, text=True)
    try:
        if made.returncode != 0:
            pytest.skip(f"cannot add a {how} here: {made.stderr.strip()}")
        with pytest.raises(RigError, match=f"10.79.{tag}.0/24: this host already uses it"):
            rig.up()
        assert rig.bridge not in _links() and f"{rig.ns_prefix}head" not in _netns()
    finally:
        subprocess.run(remove, capture_output=True)
    rig.down()


def test_a_tag_another_base_uses_is_refused(rig_host, tmp_path: Path) -> None:
    """The lock is per base: a rig with the same tag and another base must not tear the first one down."""
    tag = _spare_tag(9)
    rig = NamespaceCluster(nodes=1, base=tmp_path / "rig", tag=tag, warm_up=False)
    made = subprocess.run(["ip", "link", "add", rig.bridge, "type", "bridge"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    try:
        with pytest.raises(RigError, match=f"tag {tag} is in use by a rig with another base"):
            rig.up()
        assert rig.bridge in _links()  # the other rig's bridge is left alone
    finally:
        subprocess.run(["ip", "link", "del", rig.bridge], capture_output=True)
