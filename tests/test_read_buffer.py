"""read_buffer_file: default paths, per-process merge in memory, data frames, exact workflow ids."""

from __future__ import annotations

import os

import pytest
from conftest import run_app, tasks_of

from flowcept import Flowcept, FlowceptTask


def _run(workflow_id, n=3, **env):
    with Flowcept(workflow_id=workflow_id) as fc:
        for i in range(n):
            FlowceptTask(activity_id="r", used={"i": i}, generated={"attention": [i, i + 1]})
    return fc


def test_default_path_reads_consolidated_file(monkeypatch, flowcept_tmp):
    fc = _run("rd1")
    assert os.path.basename(fc.output_path) == "flowcept_buffer_rd1.jsonl"
    records = Flowcept.read_buffer_file(workflow_id="rd1")
    assert len(tasks_of(records)) == 3
    assert len(tasks_of(Flowcept.read_buffer_file())) == 3  # current (last) workflow


def test_default_path_merges_per_process_files_in_memory(monkeypatch, flowcept_tmp):
    monkeypatch.setenv("FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP", "false")
    for k in range(2):
        run_app("worker.py", "rd2", "4", f"k{k}")
    run_app("worker.py", "rd2_x", "4", "other")
    records = Flowcept.read_buffer_file(workflow_id="rd2")
    assert len(tasks_of(records, "rd2")) == 16 and len(tasks_of(records)) == 16
    assert [r for r in records if r["type"] == "workflow"]
    # Nothing was merged on disk by a plain read.
    assert not os.path.exists(flowcept_tmp / "flowcept_buffer_rd2.jsonl")


def test_consolidate_with_explicit_base_path(monkeypatch, flowcept_tmp):
    other = flowcept_tmp / "elsewhere" / "base.jsonl"
    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_PATH", str(other))
    monkeypatch.setenv("FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP", "false")
    _run("rd3")
    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_PATH", str(flowcept_tmp / "unused.jsonl"))
    records = Flowcept.read_buffer_file(str(other), consolidate=True, workflow_id="rd3")
    assert len(tasks_of(records)) == 3
    assert os.path.exists(other.parent / "base_rd3.jsonl")


def test_data_frames(flowcept_tmp):
    pytest.importorskip("pandas")
    fc = _run("rd4")
    df = Flowcept.read_buffer_file(fc.output_path, return_df=True)
    assert "generated.attention" in df.columns and "used.i" in df.columns
    df2 = Flowcept.read_buffer_file(fc.output_path, return_df=True, normalize_df=True)
    assert "used.i" in df2.columns and len(df2) == len(df)


def test_consolidate_is_idempotent_and_keeps_a_finished_workflow_record(flowcept_tmp):
    fc = _run("rd5", n=5)
    first = Flowcept.read_buffer_file(consolidate=True, workflow_id="rd5")
    second = Flowcept.read_buffer_file(consolidate=True, workflow_id="rd5")
    assert sorted(map(str, first)) == sorted(map(str, second))
    workflows = [r for r in second if r["type"] == "workflow"]
    assert len(workflows) == 1 and workflows[0]["status"] == "FINISHED" and workflows[0].get("started_at")
    assert fc.output_path == str(flowcept_tmp / "flowcept_buffer_rd5.jsonl")


def test_reading_needs_a_workflow_to_consolidate(monkeypatch):
    from flowcept.flowcept_api import flowcept_controller

    monkeypatch.setattr(flowcept_controller.Flowcept, "current_workflow_id", None)
    with pytest.raises(ValueError):
        Flowcept.read_buffer_file(consolidate=True)


def test_consolidate_leaves_files_it_cannot_attribute(flowcept_tmp):
    """The reviewer's case: a torn-only file whose name also reads as workflow exp_3's survives."""
    import orjson

    def write(name, records, tail=b""):
        (flowcept_tmp / name).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + tail)

    write("flowcept_buffer_exp_vm_1.jsonl", [{"type": "task", "task_id": "a1", "workflow_id": "exp"},
                                             {"type": "task", "task_id": "a2", "workflow_id": "exp"}])
    write("flowcept_buffer_exp_2_vm_2.jsonl", [{"type": "telemetry", "ts": 1},
                                               {"type": "task", "task_id": "b1", "workflow_id": "exp_2"}])
    write("flowcept_buffer_exp_3_vm_3.jsonl", [], b'{"type":"task","task_id":"c1","workflow_id":"exp_3"')
    write("flowcept_buffer_exp_vm_4.jsonl", [{"type": "task", "task_id": "a1", "workflow_id": "exp"},
                                             {"type": "task", "task_id": "a3", "workflow_id": "exp"}])
    records = Flowcept.read_buffer_file(consolidate=True, workflow_id="exp")
    assert sorted((r["task_id"], r["workflow_id"]) for r in records) == [("a1", "exp"), ("a2", "exp"),
                                                                         ("a3", "exp")]
    assert sorted(os.listdir(flowcept_tmp)) == ["flowcept_buffer_exp.jsonl", "flowcept_buffer_exp_2_vm_2.jsonl",
                                                "flowcept_buffer_exp_3_vm_3.jsonl"]
