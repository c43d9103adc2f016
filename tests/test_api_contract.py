"""Pins the public API of the seed reference: names, module paths, arguments and defaults."""

from __future__ import annotations

import importlib
import inspect

import pytest

E = inspect.Parameter.empty


def params(func) -> dict:
    return {name: p for name, p in inspect.signature(func).parameters.items()}


def assert_signature(func, expected: list) -> None:
    """expected: [(name, default)] in order; default E for required, '*'/'**' for var args."""
    actual = list(params(func).values())
    if actual and actual[0].name in ("self", "cls"):
        actual = actual[1:]
    names = [p.name for p in actual]
    assert names[: len(expected)] == [n for n, _ in expected], f"{func.__qualname__}: {names}"
    for p, (name, default) in zip(actual, expected):
        if default == "*":
            assert p.kind is p.VAR_POSITIONAL, name
        elif default == "**":
            assert p.kind is p.VAR_KEYWORD, name
        else:
            assert p.default == default or (p.default is default), f"{func.__qualname__}.{name}={p.default!r}"
    # Anything we add past the reference must be optional.
    for p in actual[len(expected):]:
        assert p.default is not E or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD), p.name


def test_top_level_names_and_module_paths():
    import flowcept
    from flowcept.instrumentation import flowcept_loop

    for name in ("Flowcept", "FlowceptTask", "flowcept_task", "FlowceptLoop", "FlowceptLightweightLoop",
                 "TaskObject", "WorkflowObject"):
        assert hasattr(flowcept, name), name
    assert flowcept.FlowceptLoop is flowcept_loop.FlowceptLoop
    assert flowcept.FlowceptLightweightLoop is flowcept_loop.FlowceptLightweightLoop
    assert inspect.isclass(flowcept.Flowcept) and inspect.isclass(flowcept.FlowceptTask)
    assert callable(flowcept.flowcept_task)
    assert isinstance(flowcept.__version__, str)
    with pytest.raises(AttributeError):
        flowcept.no_such_name  # noqa: B018
    for module in ("flowcept.flowcept_api.flowcept_controller", "flowcept.instrumentation.flowcept_task",
                   "flowcept.instrumentation.flowcept_loop"):
        importlib.import_module(module)


def test_flowcept_constructor():
    from flowcept import Flowcept

    assert_signature(Flowcept.__init__, [
        ("interceptors", None), ("bundle_exec_id", None), ("campaign_id", None), ("workflow_id", None),
        ("workflow_name", None), ("workflow_subtype", None), ("workflow_args", None), ("agent_id", None),
        ("parent_workflow_id", None), ("start_persistence", True), ("check_safe_stops", True),
        ("save_workflow", True), ("delete_buffer_file", None), ("args", "*"), ("kwargs", "**"),
    ])


def test_flowcept_methods():
    from flowcept import Flowcept

    static = ("read_buffer_file", "delete_buffer_file", "generate_report", "services_alive",
              "start_consumption_services")
    for name in static:
        assert isinstance(inspect.getattr_static(Flowcept, name), staticmethod), name
    for name in ("get_buffer", "dump_buffer", "save_workflow", "start", "stop", "__enter__", "__exit__"):
        assert callable(getattr(Flowcept, name)) and not isinstance(
            inspect.getattr_static(Flowcept, name), staticmethod), name
    assert_signature(Flowcept.delete_buffer_file, [("path", None)])
    assert_signature(Flowcept.dump_buffer, [("path", None)])
    assert_signature(Flowcept.get_buffer, [("return_df", False)])
    assert_signature(Flowcept.read_buffer_file, [
        ("file_path", None), ("return_df", False), ("normalize_df", False), ("consolidate", False),
        ("workflow_id", None), ("cleanup_files", True)])
    assert_signature(Flowcept.generate_report, [
        ("report_type", "provenance_card"), ("format", "markdown"), ("print_markdown", False),
        ("output_path", None), ("input_jsonl_path", None), ("records", None), ("workflow_id", None),
        ("campaign_id", None)])
    assert_signature(Flowcept.services_alive, [])
    assert_signature(Flowcept.start_consumption_services, [
        ("bundle_exec_id", None), ("check_safe_stops", False), ("consumers", None)])
    names = list(params(Flowcept.save_workflow))
    assert names[1:3] == ["interceptor", "interceptor_instance"]
    assert_signature(Flowcept.start, [])
    assert_signature(Flowcept.stop, [])


def test_flowcept_class_level_ids_and_lifecycle():
    from flowcept import Flowcept

    flowcept = Flowcept(workflow_name="contract")
    assert flowcept.start() is flowcept
    workflow_id = flowcept.current_workflow_id
    assert Flowcept.current_workflow_id == workflow_id and workflow_id
    assert Flowcept.campaign_id == flowcept.campaign_id and Flowcept.campaign_id
    assert Flowcept.services_alive() is True  # embedded default: nothing to be down
    flowcept.stop()
    assert Flowcept.current_workflow_id == workflow_id  # readable after stop()
    assert Flowcept.campaign_id == flowcept.campaign_id


