"""FlowceptTask: arguments, auto-finalising, end/send/getters, the context manager and errors."""

from __future__ import annotations

import sys
import threading

import pytest
from conftest import tasks_of

from flowcept import Flowcept, FlowceptTask
from flowcept.records import Status


def _one(records, activity_id):
    found = [r for r in records if r.get("activity_id") == activity_id]
    assert len(found) == 1, found
    return found[0]


def test_all_arguments_recorded():
    with Flowcept(workflow_name="cap") as flowcept:
        task = FlowceptTask(task_id="my-task", workflow_id=None, campaign_id=None, activity_id="all",
                            agent_id="ag", source_agent_id="src", parent_task_id="p0", used={"x": 1},
                            data={"blob": [1, 2]}, subtype="st", hostname="h-override", tags=["a", "b"],
                            adapter_id="ad", custom_metadata={"m": 1}, started_at=100.0)
        assert task.get_id() == "my-task"
        assert task.get_workflow_id() == flowcept.current_workflow_id
        assert task.get_campaign_id() == flowcept.campaign_id
        assert task.get_agent_id() == "ag"
        task.end(generated={"y": 2}, stdout="out", data={"more": 1}, custom_metadata={"n": 2})
        records = flowcept.get_buffer()
    rec = _one(records, "all")
    assert rec["type"] == "task" and rec["task_id"] == "my-task"
    assert rec["workflow_id"] == flowcept.current_workflow_id and rec["campaign_id"] == flowcept.campaign_id
    assert rec["agent_id"] == "ag" and rec["source_agent_id"] == "src" and rec["parent_task_id"] == "p0"
    assert rec["used"] == {"x": 1} and rec["generated"] == {"y": 2} and rec["data"] == {"more": 1}
    assert rec["subtype"] == "st" and rec["hostname"] == "h-override" and rec["tags"] == ["a", "b"]
    assert rec["adapter_id"] == "ad" and rec["custom_metadata"] == {"m": 1, "n": 2}
    assert rec["started_at"] == 100.0 and rec["ended_at"] >= rec["started_at"]
    assert rec["status"] == "FINISHED" and rec["stdout"] == "out"
    assert rec["pid"] and "node_name" in rec


@pytest.mark.parametrize("outcome", [{"generated": {"a": 1}}, {"ended_at": 5.0}, {"stdout": "o"},
                                     {"stderr": "e"}, {"status": Status.ERROR}])
def test_outcome_argument_finalises(outcome):
    with Flowcept() as flowcept:
        task = FlowceptTask(activity_id="auto", used={"i": 1}, **outcome)
        assert task.ended
        task.end(generated={"later": True})  # ignored: already ended
        records = flowcept.get_buffer()
    rec = _one(records, "auto")
    expected_status = "ERROR" if outcome.get("status") is Status.ERROR else "FINISHED"
    assert rec["status"] == expected_status
    for key, value in outcome.items():
        if key != "status":
            assert rec[key] == value
    assert "later" not in (rec.get("generated") or {})


def test_send_and_end_once():
    with Flowcept() as flowcept:
        task = FlowceptTask(activity_id="sent", used={"a": 1})
        assert not task.ended
        task.send()
        task.send()
        task.end(status=Status.ERROR)
        records = flowcept.get_buffer()
    assert _one(records, "sent")["status"] == "FINISHED"


def test_context_manager_success_and_parenting():
    with Flowcept() as flowcept:
        with FlowceptTask(activity_id="outer") as outer:
            with FlowceptTask(activity_id="inner") as inner:
                inner.end(generated={"v": 1})
            assert inner.get_parent_task_id() == outer.get_id()
        with FlowceptTask(activity_id="after"):
            pass
        records = flowcept.get_buffer()
    assert _one(records, "inner")["parent_task_id"] == _one(records, "outer")["task_id"]
    assert _one(records, "outer")["status"] == "FINISHED"
    assert "parent_task_id" not in _one(records, "after")  # None fields are left out, as the reference does


def test_root_tasks_of_every_kind_have_no_parent_key_and_nested_ones_do():
    from flowcept import flowcept_task
    from flowcept.instrumentation.flowcept_loop import FlowceptLoop

    @flowcept_task
    def simple(x):  # the compiled wrapper
        return x

    @flowcept_task
    def general(*values):  # the general wrapper
        return len(values)

    with Flowcept() as flowcept:
        simple(1)
        general(1, 2)
        for _ in FlowceptLoop(2, loop_name="roots"):
            pass
        with FlowceptTask(activity_id="top") as top:
            simple(2)
            general(3)
            for _ in FlowceptLoop(1, loop_name="nested"):
                pass
        records = flowcept.get_buffer()
    tasks = [r for r in records if r["type"] == "task"]
    roots = [r for r in tasks if r["activity_id"] in ("top", "roots", "roots_iteration")]
    roots += [r for r in tasks if r["activity_id"] in ("simple", "general")
              and r["used"] in ({"x": 1}, {"values": [1, 2]})]
    assert len(roots) == 6 and all("parent_task_id" not in r for r in roots), roots
    nested = [r for r in tasks if r["activity_id"] in ("simple", "general", "nested") and r not in roots]
    assert len(nested) == 3 and all(r["parent_task_id"] == top.get_id() for r in nested), nested


