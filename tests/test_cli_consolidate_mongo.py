"""`flowcept consolidate --mongodb`: a workflow recorded offline, merged, then loaded into MongoDB."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest_mongo import *  # noqa: F401,F403  (fixtures)
from conftest_mongo import requires_server

pytest.importorskip("pymongo")
pytestmark = [pytest.mark.mongo, requires_server]


def test_consolidate_then_load_into_mongodb(mongo_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowcept import Flowcept, FlowceptTask
    from flowcept.cli import main

    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_ENABLED", "false")  # recorded with no database
    monkeypatch.setenv("FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP", "false")
    with Flowcept(workflow_name="offline") as run:
        for i in range(7):
            with FlowceptTask(activity_id="step", used={"i": i}) as task:
                task.end(generated={"i2": i * i})
    workflow_id = run.current_workflow_id
    monkeypatch.setenv("FLOWCEPT_DATABASES_MONGODB_ENABLED", "true")
    runner = CliRunner()
    result = runner.invoke(main, ["consolidate", "-q", "--mongodb", "--workflow-id", workflow_id])
    assert result.exit_code == 0, result.output
    assert "loaded into MongoDB" in result.output
    again = runner.invoke(main, ["consolidate", "-q", "--mongodb", "--workflow-id", workflow_id])
    assert again.exit_code == 0, again.output  # loading twice merges, never doubles
    import pymongo

    client = pymongo.MongoClient(mongo_env["FLOWCEPT_DATABASES_MONGODB_URI"], serverSelectionTimeoutMS=5000)
    try:
        db = client[mongo_env["FLOWCEPT_DATABASES_MONGODB_DB"]]
        tasks = list(db["tasks"].find({"workflow_id": workflow_id}))
        assert sorted(t["used"]["i"] for t in tasks) == list(range(7))
        assert db["workflows"].count_documents({"workflow_id": workflow_id}) == 1
    finally:
        client.close()
    assert os.path.exists(tmp_path / f"flowcept_buffer_{workflow_id}.jsonl")
