"""A node daemon streaming a real 2-rank ``mpirun`` job to MongoDB while the job runs.

The daemon runs with ``--sinks jsonl,mongodb`` against the test server; both ranks pause at a
step (after making their records durable) until the test, which polls ``Flowcept.db`` with a
deadline, has seen their tasks in the database. After the job every task is there exactly once
and the workflow's start and end records are one document.
"""

from __future__ import annotations

import itertools
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, List

import pytest
from conftest import app_env, wait_for
from conftest_mongo import *  # noqa: F401,F403  (fixtures)
from conftest_mongo import requires_server
from test_daemon import Daemon, start_daemon  # noqa: F401  (fixture)

pytest.importorskip("zmq")
pytest.importorskip("pymongo")

pytestmark = [pytest.mark.mongo, requires_server,
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun")]

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_oob_tcp_if_include": "lo",
    "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_btl": "self,vader",
}

# One rank: n numbered tasks; at pause_at it makes its records durable (acknowledged by the
# daemon), touches paused.<rank> and waits (bounded) for the test's resume file.
RANK_APP = textwrap.dedent("""
    import os, sys, time
    from flowcept import Flowcept, FlowceptTask
    from flowcept.buffer import get_pipeline

    workflow_id, n, pause_at, directory = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])

    def wait_for_file(path, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise SystemExit(f"rank {rank}: timed out waiting for {path}")
            time.sleep(0.005)  # polling a file the test creates, with a deadline

    with Flowcept(workflow_id=workflow_id, workflow_name="mongo-live"):
        for i in range(n):
            if i == pause_at:
                get_pipeline().flush(durable=True)
                open(os.path.join(directory, f"paused.{rank}"), "w").close()
                wait_for_file(os.path.join(directory, "resume"))
            with FlowceptTask(activity_id="numbered", used={"i": i, "rank": rank}) as task:
                task.end(generated={"twice": 2 * i})
""")


@pytest.fixture
def start_mongo_daemon(start_daemon) -> Callable[[], Daemon]:  # noqa: F811
    """Start a daemon writing JSONL and MongoDB (settings from this test's FLOWCEPT_* variables)."""
    names = itertools.count()
    return lambda: start_daemon("--sinks", "jsonl,mongodb", name=f"rt{next(names)}")


def start_job(daemon: Daemon, tmp_path: Path, workflow_id: str, n: int, pause_at: int) -> subprocess.Popen:
    """``mpirun -np 2`` of RANK_APP, wired to the daemon."""
    app = tmp_path / "rank_app.py"
    app.write_text(RANK_APP)
    env = dict(MPI_ENV, FLOWCEPT_DAEMON_ADDRESS=daemon.address, FLOWCEPT_DAEMON_ACK_TIMEOUT_S="2")
    return subprocess.Popen(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable,
                             str(app), workflow_id, str(n), str(pause_at), str(tmp_path)],
                            env=app_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_paused(job: subprocess.Popen, tmp_path: Path) -> None:
    wait_for(lambda: all((tmp_path / f"paused.{r}").exists() for r in (0, 1)) or job.poll() is not None,
             60, "both ranks to reach the pause")
    assert job.poll() is None, job.communicate()[0].decode()[-3000:]


def _numbered(db, workflow_id: str) -> List[dict]:
    return db.task_query({"workflow_id": workflow_id, "activity_id": "numbered"},
                         projection=["task_id", "status", "used", "generated"])


def check_each_task_once(db, workflow_id: str, n: int) -> None:
    """Every numbered task of both ranks once, finished; start and end records one document."""
    tasks = _numbered(db, workflow_id)
    assert len(tasks) == 2 * n and len({t["task_id"] for t in tasks}) == 2 * n
    assert sorted((t["used"]["rank"], t["used"]["i"]) for t in tasks) == [(r, i) for r in (0, 1)
                                                                          for i in range(n)]
    assert {t["status"] for t in tasks} == {"FINISHED"}
    assert all(t["generated"]["twice"] == 2 * t["used"]["i"] for t in tasks)
    [workflow] = db.workflow_query({"workflow_id": workflow_id})  # start and end: one document
    assert workflow["name"] == "mongo-live" and workflow["status"] == "FINISHED"
    assert workflow["started_at"] <= workflow["ended_at"]
    import pymongo

    from flowcept.settings import load_settings

    settings = load_settings()
    client = pymongo.MongoClient(settings["databases.mongodb.uri"], serverSelectionTimeoutMS=5000)
    try:  # the raw collections, as another reader of the database sees them
        stored = client[settings["databases.mongodb.db"]]
        assert stored.workflows.count_documents({"workflow_id": workflow_id}) == 1
        assert stored.tasks.count_documents({"workflow_id": workflow_id, "activity_id": "numbered"}) == 2 * n
    finally:
        client.close()


