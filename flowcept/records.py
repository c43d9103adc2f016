"""The record types: what a task, a workflow and a status look like on the wire and on disk.

Capture builds plain dicts (cheap); these classes are the documented, typed face of those dicts
for users who want objects. ``to_dict`` drops ``None`` fields, as the reference does.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any, AnyStr, Dict, List, Optional

import orjson


class Status(str, Enum):
    """Execution status; a ``str`` so it serialises as its name."""

    SUBMITTED = "SUBMITTED"
    WAITING = "WAITING"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    ERROR = "ERROR"
    UNKNOWN = "UNKNOWN"

    @staticmethod
    def get_finished_statuses() -> List[Status]:
        return [Status.FINISHED, Status.ERROR]

    def __str__(self) -> str:
        return self.value


def _status_value(value: Any) -> Any:
    return value.value if isinstance(value, Status) else value


class _RecordObject:
    """Shared behaviour of TaskObject and WorkflowObject."""

    type: str = ""
    _FIELDS: tuple = ()

    def to_dict(self) -> Dict[str, Any]:
        """Return the record as a dict without None fields; ``type`` is always present."""
        out: Dict[str, Any] = {"type": self.type}
        for name in self._FIELDS:
            value = getattr(self, name, None)
            if value is not None:
                out[name] = _status_value(value)
        for name, value in self.__dict__.items():
            if name not in out and value is not None and not name.startswith("_"):
                out[name] = _status_value(value)
        return out

    def serialize(self) -> bytes:
        """Return the record as JSON bytes (safe for values JSON cannot hold)."""
        from flowcept.serialization import dumps

        return dumps(self.to_dict())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()!r})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    __hash__ = None  # type: ignore[assignment]


class TaskObject(_RecordObject):
    """One provenance task: inputs, outputs, timing, placement, telemetry."""

    type = "task"
    _FIELDS = (
        "task_id", "workflow_id", "workflow_name", "campaign_id", "activity_id", "subtype",
        "parent_task_id", "group_id", "used", "generated", "data", "status", "stdout", "stderr",
        "submitted_at", "started_at", "ended_at", "registered_at", "utc_timestamp",
        "telemetry_at_start", "telemetry_at_end", "custom_metadata", "tags", "dependencies",
        "dependents", "hostname", "node_name", "pid", "rank", "local_rank", "job_id", "step_id",
        "login_name", "user", "private_ip", "public_ip", "address", "mq_host", "environment_id",
        "adapter_id", "agent_id", "source_agent_id",
    )

    activity_id: Optional[AnyStr] = None
    adapter_id: Optional[AnyStr] = None
    address: Optional[AnyStr] = None
    agent_id: Optional[str] = None
    campaign_id: Optional[AnyStr] = None
    custom_metadata: Optional[Dict[AnyStr, Any]] = None
    data: Any = None
    dependencies: Optional[List] = None
    dependents: Optional[List] = None
    ended_at: Optional[float] = None
    environment_id: Optional[AnyStr] = None
    generated: Optional[Dict[AnyStr, Any]] = None
    group_id: Optional[AnyStr] = None
    hostname: Optional[AnyStr] = None
    job_id: Optional[str] = None
    local_rank: Optional[int] = None
    login_name: Optional[AnyStr] = None
    mq_host: Optional[str] = None
    node_name: Optional[AnyStr] = None
    parent_task_id: Optional[AnyStr] = None
    pid: Optional[int] = None
    private_ip: Optional[AnyStr] = None
    public_ip: Optional[AnyStr] = None
    rank: Optional[int] = None
    registered_at: Optional[float] = None
    source_agent_id: Optional[str] = None
    started_at: Optional[float] = None
    status: Optional[Status] = None
    stderr: Any = None
    stdout: Any = None
    step_id: Optional[str] = None
    submitted_at: Optional[float] = None
    subtype: Optional[AnyStr] = None
    tags: Optional[List] = None
    task_id: Optional[AnyStr] = None
    telemetry_at_end: Optional[Dict[str, Any]] = None
    telemetry_at_start: Optional[Dict[str, Any]] = None
    used: Optional[Dict[AnyStr, Any]] = None
    user: Optional[AnyStr] = None
    utc_timestamp: Optional[float] = None
    workflow_id: Optional[AnyStr] = None
    workflow_name: Optional[AnyStr] = None

    def __init__(self, **fields: Any):
        for name, value in fields.items():
            setattr(self, name, value)

    @staticmethod
    def task_id_field() -> str:
        return "task_id"

    @staticmethod
    def workflow_id_field() -> str:
        return "workflow_id"

    @staticmethod
    def get_time_field_names() -> List[str]:
        return ["started_at", "ended_at", "submitted_at", "registered_at", "utc_timestamp"]

    @staticmethod
    def get_dict_field_names() -> List[str]:
        return ["used", "generated", "custom_metadata", "telemetry_at_start", "telemetry_at_end"]

    @staticmethod
    def from_dict(task_obj_dict: Dict[Any, Any]) -> TaskObject:
        """Build a TaskObject from a record dict (unknown keys are kept as attributes)."""
        task = TaskObject()
        for name, value in task_obj_dict.items():
            if name == "type":
                continue
            if name == "status" and isinstance(value, str) and value in Status.__members__:
                value = Status(value)
            setattr(task, name, value)
        return task

    def enrich(self, adapter_key: Optional[str] = None) -> None:
        """Fill placement and time fields that are still empty."""
        if adapter_key is not None:
            self.adapter_id = adapter_key
        if self.utc_timestamp is None:
            self.utc_timestamp = time.time()
        TaskObject.enrich_task_dict(self.__dict__)

    @staticmethod
    def enrich_task_dict(task_dict: dict) -> None:
        """Fill the placement fields of a task dict that are missing or None, in place."""
        from flowcept.placement import current_placement

        for name, value in current_placement().fields.items():
            if task_dict.get(name) is None and value is not None:
                task_dict[name] = value


class WorkflowObject(_RecordObject):
    """A workflow run: identity, where and by whom it ran, with which settings."""

    type = "workflow"
    _FIELDS = (
        "workflow_id", "parent_workflow_id", "campaign_id", "bundle_exec_id", "name", "subtype",
        "status", "started_at", "ended_at", "used", "generated", "conf", "custom_metadata",
        "extra_metadata", "machine_info", "flowcept_settings", "flowcept_version", "code_repository",
        "interceptor_ids", "adapter_id", "environment_id", "sys_name", "user", "utc_timestamp",
        "world_size", "hosts", "hostname", "rank", "job_id", "step_id", "agent_id",
    )

    adapter_id: Optional[AnyStr] = None
    agent_id: Optional[str] = None
    bundle_exec_id: Optional[str] = None
    campaign_id: Optional[AnyStr] = None
    code_repository: Optional[Dict] = None
    conf: Optional[Dict] = None
    custom_metadata: Optional[Dict] = None
    ended_at: Optional[float] = None
    environment_id: Optional[str] = None
    extra_metadata: Optional[str] = None
    flowcept_settings: Optional[Dict] = None
    flowcept_version: Optional[AnyStr] = None
    generated: Optional[Dict] = None
    hosts: Optional[List[str]] = None
    interceptor_ids: Optional[List] = None
    machine_info: Optional[Dict] = None
    name: Optional[AnyStr] = None
    parent_workflow_id: Optional[AnyStr] = None
    started_at: Optional[float] = None
    status: Optional[Status] = None
    subtype: Optional[AnyStr] = None
    sys_name: Optional[str] = None
    used: Optional[Dict] = None
    user: Optional[AnyStr] = None
    utc_timestamp: Optional[float] = None
    workflow_id: Optional[AnyStr] = None
    world_size: Optional[int] = None

    def __init__(self, workflow_id: Any = None, name: Any = None, used: Any = None, generated: Any = None):
        self.workflow_id = workflow_id
        self.name = name
        self.used = used
        self.generated = generated

    @staticmethod
    def workflow_id_field() -> str:
        return "workflow_id"

    @staticmethod
    def from_dict(dict_obj: Dict[Any, Any]) -> WorkflowObject:
        """Build a WorkflowObject from a record dict (unknown keys are kept as attributes)."""
        workflow = WorkflowObject()
        for name, value in dict_obj.items():
            if name == "type":
                continue
            if name == "status" and isinstance(value, str) and value in Status.__members__:
                value = Status(value)
            setattr(workflow, name, value)
        return workflow

    @staticmethod
    def deserialize(serialized_data: Any) -> WorkflowObject:
        """Build a WorkflowObject from JSON bytes/str (or a dict)."""
        data = serialized_data if isinstance(serialized_data, dict) else orjson.loads(serialized_data)
        return WorkflowObject.from_dict(data)

    def enrich(self, adapter_key: Optional[str] = None) -> None:
        """Fill identity fields that are still empty (user, version, timestamp)."""
        from flowcept.version import __version__

        if adapter_key is not None:
            self.adapter_id = adapter_key
        if self.utc_timestamp is None:
            self.utc_timestamp = time.time()
        if self.flowcept_version is None:
            self.flowcept_version = __version__
        if self.user is None:
            from flowcept.placement import current_placement

            self.user = current_placement().user
