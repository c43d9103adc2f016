"""Cross-node status on the rig: from the login host, every node's daemon of a running job over
TCP with the job's CURVE keys; a client without them is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cluster.jobs import paused_launch
from conftest import wait_for

NODES = ["node1", "node2", "node3", "node4"]

pytest.importorskip("zmq")
pytestmark = pytest.mark.cluster

STRANGER = """
import sys, zmq
from flowcept import job_registry
[step] = job_registry.list_steps(job_registry.job_dir(sys.argv[1]))
[entry] = [e for e in job_registry.list_nodes(step) if e["node"] == "node3"]
server_key = job_registry.client_keys(job_registry.curve_dir(step))[0]
public, secret = zmq.curve_keypair()
print(job_registry.remote_status(entry["address"], (server_key, public, secret), 5)["error"])
"""


def test_status_and_top_of_every_node_from_the_login_host(ns_cluster, tmp_path: Path) -> None:
    out, handshake = tmp_path / "out", tmp_path / "handshake"
    out.mkdir()
    handshake.mkdir()
    with paused_launch(ns_cluster, out, handshake, tasks=5) as job:
        [job_id] = ns_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split()

        def every_node_answers() -> bool:
            proc = ns_cluster.run([sys.executable, "-m", "flowcept.cli", "daemon", "status", "--job", job_id,
                                   "--json"], check=False)
            if proc.returncode != 0:
                return False
            nodes = json.loads(proc.stdout)["nodes"]
            return sorted(n["node"] for n in nodes) == NODES and all("error" not in n for n in nodes)

        wait_for(every_node_answers, 30, "every node's daemon to answer over TCP")
        report = json.loads(ns_cluster.run([sys.executable, "-m", "flowcept.cli", "daemon", "status", "--job",
                                            job_id, "--json"]).stdout)
        by_node = {n["node"]: n for n in report["nodes"]}
        for index, node in enumerate(NODES, 1):
            # reached at the node's own address
            assert by_node[node]["tcp_address"].startswith(f"tcp://{ns_cluster.node_ip(index)}:")
            assert by_node[node]["hostname"] == node
            assert by_node[node]["clients"]["connected"] >= 2  # the node's two ranks (and its launcher)

        top = ns_cluster.run([sys.executable, "-m", "flowcept.cli", "top", "--job", job_id, "--once"])
        assert all(node in top.stdout for node in NODES), top.stdout

        refused = ns_cluster.run([sys.executable, "-c", STRANGER, job_id]).stdout.strip()
        assert refused.startswith("refused"), refused
    assert job.returncode == 0, job.stdout + job.stderr
    after = ns_cluster.run([sys.executable, "-m", "flowcept.cli", "daemon", "status", "--job", job_id], check=False)
    assert after.returncode != 0 and "no job directory" in after.stderr  # removed at the end of the job
