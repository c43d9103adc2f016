"""MongoSink and load_workflow against a real MongoDB-wire server over a socket."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, List

import orjson
import pytest
from conftest import app_env
from conftest_mongo import *  # noqa: F401,F403  (fixtures)
from conftest_mongo import requires_server

pytestmark = [pytest.mark.mongo, requires_server]


def _db(env: Dict[str, str]):
    import pymongo

    client = pymongo.MongoClient(env["FLOWCEPT_DATABASES_MONGODB_URI"], serverSelectionTimeoutMS=3000)
    return client[env["FLOWCEPT_DATABASES_MONGODB_DB"]]


def _tasks(n: int, wf: str = "wf-1", status: str = "FINISHED", start: int = 0) -> List[dict]:
    return [{"type": "task", "task_id": f"{wf}-t{i}", "workflow_id": wf, "activity_id": f"act{i % 3}",
             "status": status, "started_at": 1000.0 + i, "used": {"i": i}} for i in range(start, start + n)]


def _sink(**options):
    from flowcept.settings import load_settings
    from flowcept.sinks import sink_class

    return sink_class("mongodb")(load_settings(), **options)


def test_sink_writes_merges_and_indexes(mongo_env):
    sink = _sink(batch_size=50, flush_interval_s=0.05)
    try:
        running = _tasks(120, status="RUNNING")
        for task in running:
            task.pop("used")
        sink.write(running)
        sink.write([{"type": "workflow", "workflow_id": "wf-1", "status": "FINISHED", "ended_at": 2000.0}])
        sink.write([{"type": "workflow", "workflow_id": "wf-1", "name": "sim", "status": "RUNNING",
                     "started_at": 999.0, "flowcept_settings": {"databases": {"mongodb": {
                         "uri": "mongodb://alice:s3cr3t@db.example:27017"}}}}])
        sink.write(_tasks(120))  # the same tasks, FINISHED, with their outputs
        sink.write(_tasks(120, status="RUNNING")[:5])  # a stale update must not regress status
        sink.write([{"type": "telemetry", "telemetry_id": "m1", "workflow_id": "wf-1", "timestamp": 1.0},
                    {"type": "telemetry", "telemetry_id": "m1", "workflow_id": "wf-1", "timestamp": 1.0}])
        assert sink.flush(timeout_s=30)
    finally:
        sink.close()
        sink.close()  # idempotent
    db = _db(mongo_env)
    assert db.tasks.count_documents({}) == 120
    assert db.tasks.count_documents({"status": "FINISHED", "used.i": {"$exists": True}}) == 120
    assert db.telemetry.count_documents({}) == 1
    workflows = list(db.workflows.find({}, {"_id": 0}))
    assert len(workflows) == 1
    wf = workflows[0]
    assert (wf["status"], wf["name"], wf["started_at"], wf["ended_at"]) == ("FINISHED", "sim", 999.0, 2000.0)
    assert "s3cr3t" not in orjson.dumps(wf).decode()
    indexes = db.tasks.index_information()
    unique = [spec for spec in indexes.values() if spec["key"] == [("task_id", 1)]]
    assert unique and unique[0].get("unique")
    for field in ("workflow_id", "campaign_id", "activity_id", "status", "started_at", "ended_at"):
        assert any(spec["key"] == [(field, 1)] for spec in indexes.values()), field


def test_replaying_batches_is_idempotent(mongo_env):
    from flowcept.settings import load_settings
    from flowcept.sinks.mongodb import ensure_indexes, make_client, write_records

    settings = load_settings()
    client = make_client(settings["databases.mongodb.uri"], 2.0)
    db = client[settings["databases.mongodb.db"]]
    ensure_indexes(db)
    batch = _tasks(300) + [{"type": "workflow", "workflow_id": "wf-1", "status": "RUNNING"}]
    for _ in range(3):
        write_records(db, batch)
    assert db.tasks.count_documents({}) == 300
    assert db.workflows.count_documents({}) == 1
    client.close()


def _run_flowcept_app(tmp_path: Path, body: str, env: Dict[str, str]) -> subprocess.CompletedProcess:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(body))
    proc = subprocess.run([sys.executable, str(script)], env=app_env(env), capture_output=True, timeout=90,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc


def test_plain_script_finds_its_tasks_after_the_with_block(mongo_env, tmp_path):
    proc = _run_flowcept_app(tmp_path, """
        import json
        from flowcept import Flowcept, FlowceptTask, flowcept_task

        @flowcept_task
        def square(x):
            return x * x

        with Flowcept(workflow_name="plain"):
            for i in range(25):
                square(i)
            with FlowceptTask(activity_id="step", used={"n": 1}) as t:
                t.end(generated={"e": -1.0})
        wf = Flowcept.current_workflow_id
        tasks = Flowcept.db.get_tasks_from_current_workflow()
        workflow = Flowcept.db.get_workflow_object(wf)
        print(json.dumps({"wf": wf, "n": len(tasks), "status": str(workflow.status), "name": workflow.name,
                          "alive": Flowcept.services_alive()}))
        """, mongo_env)
    out = orjson.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == 26 and out["status"] == "FINISHED" and out["name"] == "plain" and out["alive"]
    db = _db(mongo_env)
    assert db.tasks.count_documents({"workflow_id": out["wf"]}) == 26
    assert db.tasks.count_documents({"workflow_id": out["wf"], "activity_id": "square"}) == 25


def test_start_persistence_false_keeps_the_run_out_of_the_database(mongo_env, tmp_path):
    proc = _run_flowcept_app(tmp_path, """
        import json
        from flowcept import Flowcept, FlowceptTask

        with Flowcept(workflow_name="kept_out", start_persistence=False) as fc:
            FlowceptTask(activity_id="t", used={"n": 1}, generated={"m": 1})
        records = Flowcept.read_buffer_file(consolidate=True, workflow_id=fc.current_workflow_id)
        print(json.dumps({"wf": fc.current_workflow_id, "on_disk": sum(r["type"] == "task" for r in records)}))
        """, mongo_env)
    out = orjson.loads(proc.stdout.strip().splitlines()[-1])
    assert out["on_disk"] == 1
    db = _db(mongo_env)
    assert db.tasks.count_documents({"workflow_id": out["wf"]}) == 0
    assert db.workflows.count_documents({"workflow_id": out["wf"]}) == 0


def test_load_workflow_from_files_is_idempotent(mongo_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_ENABLED", "false")  # the run writes files only
    proc = _run_flowcept_app(tmp_path, """
        from flowcept import Flowcept, FlowceptLoop
        with Flowcept(workflow_name="files") as f:
            for _ in FlowceptLoop(range(200), loop_name="epochs"):
                pass
        print(f.current_workflow_id)
        """, dict(mongo_env, FLOWCEPT_DATABASES_MONGODB_ENABLED="false"))
    wf = proc.stdout.decode().strip().splitlines()[-1]
    from flowcept.consolidation import read_jsonl
    from flowcept.settings import load_settings
    from flowcept.sinks.mongodb import load_workflow

    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_ENABLED", "true")
    settings = load_settings()
    base = settings["project.dump_buffer.path"]
    on_disk = [r for r in read_jsonl(str(Path(base).with_name(f"flowcept_buffer_{wf}.jsonl")))]
    assert load_workflow(base, wf, settings) == len(on_disk)
    assert load_workflow(base, wf, settings) == len(on_disk)  # a second load changes nothing
    db = _db(mongo_env)
    expected_tasks = sum(1 for r in on_disk if r.get("type", "task") == "task")
    assert db.tasks.count_documents({"workflow_id": wf}) == expected_tasks >= 200
    assert db.workflows.count_documents({"workflow_id": wf}) == 1


def test_outage_spools_and_replays_in_order_without_duplicates(persistent_server, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_ENABLED", "true")
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_URI", persistent_server.uri)
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_DB", "outage")
    sink = _sink(batch_size=100, flush_interval_s=0.05, timeout_s=0.5, flush_timeout_s=3.0, retry_max_s=0.5,
                 spool_dir=str(tmp_path / "spool"))
    try:
        sink.write(_tasks(500, status="RUNNING"))
        assert sink.flush(timeout_s=30)
        persistent_server.stop()  # the database goes away mid-run
        started = time.monotonic()
        sink.write(_tasks(500))  # the same tasks finish during the outage...
        sink.write(_tasks(300, start=500))  # ...and new ones start
        assert not sink.flush(timeout_s=3.0)  # bounded: the application is not held
        assert time.monotonic() - started < 10
        assert sink.counters()["spooled"] >= 800
        assert sink.spool.segments()
        persistent_server.start()
        assert sink.flush(timeout_s=30)
        assert sink.spool.is_empty()
    finally:
        sink.close()
    import pymongo

    db = pymongo.MongoClient(persistent_server.uri, serverSelectionTimeoutMS=3000).outage
    assert db.tasks.count_documents({}) == 800
    assert db.tasks.count_documents({"status": "FINISHED"}) == 800
    assert len(db.tasks.distinct("task_id")) == 800


def test_spool_is_bounded_and_write_never_blocks(tmp_path, caplog):
    from mongo_server import free_port

    from flowcept.settings import load_settings
    from flowcept.sinks import sink_class

    uri = f"mongodb://bob:hunter22@127.0.0.1:{free_port()}"  # nobody listens there
    sink = sink_class("mongodb")(load_settings(), uri=uri, db="x", batch_size=10, flush_interval_s=0.02,
                                 timeout_s=0.2, flush_timeout_s=1.0, spool_dir=str(tmp_path / "spool"),
                                 spool_max_bytes=20000)
    caplog.set_level(logging.DEBUG, logger="flowcept")
    try:
        started = time.monotonic()
        for _ in range(20):
            sink.write(_tasks(50))
        assert time.monotonic() - started < 1.0  # write() only appends
        sink.flush(timeout_s=2.0)
    finally:
        sink.close()
    assert sink.spool.size_bytes() <= 20000
    assert sink.counters()["spool_refused"] > 0
    assert "hunter22" not in caplog.text and "bob:" not in caplog.text
    assert "mongodb://***@127.0.0.1" in sink.target


def test_redact_uri():
    from flowcept.sinks.mongodb import redact_uri

    assert redact_uri("mongodb://u:p%40ss@h1,h2/db?authSource=admin") == "mongodb://***@h1,h2/db?authSource=admin"
    assert redact_uri("mongodb+srv://u:p@cluster.example/x") == "mongodb+srv://***@cluster.example/x"
    assert redact_uri("mongodb://h:27017") == "mongodb://h:27017"


def test_plain_script_with_the_database_down_spools_then_delivers(mongo_env, tmp_path):
    from mongo_server import free_port

    from flowcept.settings import load_settings

    dead = dict(mongo_env, FLOWCEPT_DATABASES_MONGODB_URI=f"mongodb://127.0.0.1:{free_port()}",
                FLOWCEPT_DATABASES_MONGODB_TIMEOUT_S="0.3")
    started = time.monotonic()
    proc = _run_flowcept_app(tmp_path, """
        from flowcept import Flowcept, flowcept_task

        @flowcept_task
        def f(x):
            return x

        with Flowcept(workflow_name="down") as run:
            for i in range(30):
                f(i)
        print(run.current_workflow_id)
        """, dead)
    assert time.monotonic() - started < 30
    wf = proc.stdout.decode().strip().splitlines()[-1]
    spool = Path(mongo_env["FLOWCEPT_DATABASES_MONGODB_SPOOL_DIR"])
    assert list(spool.glob("*.jsonl"))
    sink = _sink(spool_dir=str(spool))  # the next sink that reaches the database drains the spool
    try:
        assert sink.flush(timeout_s=30)
    finally:
        sink.close()
    assert load_settings()["databases.mongodb.uri"] == mongo_env["FLOWCEPT_DATABASES_MONGODB_URI"]
    assert _db(mongo_env).tasks.count_documents({"workflow_id": wf}) == 30
    assert _db(mongo_env).workflows.count_documents({"workflow_id": wf, "status": "FINISHED"}) == 1


def test_sinks_of_one_process_share_one_client(mongo_env):
    from flowcept.sinks.mongodb import shared_clients

    first, second = _sink(flush_interval_s=0.05), _sink(flush_interval_s=0.05)
    other = _sink(timeout_s=1.5)  # other options: a client of its own
    client = first._client
    try:
        assert second._client is client and other._client is not client
        assert shared_clients.users(client) == 2
        first.write(_tasks(10, wf="wf-a"))
        first.close()
        assert shared_clients.users(client) == 1  # the other sink still uses it
        second.write(_tasks(10, wf="wf-b"))
        assert second.flush()
        db = _db(mongo_env)
        assert db.tasks.count_documents({"workflow_id": {"$in": ["wf-a", "wf-b"]}}) == 20
    finally:
        for sink in (first, second, other):
            sink.close()
    assert shared_clients.users(client) == 0  # the last close closed it
    third = _sink()
    try:
        assert third._client is not client
    finally:
        third.close()