def test_zero_timestamps_are_kept_and_end_without_status_finishes():
    with Flowcept() as flowcept:
        FlowceptTask(activity_id="epoch", started_at=0.0, ended_at=0.0)
        task = FlowceptTask(activity_id="plain", started_at=0)
        task.end(ended_at=0, status=None)
        FlowceptTask(activity_id="failed", status=Status.ERROR)
        records = flowcept.get_buffer()
    epoch = _one(records, "epoch")
    assert epoch["started_at"] == 0.0 and epoch["ended_at"] == 0.0 and epoch["status"] == "FINISHED"
    plain = _one(records, "plain")
    assert plain["started_at"] == 0 and plain["ended_at"] == 0 and plain["status"] == "FINISHED"
    assert _one(records, "failed")["status"] == "ERROR"


def test_context_manager_protocol_edges():
    """No ``used`` key without inputs; exiting twice, or without entering, neither raises nor leaks a parent."""
    with Flowcept() as flowcept:
        bare = FlowceptTask(activity_id="bare", capture_telemetry=False)
        bare.__exit__(None, None, None)  # never entered: ends the task, no token to reset
        twice = FlowceptTask(activity_id="twice")
        twice.__enter__()
        assert FlowceptTask(activity_id="probe").get_parent_task_id() == twice.get_id()
        twice.__exit__(None, None, None)
        twice.__exit__(None, None, None)
        with FlowceptTask(activity_id="after") as after:
            pass
        records = flowcept.get_buffer()
    assert after.get_parent_task_id() is None
    rec = _one(records, "bare")
    assert "used" not in rec and rec["status"] == "FINISHED"
    assert _one(records, "twice")["status"] == "FINISHED"


def test_context_manager_error_recorded_and_reraised():
    with Flowcept() as flowcept:
        with pytest.raises(ZeroDivisionError):
            with FlowceptTask(activity_id="boom", used={"x": 0}):
                1 / 0  # noqa: B018
        records = flowcept.get_buffer()
    rec = _one(records, "boom")
    assert rec["status"] == "ERROR"
    assert "ZeroDivisionError" in rec["stderr"] and "division by zero" in rec["stderr"]


def test_explicit_end_inside_block_keeps_user_status():
    with Flowcept() as flowcept:
        with pytest.raises(RuntimeError):
            with FlowceptTask(activity_id="kept") as task:
                task.end(status=Status.FINISHED, generated={"ok": True})
                raise RuntimeError("after end")
        records = flowcept.get_buffer()
    assert _one(records, "kept")["status"] == "FINISHED"


def test_no_op_outside_a_run():
    task = FlowceptTask(activity_id="orphan", used={"a": 1})
    task.end(generated={"b": 2})
    assert task.get_id() is None
    with FlowceptTask(activity_id="orphan2") as t:
        assert t.get_id() is None


def test_instrumentation_disabled(monkeypatch):
    monkeypatch.setenv("FLOWCEPT_INSTRUMENTATION_ENABLED", "false")
    with Flowcept() as flowcept:
        FlowceptTask(activity_id="off", generated={"a": 1})
        records = flowcept.get_buffer()
    assert not tasks_of(records)


def test_threads_get_unique_ids_and_own_parents():
    n_threads, per_thread = 4, 200

    def work(k):
        with FlowceptTask(activity_id=f"thread_{k}") as parent:
            for i in range(per_thread):
                with FlowceptTask(activity_id="child", used={"k": k, "i": i}) as child:
                    assert child.get_parent_task_id() == parent.get_id()

    with Flowcept() as flowcept:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        records = flowcept.get_buffer()
    tasks = tasks_of(records)
    ids = [r["task_id"] for r in tasks]
    assert len(ids) == len(set(ids)) == n_threads * (per_thread + 1)
    parents = {r["activity_id"]: r["task_id"] for r in tasks if r["activity_id"].startswith("thread_")}
    for r in tasks:
        if r["activity_id"] == "child":
            assert r["parent_task_id"] == parents[f"thread_{r['used']['k']}"]


