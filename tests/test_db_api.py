"""Flowcept.db (DBAPI): every method against a real server, and the same answers from the files."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import orjson
import pytest
from conftest_mongo import *  # noqa: F401,F403  (fixtures)
from conftest_mongo import requires_server

mongo = [pytest.mark.mongo, requires_server]


def write_dataset(base: str) -> None:
    """Two workflows on disk: wfA consolidated, wfB as per-process files with RUNNING then FINISHED."""
    directory = Path(base).parent
    a_tasks: List[Dict[str, Any]] = []
    for i in range(12):
        task: Dict[str, Any] = {"type": "task", "task_id": f"a{i:02d}", "workflow_id": "wfA", "campaign_id": "c1",
                                "activity_id": f"act{i % 3}", "status": "ERROR" if i == 7 else "FINISHED",
                                "started_at": 100.0 + i, "ended_at": 101.0 + i, "used": {"x": i, "s": "abcdef"[i % 6]},
                                "tags": ["even" if i % 2 == 0 else "odd", f"t{i % 4}"], "hostname": f"n{i % 2}"}
        if i % 4:
            task["generated"] = {"y": i * 1.5}
        if i == 5:
            task["used"]["x"] = "5"  # a string among numbers: never compared to them
        if i == 9:
            task["used"]["x"] = None
        a_tasks.append(task)
    lines = a_tasks + [
        {"type": "workflow", "workflow_id": "wfA", "campaign_id": "c1", "name": "alpha", "status": "FINISHED",
         "started_at": 99.0, "ended_at": 200.0},
        {"type": "telemetry", "telemetry_id": "m1", "workflow_id": "wfA", "hostname": "n0", "timestamp": 3.0,
         "cpu": {"percent": 30.0}, "gpu": [{"power": 100}]},
        {"type": "telemetry", "telemetry_id": "m2", "workflow_id": "wfA", "hostname": "n0", "timestamp": 1.0,
         "cpu": {"percent": 10.0}, "gpu": [{"power": 90}]},
        {"type": "telemetry", "telemetry_id": "m3", "workflow_id": "wfA", "hostname": "n1", "timestamp": 2.0,
         "cpu": {"percent": 20.0}},
    ]
    (directory / "flowcept_buffer_wfA.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in lines))
    running = [{"type": "task", "task_id": f"b{i}", "workflow_id": "wfB", "campaign_id": "c1",
                "activity_id": "train", "status": "RUNNING", "started_at": 300.0 + i, "used": {"x": 100 + i}}
               for i in range(4)]
    finished = [{"type": "task", "task_id": f"b{i}", "workflow_id": "wfB", "status": "FINISHED",
                 "ended_at": 310.0 + i, "generated": {"y": -i}} for i in range(3)]
    (directory / "flowcept_buffer_wfB_h1_11.jsonl").write_bytes(
        b"".join(orjson.dumps(r) + b"\n" for r in running
                 + [{"type": "workflow", "workflow_id": "wfB", "name": "beta", "status": "RUNNING",
                     "started_at": 299.0}]))
    (directory / "flowcept_buffer_wfB_h1_12.jsonl").write_bytes(
        b"".join(orjson.dumps(r) + b"\n" for r in finished
                 + [{"type": "workflow", "workflow_id": "wfB", "status": "FINISHED", "ended_at": 400.0}]))


QUERIES: List[Dict[str, Any]] = [
    {},
    {"workflow_id": "wfA"},
    {"status": "FINISHED"},
    {"status": {"$ne": "FINISHED"}},
    {"used.x": {"$gt": 3}},
    {"used.x": {"$gte": 3, "$lt": 8}},
    {"used.x": {"$lte": 2}},
    {"used.x": {"$in": [1, 2, "5", 101]}},
    {"activity_id": {"$nin": ["act0", "train"]}},
    {"generated.y": {"$exists": False}},
    {"generated": {"$exists": True}, "workflow_id": {"$eq": "wfA"}},
    {"$or": [{"used.x": 1}, {"activity_id": "act2"}]},
    {"$and": [{"campaign_id": "c1"}, {"started_at": {"$gt": 105.5}}]},
    {"$nor": [{"workflow_id": "wfA"}]},
    {"tags": "odd"},
    {"tags": {"$in": ["t3", "t0"]}},
    {"used.x": None},
    {"used.x": {"$not": {"$gt": 4}}},
    {"used.s": {"$gte": "c"}},
    {"used": {"x": 2, "s": "c"}},
]


def _by_id(docs: List[dict]) -> List[dict]:
    return sorted(docs, key=lambda d: str(d.get("task_id") or d.get("workflow_id") or d.get("telemetry_id")))


def _answers(db: Any) -> Dict[str, Any]:
    answers: Dict[str, Any] = {}
    for number, query in enumerate(QUERIES):
        answers[f"q{number}"] = _by_id(db.task_query(query))
    answers["projection"] = _by_id(db.task_query({"workflow_id": "wfB"}, projection={"task_id": 1, "used.x": 1}))
    answers["exclusion"] = _by_id(db.task_query({"workflow_id": "wfA"}, projection={"used": 0, "tags": 0}))
    answers["list_projection"] = _by_id(db.task_query({}, projection=["task_id", "status"]))
    answers["sort_limit"] = db.task_query({}, sort=[("used.x", -1), ("task_id", 1)], limit=6)
    answers["sort_missing_first"] = [d["task_id"] for d in db.task_query({}, sort=[("generated.y", 1),
                                                                                   ("task_id", -1)])]
    answers["agg_all"] = db.task_query({"workflow_id": "wfA"}, aggregation=[
        ("avg", "generated.y"), ("max", "started_at"), ("min", "started_at"), ("sum", "generated.y"),
        ("count", "generated.y")])
    answers["agg_grouped"] = db.task_query({}, projection=["activity_id"],
                                           aggregation=[("avg", "started_at"), ("count", "task_id")])
    answers["agg_sorted"] = db.task_query({}, projection=["workflow_id"], sort=[("max_ended_at", -1)],
                                          aggregation=[("max", "ended_at")])
    answers["workflows"] = _by_id(db.workflow_query({}))
    answers["workflow_b"] = db.workflow_query({"name": "beta"})
    answers["telemetry"] = db.query({"hostname": "n0"}, collection="telemetry", sort=[("timestamp", 1)])
    answers["series"] = db.telemetry_timeseries({"workflow_id": "wfA"}, fields=["cpu.percent", "gpu.0.power"])
    answers["series_window"] = db.telemetry_timeseries(None, fields=["cpu.percent"], start=1.5, end=3.0)
    return answers


def _load_into_mongo(base: str) -> None:
    from flowcept.settings import load_settings
    from flowcept.sinks.mongodb import load_workflow

    settings = load_settings()
    for wf in ("wfA", "wfB"):
        load_workflow(base, wf, settings)


@pytest.mark.mongo
@requires_server
def test_embedded_answers_equal_the_server_answers(mongo_env, buffer_base, monkeypatch):
    from flowcept.flowcept_api.db_api import DBAPI

    write_dataset(buffer_base)
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_ENABLED", "false")
    embedded = _answers(DBAPI())
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_ENABLED", "true")
    _load_into_mongo(buffer_base)
    server = _answers(DBAPI())
    assert embedded["q0"] and len(embedded["q0"]) == 16
    assert [d["task_id"] for d in embedded["q7"]] == ["a01", "a02", "a05", "b1"]
    assert embedded["series"] == {"timestamp": [1.0, 2.0, 3.0], "hostname": ["n0", "n1", "n0"],
                                  "cpu.percent": [10.0, 20.0, 30.0], "gpu.0.power": [90, None, 100]}
    for name in embedded:
        assert embedded[name] == server[name], name


def _every_method(db: Any, tmp_path: Path) -> None:
    from flowcept import TaskObject, WorkflowObject

    assert db.liveness_test() is True
    db.insert_or_update_workflow(WorkflowObject(workflow_id="wfC", name="gamma"))
    db.insert_or_update_task(TaskObject(task_id="c1", workflow_id="wfC", activity_id="a", status="RUNNING"))
    db.insert_or_update_task({"task_id": "c1", "workflow_id": "wfC", "status": "FINISHED", "generated": {"z": 1}})
    db.insert_or_update_task({"task_id": "c2", "workflow_id": "wfC", "status": "FINISHED"})
    wf = WorkflowObject(workflow_id="wfC")
    wf.status = "FINISHED"
    db.insert_or_update_workflow(wf)
    tasks = _by_id(db.task_query({"workflow_id": "wfC"}))
    assert [(t["task_id"], t["status"]) for t in tasks] == [("c1", "FINISHED"), ("c2", "FINISHED")]
    assert tasks[0]["activity_id"] == "a" and tasks[0]["generated"] == {"z": 1}
    workflow = db.get_workflow_object("wfC")
    assert workflow.name == "gamma" and str(workflow.status) == "FINISHED"
    assert db.get_workflow_object("nope") is None
    assert db.query({"workflow_id": "wfC"}, collection="workflows")[0]["name"] == "gamma"

    frame = db.to_df("tasks", {"workflow_id": "wfA"})
    assert len(frame) == 12 and "used.x" in frame.columns
    out = db.dump_to_file("tasks", {"workflow_id": "wfB"}, str(tmp_path / "b.json"), "json")
    assert sorted(d["task_id"] for d in json.loads(Path(out).read_text())) == ["b0", "b1", "b2", "b3"]
    pytest.importorskip("pyarrow", reason="parquet export needs pyarrow (in the 'test' extra)")
    import pandas as pd

    out = db.dump_to_file("tasks", {}, str(tmp_path / "all.parquet"), "parquet")
    assert len(pd.read_parquet(out)) == 18

    deleted = db.delete_workflow_data("wfB")
    assert deleted["tasks"] == 4 and deleted["workflows"] == 1
    assert db.task_query({"workflow_id": "wfB"}) == [] and db.workflow_query({"workflow_id": "wfB"}) == []
    assert len(db.task_query({"workflow_id": "wfA"})) == 12


@pytest.mark.mongo
@requires_server
def test_every_method_on_the_server(mongo_env, buffer_base, tmp_path):
    from flowcept.flowcept_api.db_api import DBAPI

    write_dataset(buffer_base)
    _load_into_mongo(buffer_base)
    db = DBAPI()
    _every_method(db, tmp_path)
    db.close()


def test_every_method_on_the_files(buffer_base, tmp_path):
    from flowcept.flowcept_api.db_api import DBAPI

    write_dataset(buffer_base)
    _every_method(DBAPI(), tmp_path)


@pytest.mark.parametrize("backend", ["files", pytest.param("mongo", marks=mongo)])
def test_bad_filters_are_clear_errors(backend, request, buffer_base):
    from flowcept.flowcept_api.db_api import DBAPI

    if backend == "mongo":
        request.getfixturevalue("mongo_env")
    write_dataset(buffer_base)
    db = DBAPI()
    cases = [
        ({"used.x": {"$foo": 1}}, "$foo"),
        ({"$where": "this.x > 1"}, "$where"),
        ({"$or": {"a": 1}}, "$or"),
        ({"used.x": {"$in": 3}}, "$in"),
        ({"x": {"$gt": 1, "y": 2}}, "mixes"),
    ]
    for query, named in cases:
        with pytest.raises(ValueError, match=named.replace("$", r"\$")):
            db.task_query(query)
    with pytest.raises(ValueError, match="median"):
        db.task_query({}, aggregation=[("median", "used.x")])
    with pytest.raises(ValueError, match="sort"):
        db.task_query({}, sort=[("used.x", 2)])
    with pytest.raises(ValueError, match="collection"):
        db.query({}, collection="nope")
    with pytest.raises(ValueError):
        db.task_query("not a dict")  # type: ignore[arg-type]


def test_current_workflow_tasks_from_files():
    from flowcept import Flowcept, flowcept_task

    @flowcept_task
    def double(x: int) -> int:
        return 2 * x

    with Flowcept(workflow_name="embedded"):
        for i in range(7):
            double(i)
    tasks = Flowcept.db.get_tasks_from_current_workflow()
    assert len(tasks) == 7 and {t["activity_id"] for t in tasks} == {"double"}
    assert Flowcept.db.get_workflow_object(Flowcept.current_workflow_id).name == "embedded"
    assert Flowcept.services_alive()


@pytest.mark.mongo
@requires_server
def test_liveness_false_is_bounded(monkeypatch):
    from mongo_server import free_port

    from flowcept.flowcept_api.db_api import DBAPI

    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_ENABLED", "true")
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_URI", f"mongodb://127.0.0.1:{free_port()}")
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_TIMEOUT_S", "0.3")
    started = time.monotonic()
    assert DBAPI().liveness_test() is False
    assert time.monotonic() - started < 5


def _update_wfB(db: Any) -> None:
    db.insert_or_update_task({"task_id": "b3", "workflow_id": "wfB", "status": "FINISHED", "ended_at": 313.0,
                              "generated": {"fixed": True}})
    db.insert_or_update_task({"task_id": "b9", "workflow_id": "wfB", "activity_id": "added", "status": "FINISHED"})
    db.insert_or_update_workflow({"workflow_id": "wfB", "name": "beta-renamed"})


def _check_wfB_updated(db: Any) -> None:
    tasks = {t["task_id"]: t for t in db.task_query({"workflow_id": "wfB"})}
    assert sorted(tasks) == ["b0", "b1", "b2", "b3", "b9"]
    assert tasks["b3"]["status"] == "FINISHED" and tasks["b3"]["generated"] == {"fixed": True}
    assert tasks["b3"]["used"] == {"x": 103} and tasks["b3"]["ended_at"] == 313.0  # merged, not replaced
    [workflow] = db.workflow_query({"workflow_id": "wfB"})
    assert workflow["name"] == "beta-renamed" and workflow["status"] == "FINISHED"


def test_embedded_updates_survive_reconsolidation(buffer_base):
    from flowcept.consolidation import consolidate
    from flowcept.embedded_query import update_files
    from flowcept.flowcept_api.db_api import DBAPI

    write_dataset(buffer_base)
    consolidate(buffer_base, "wfB")
    db = DBAPI()
    _update_wfB(db)
    _check_wfB_updated(db)
    [log] = update_files(buffer_base, "wfB")
    formats = ["jsonl", "jsonl"] + (["hdf5"] if importlib.util.find_spec("h5py") else [])
    for output_format in formats:  # re-consolidations never drop or delete the log
        consolidate(buffer_base, "wfB", output_format=output_format)
        assert Path(log).exists()
        _check_wfB_updated(db)
    assert len(db.task_query({"workflow_id": "wfA"})) == 12  # other workflows untouched
    assert {t["task_id"] for t in db.task_query({"task_id": {"$in": ["b9", "a00"]}})} == {"b9", "a00"}
    deleted = db.delete_workflow_data("wfB")
    assert deleted["tasks"] == 5 and not Path(log).exists()
    assert db.task_query({"workflow_id": "wfB"}) == []


@pytest.mark.mongo
@requires_server
def test_embedded_updates_reach_the_server_on_load(mongo_env, buffer_base, monkeypatch):
    from flowcept.flowcept_api.db_api import DBAPI

    write_dataset(buffer_base)
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_ENABLED", "false")
    embedded = DBAPI()
    _update_wfB(embedded)
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_ENABLED", "true")
    _load_into_mongo(buffer_base)
    _load_into_mongo(buffer_base)  # twice: idempotent
    server = DBAPI()
    _check_wfB_updated(server)
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_ENABLED", "false")
    files = _by_id(embedded.task_query({}))
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_ENABLED", "true")
    assert _by_id(server.task_query({})) == files
    server.close()