def test_daemon_streams_a_two_rank_job_live_and_each_task_once(start_mongo_daemon, mongo_env, tmp_path):
    from flowcept.flowcept_api.db_api import DBAPI

    workflow_id, n, pause_at = "wf-mongo-live", 300, 200
    mongo_daemon = start_mongo_daemon()
    job = start_job(mongo_daemon, tmp_path, workflow_id, n, pause_at)
    db = DBAPI()
    try:
        wait_paused(job, tmp_path)

        # The job is still running (both ranks wait for us): the tasks must already be in MongoDB.
        def live_tasks_visible() -> bool:  # one batch's collections are written one after the other
            return len(_numbered(db, workflow_id)) >= 2 * pause_at and bool(db.workflow_query(
                {"workflow_id": workflow_id}))

        wait_for(live_tasks_visible, 30, "the paused ranks' tasks in MongoDB")
        assert job.poll() is None
        live = _numbered(db, workflow_id)
        assert len(live) == 2 * pause_at
        assert sorted((t["used"]["rank"], t["used"]["i"]) for t in live) == \
            [(r, i) for r in (0, 1) for i in range(pause_at)]
        [running] = db.workflow_query({"workflow_id": workflow_id})
        assert running["name"] == "mongo-live" and running.get("ended_at") is None
    finally:
        (tmp_path / "resume").touch()
        output = job.communicate(timeout=90)[0].decode()
    assert job.returncode == 0, output[-3000:]

    def every_task_and_the_end() -> bool:
        workflows = db.workflow_query({"workflow_id": workflow_id})
        return len(_numbered(db, workflow_id)) >= 2 * n and bool(workflows) and workflows[0].get("ended_at")

    wait_for(every_task_and_the_end, 30, "every task and the workflow end in MongoDB")
    mongo_daemon.process.send_signal(signal.SIGTERM)  # close() flushes the sink: nothing more may appear
    assert mongo_daemon.process.wait(timeout=30) == 0, mongo_daemon.stderr()[-3000:]

    check_each_task_once(db, workflow_id, n)
    series = db.telemetry_timeseries({"workflow_id": workflow_id}, fields=["hostname"])
    assert series["timestamp"], "the daemon's node telemetry reached MongoDB"

    # Loading the daemon's node file into the same database afterwards (`flowcept consolidate`
    # with MongoDB enabled) merges into what the daemon streamed: still one document per task.
    from flowcept.settings import load_settings
    from flowcept.sinks.mongodb import load_workflow

    base = load_settings()["project.dump_buffer.path"]
    assert load_workflow(base, workflow_id) >= 2 * n
    check_each_task_once(db, workflow_id, n)
    db.close()
    from flowcept.mongo_spool import Spool

    assert Spool(mongo_env["FLOWCEPT_DATABASES_MONGODB_SPOOL_DIR"], 1 << 20).is_empty()  # nothing left behind


def test_server_stopped_mid_job_then_restarted_loses_and_doubles_nothing(
        start_mongo_daemon, persistent_server, tmp_path, monkeypatch):
    from flowcept.flowcept_api.db_api import DBAPI

    spool = tmp_path / "spool"
    for name, value in {"ENABLED": "true", "URI": persistent_server.uri, "DB": "outage", "TIMEOUT_S": "0.5",
                        "SPOOL_DIR": str(spool)}.items():
        monkeypatch.setenv(f"FLOWCEPT_DATABASES_MONGODB_{name}", value)
    workflow_id, n, pause_at = "wf-mongo-outage", 300, 100
    daemon = start_mongo_daemon()
    job = start_job(daemon, tmp_path, workflow_id, n, pause_at)
    db = DBAPI()
    try:
        wait_paused(job, tmp_path)
        wait_for(lambda: len(_numbered(db, workflow_id)) >= 2 * pause_at, 30, "the first tasks in MongoDB")
        db.close()
        persistent_server.stop()  # the database goes away mid-job
    finally:
        (tmp_path / "resume").touch()
        output = job.communicate(timeout=90)[0].decode()
    assert job.returncode == 0, output[-3000:]  # the job ran on (bounded by the spool, not the database)
    from flowcept.mongo_spool import Spool

    wait_for(lambda: not Spool(str(spool), 1 << 30).is_empty(), 30, "the daemon to spool during the outage")
    persistent_server.start()
    wait_for(lambda: len(_numbered(db, workflow_id)) >= 2 * n and Spool(str(spool), 1 << 30).is_empty(), 60,
             "the spool replayed into the restarted server")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=30) == 0, daemon.stderr()[-3000:]
    check_each_task_once(db, workflow_id, n)
    db.close()