def test_nested_and_sequential_flowcept_blocks():
    with Flowcept(workflow_name="outer") as outer:
        FlowceptTask(activity_id="o1", generated={"a": 1})
        with Flowcept(workflow_name="inner") as inner:
            assert Flowcept.current_workflow_id == inner.current_workflow_id
            FlowceptTask(activity_id="i1", generated={"a": 1})
        assert Flowcept.current_workflow_id == outer.current_workflow_id
        FlowceptTask(activity_id="o2", generated={"a": 1})
    with Flowcept(workflow_name="seq") as seq:
        FlowceptTask(activity_id="s1", generated={"a": 1})
    assert len({outer.current_workflow_id, inner.current_workflow_id, seq.current_workflow_id}) == 3
    assert Flowcept.current_workflow_id == seq.current_workflow_id  # readable after stop()

    def activities(flowcept, **kw):
        records = Flowcept.read_buffer_file(workflow_id=flowcept.current_workflow_id, **kw)
        assert all(r.get("workflow_id") == flowcept.current_workflow_id for r in records)
        assert [r for r in records if r["type"] == "workflow"], "workflow record missing"
        return sorted(r["activity_id"] for r in tasks_of(records))

    assert activities(outer) == ["o1", "o2"]
    assert activities(inner) == ["i1"]
    assert activities(seq) == ["s1"]
    assert sorted(r["activity_id"] for r in tasks_of(outer.get_buffer())) == ["o1", "o2"]
    assert sorted(r["activity_id"] for r in tasks_of(inner.get_buffer())) == ["i1"]


def test_get_buffer_dataframe_and_dump(buffer_base, flowcept_tmp):
    pytest.importorskip("pandas")
    with Flowcept() as flowcept:
        FlowceptTask(activity_id="df", used={"n": 1}, generated={"attention": [0.1, 0.9]})
        df = flowcept.get_buffer(return_df=True)
    assert "generated.attention" in df.columns and "used.n" in df.columns
    target = flowcept_tmp / "dumped.jsonl"
    flowcept.dump_buffer(str(target))
    dumped = Flowcept.read_buffer_file(str(target))
    assert [r["activity_id"] for r in tasks_of(dumped)] == ["df"]
    df2 = Flowcept.read_buffer_file(str(target), return_df=True, normalize_df=True)
    assert "generated.attention" in df2.columns
    import flowcept as pkg

    pkg.dump_buffer(str(flowcept_tmp / "again.jsonl"))  # module-level alias after stop()
    assert tasks_of(Flowcept.read_buffer_file(str(flowcept_tmp / "again.jsonl")))


@pytest.mark.parametrize("consolidate_on_stop", ["true", "false"])
def test_buffer_after_stop_holds_one_workflow_record(flowcept_tmp, monkeypatch, consolidate_on_stop):
    """get_buffer() and dump_buffer() after stop(): the start and end merged, as the files give it."""
    monkeypatch.setenv("FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP", consolidate_on_stop)
    with Flowcept(workflow_name="one_record") as flowcept:
        FlowceptTask(activity_id="t", used={"n": 1}, generated={"m": 2})
    records = flowcept.get_buffer()
    workflows = [r for r in records if r["type"] == "workflow"]
    assert len(workflows) == 1, workflows
    assert workflows[0]["status"] == "FINISHED" and workflows[0]["name"] == "one_record"
    assert workflows[0]["ended_at"] >= workflows[0]["started_at"]
    target = flowcept_tmp / "dumped_one.jsonl"
    flowcept.dump_buffer(str(target))
    assert [r["status"] for r in Flowcept.read_buffer_file(str(target)) if r["type"] == "workflow"] == ["FINISHED"]
    from_files = Flowcept.read_buffer_file(consolidate=True, workflow_id=flowcept.current_workflow_id)
    assert [r for r in from_files if r["type"] == "workflow"] == workflows


def test_delete_buffer_file(flowcept_tmp):
    target = flowcept_tmp / "x.jsonl"
    target.write_text("{}\n")
    Flowcept.delete_buffer_file(str(target))
    assert not target.exists()
    Flowcept.delete_buffer_file(str(target))  # missing: no error


def test_start_consumption_services_is_harmless():
    Flowcept.start_consumption_services()
    with pytest.raises(NotImplementedError):
        Flowcept.start_consumption_services(consumers=["a", "b"])


def test_unwritable_buffer_path_never_raises_into_user_code(flowcept_tmp, monkeypatch, caplog):
    blocker = flowcept_tmp / "not_a_dir"
    blocker.write_text("a file where a directory should be")
    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_PATH", str(blocker / "sub" / "buf.jsonl"))
    monkeypatch.setenv("FLOWCEPT_LOG_LOG_STREAM_LEVEL", "error")
    with Flowcept() as flowcept:
        for i in range(10):
            with FlowceptTask(activity_id="lost?", used={"i": i}) as task:
                task.end(generated={"i": i})
        from flowcept.buffer import get_pipeline

        pipeline = get_pipeline(create=False)
        pipeline.flush()
        counters = pipeline.counters()
    assert counters.get("failed", 0) + counters.get("dropped", 0) >= 10, counters
    # The records are still in this run's in-memory view.
    assert len(tasks_of(flowcept.get_buffer())) == 10


def test_error_text_reaches_stderr_for_base_exceptions():
    with Flowcept() as flowcept:
        with pytest.raises(KeyboardInterrupt):
            with FlowceptTask(activity_id="kbd"):
                raise KeyboardInterrupt
        records = flowcept.get_buffer()
    rec = _one(records, "kbd")
    assert rec["status"] == "ERROR" and "KeyboardInterrupt" in rec["stderr"]
    assert sys.exc_info() == (None, None, None)