def test_flowcept_task_signature():
    from flowcept import FlowceptTask

    assert_signature(FlowceptTask.__init__, [
        ("task_id", None), ("workflow_id", None), ("campaign_id", None), ("activity_id", None),
        ("agent_id", None), ("source_agent_id", None), ("parent_task_id", None), ("used", None),
        ("data", None), ("subtype", None), ("hostname", None), ("tags", None), ("adapter_id", None),
        ("custom_metadata", None), ("generated", None), ("started_at", None), ("ended_at", None),
        ("stdout", None), ("stderr", None), ("status", None)])
    end = params(FlowceptTask.end)
    assert list(end)[1:] == ["generated", "ended_at", "stdout", "stderr", "data", "custom_metadata", "status"]
    assert all(end[name].default is None for name in list(end)[1:])  # no status means FINISHED
    for name in ("send", "get_id", "get_workflow_id", "get_campaign_id", "get_agent_id", "__enter__",
                 "__exit__"):
        assert callable(getattr(FlowceptTask, name)), name


def test_loop_signatures():
    from flowcept.instrumentation.flowcept_loop import FlowceptLightweightLoop, FlowceptLoop

    for cls in (FlowceptLoop, FlowceptLightweightLoop):
        assert_signature(cls.__init__, [
            ("items", E), ("loop_name", "loop"), ("item_name", "item"), ("parent_task_id", None),
            ("workflow_id", None), ("items_length", 0), ("capture_enabled", True)])
        assert callable(cls.get_current_iteration_id)
        assert callable(cls.end_iter)
        assert list(params(cls.end_iter))[1] == "generated_value"


TASK_FIELDS = (
    "activity_id adapter_id address agent_id campaign_id custom_metadata data dependencies dependents "
    "ended_at environment_id generated group_id hostname login_name mq_host node_name parent_task_id "
    "private_ip public_ip registered_at source_agent_id started_at status stderr stdout submitted_at "
    "subtype tags task_id telemetry_at_end telemetry_at_start used user utc_timestamp workflow_id "
    "workflow_name").split()

WORKFLOW_FIELDS = (
    "adapter_id campaign_id code_repository conf custom_metadata environment_id extra_metadata "
    "flowcept_settings flowcept_version generated interceptor_ids machine_info name parent_workflow_id "
    "subtype sys_name used user utc_timestamp workflow_id").split()


def test_task_object():
    from flowcept import TaskObject
    from flowcept.records import Status

    for name in TASK_FIELDS:
        assert hasattr(TaskObject, name) and getattr(TaskObject, name) is None, name
    assert TaskObject.type == "task"
    for name in ("enrich_task_dict", "from_dict", "get_dict_field_names", "get_time_field_names",
                 "task_id_field", "workflow_id_field"):
        assert isinstance(inspect.getattr_static(TaskObject, name), staticmethod), name
    assert TaskObject.task_id_field() == "task_id"
    assert TaskObject.workflow_id_field() == "workflow_id"
    assert "started_at" in TaskObject.get_time_field_names()
    assert "used" in TaskObject.get_dict_field_names()

    task = TaskObject.from_dict({"type": "task", "task_id": "t1", "status": "FINISHED", "used": {"a": 1},
                                 "extra_field": 5})
    assert task.status is Status.FINISHED and task.used == {"a": 1}
    out = task.to_dict()
    assert out["type"] == "task" and out["task_id"] == "t1" and out["status"] == "FINISHED"
    assert out["extra_field"] == 5 and "generated" not in out  # None fields dropped
    assert TaskObject.from_dict(out) == task
    import orjson

    assert orjson.loads(task.serialize())["task_id"] == "t1"
    task.enrich(adapter_key="manual")
    assert task.adapter_id == "manual" and task.hostname and task.pid and task.utc_timestamp
    d = {"task_id": "x", "hostname": None}
    TaskObject.enrich_task_dict(d)
    assert d["hostname"]


def test_workflow_object_and_status():
    from flowcept import WorkflowObject
    from flowcept.records import Status

    assert_signature(WorkflowObject.__init__, [("workflow_id", None), ("name", None), ("used", None),
                                               ("generated", None)])
    for name in WORKFLOW_FIELDS:
        assert hasattr(WorkflowObject, name), name
    for name in ("deserialize", "from_dict", "workflow_id_field"):
        assert isinstance(inspect.getattr_static(WorkflowObject, name), staticmethod), name
    workflow = WorkflowObject(workflow_id="w", name="n", used={"a": 1})
    workflow.enrich("instrumentation")
    data = workflow.to_dict()
    assert data["type"] == "workflow" and data["flowcept_version"] and data["user"]
    again = WorkflowObject.deserialize(workflow.serialize())
    assert again.workflow_id == "w" and again.used == {"a": 1}
    assert WorkflowObject.from_dict(data).to_dict() == data
    assert {s.name for s in Status} >= {"SUBMITTED", "WAITING", "RUNNING", "FINISHED", "ERROR", "UNKNOWN"}
    import flowcept

    assert flowcept.Status is Status
