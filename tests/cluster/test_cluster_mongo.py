"""One MongoDB-compatible server for the whole rig, written live by the daemons of all four nodes.

The server listens on the rig's bridge address (the root namespace's side of the cluster
network); every node daemon streams to it while the job runs, and `Flowcept.db` queries it after.
"""

from __future__ import annotations

import collections
import os
import uuid
from pathlib import Path
from typing import Dict

import pytest
from cluster.jobs import paused_launch
from conftest import wait_for
from mongo_server import MongoServer, requires_server

NODES = {"node1", "node2", "node3", "node4"}

pymongo = pytest.importorskip("pymongo")
pytestmark = [pytest.mark.cluster, pytest.mark.mongo, requires_server]


@pytest.fixture
def cluster_mongo(ns_cluster):
    server = MongoServer(host=ns_cluster.root_ip).start()
    try:
        yield server
    finally:
        server.stop()


def test_daemons_of_all_nodes_write_live_then_flowcept_db_answers(ns_cluster, cluster_mongo, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    database = f"rig_{uuid.uuid4().hex[:8]}"
    settings: Dict[str, str] = {
        "FLOWCEPT_DAEMON_SINKS": "jsonl,mongodb",
        "FLOWCEPT_DATABASES_MONGODB_ENABLED": "true",
        "FLOWCEPT_DATABASES_MONGODB_URI": cluster_mongo.uri,
        "FLOWCEPT_DATABASES_MONGODB_DB": database,
        "FLOWCEPT_DATABASES_MONGODB_SPOOL_DIR": str(tmp_path / "spool"),
    }
    out, handshake = tmp_path / "out", tmp_path / "handshake"
    out.mkdir()
    handshake.mkdir()
    client = pymongo.MongoClient(cluster_mongo.uri, serverSelectionTimeoutMS=5000)
    try:
        with paused_launch(ns_cluster, out, handshake, tasks=10, env={**os.environ, **settings}) as job:
            tasks = client[database]["tasks"]

            def live_from_every_node() -> bool:
                docs = list(tasks.find({"activity_id": "app_step"}, {"node_name": 1, "rank": 1}))
                return len(docs) == 80 and {d["node_name"] for d in docs} == NODES

            # the job is paused before its end: only the daemons can have written these
            wait_for(live_from_every_node, 60, "every node's tasks in the database while the job runs")
    finally:
        client.close()
    assert job.returncode == 0, job.stdout + job.stderr

    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    from flowcept import Flowcept

    [workflow] = [w for w in Flowcept.db.workflow_query({}) if w.get("subtype") == "flowcept-launch"]
    found = Flowcept.db.task_query({"workflow_id": workflow["workflow_id"]})
    ids = [t["task_id"] for t in found]
    assert len(ids) == len(set(ids))
    per_activity = collections.Counter(t.get("activity_id") for t in found if t.get("subtype") != "rank_process")
    assert per_activity == {"app_step": 80, "app_step_after": 80}
    assert sorted(t["rank"] for t in found if t.get("subtype") == "rank_process") == list(range(8))
    assert {t["node_name"] for t in found} == NODES
    assert all(t["status"] == "FINISHED" for t in found)
