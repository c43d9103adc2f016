"""The rig itself: real nodes (own address, own hostname, TCP between them), and a clean tear-down."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cluster.rig import NamespaceCluster, missing_requirements

pytestmark = pytest.mark.cluster


def _netns() -> set:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout.splitlines() if line.strip()}


def _links() -> set:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def test_every_node_has_its_own_address_and_hostname(ns_cluster) -> None:
    out = ns_cluster.run(["srun", "-N", "4", "--ntasks-per-node=1", "-l", "sh", "-c",
                          "echo $(hostname) $SLURMD_NODENAME $(ip -4 -o addr show eth0 | awk '{print $4}')"]).stdout
    rows = sorted(line.split(": ", 1)[1].split() for line in out.strip().splitlines())
    assert rows == [[f"node{i}", f"node{i}", f"{ns_cluster.node_ip(i)}/24"] for i in range(1, 5)]


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
    finally:
        rig.down()
    assert _netns() == before_ns
    assert _links() == before_links
    assert not any(Path(f"/proc/{pid}").exists() for pid in daemons)
    assert "IS_DOWN" in rig.conf.read_text()
    shutil.rmtree(base)
    # the session's rig is untouched
    assert ns_cluster.run(["sinfo", "-h", "-t", "idle", "-o", "%D"]).stdout.strip() == "4"
