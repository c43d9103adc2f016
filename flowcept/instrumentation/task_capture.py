"""``FlowceptTask``: one task, captured by hand (object or context manager)."""

from __future__ import annotations

from time import time
from typing import Any, Dict, List, Optional

from flowcept import capture
from flowcept.capture import current_task_id
from flowcept.ids import id_factory
from flowcept.records import Status

_ids = id_factory()
_FINISHED = Status.FINISHED.value
_ERROR = Status.ERROR.value
_FINISHED_STATUS = Status.FINISHED  # identity check: Enum .value costs ~0.2 µs on the hot path


def _status_text(status: Any) -> Any:
    return status.value if isinstance(status, Status) else status


class FlowceptTask:
    """Capture one task: its inputs, outputs, timing, placement and (optionally) telemetry.

    Passing any outcome argument (``generated``, ``ended_at``, ``stdout``, ``stderr``,
    ``status``) finalises the task at once. As a context manager the task becomes the parent of
    tasks started inside the block; an exception in the block records ``status: ERROR`` with
    the error text in ``stderr`` and is re-raised. Outside a started ``Flowcept`` (or with
    ``instrumentation.enabled: false``) every method is a no-op.
    """

    __slots__ = ("_record", "_ended", "_token", "_telemetry")

    def __init__(self, task_id: Optional[str] = None, workflow_id: Optional[str] = None,
                 campaign_id: Optional[str] = None, activity_id: Optional[str] = None,
                 agent_id: Optional[str] = None, source_agent_id: Optional[str] = None,
                 parent_task_id: Optional[str] = None, used: Optional[Dict] = None, data: Any = None,
                 subtype: Optional[str] = None, hostname: Optional[str] = None,
                 tags: Optional[List[str]] = None, adapter_id: Optional[str] = None,
                 custom_metadata: Optional[Dict] = None, generated: Optional[Dict] = None,
                 started_at: Optional[float] = None, ended_at: Optional[float] = None,
                 stdout: Optional[str] = None, stderr: Optional[str] = None,
                 status: Optional[Status] = None, capture_telemetry: Optional[bool] = None):
        run = capture.state
        self._token = None
        if not run.capturing:
            self._record = None
            self._ended = True
            self._telemetry = None
            return
        record = {
            "type": "task",
            "task_id": task_id or _ids.prefix + str(next(_ids.counter)),
            "workflow_id": workflow_id or run.workflow_id,
            "campaign_id": campaign_id or run.campaign_id,
            "activity_id": activity_id,
            "started_at": started_at or time(),
            "parent_task_id": parent_task_id or current_task_id.get(),
            **run.base,
        }
        if used is not None:
            record["used"] = used
        if data is not None:
            record["data"] = data
        if subtype is not None:
            record["subtype"] = subtype
        if hostname is not None:
            record["hostname"] = hostname
        if tags is not None:
            record["tags"] = tags
        if adapter_id is not None:
            record["adapter_id"] = adapter_id
        if custom_metadata is not None:
            record["custom_metadata"] = custom_metadata
        if agent_id is not None:
            record["agent_id"] = agent_id
        if source_agent_id is not None:
            record["source_agent_id"] = source_agent_id
        telemetry = run.telemetry if capture_telemetry is None or capture_telemetry else None
        if capture_telemetry and telemetry is None:
            from flowcept.telemetry import ensure_capture

            telemetry = ensure_capture()
        if telemetry is not None:
            record["telemetry_at_start"] = telemetry.capture()
        self._telemetry = telemetry
        self._record = record
        self._ended = False
        if (generated is not None or ended_at is not None or stdout is not None or stderr is not None
                or status is not None):
            self.end(generated=generated, ended_at=ended_at, stdout=stdout, stderr=stderr,
                     status=status or Status.FINISHED)

    def __enter__(self) -> FlowceptTask:
        if self._record is not None:
            self._token = current_task_id.set(self._record["task_id"])
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> bool:
        if self._token is not None:
            try:
                current_task_id.reset(self._token)
            except ValueError:  # exited in another context (generators, threads)
                pass
            self._token = None
        if not self._ended:
            if exc_type is not None:
                self.end(stderr=_error_text(exc_type, exc_val), status=Status.ERROR)
            else:
                self.end()
        return False  # an explicit end() inside the block keeps the user's status; errors propagate

    def end(self, generated: Optional[Dict] = None, ended_at: Optional[float] = None,
            stdout: Optional[str] = None, stderr: Optional[str] = None, data: Any = None,
            custom_metadata: Optional[Dict] = None, status: Optional[Status] = Status.FINISHED) -> None:
        """Finalise the task (once) and send it; later calls are ignored."""
        if self._ended:
            return
        self._ended = True
        record = self._record
        record["ended_at"] = ended_at or time()
        record["status"] = (_FINISHED if status is None or status is _FINISHED_STATUS
                            else _status_text(status))
        if generated is not None:
            record["generated"] = generated
        if stdout is not None:
            record["stdout"] = stdout
        if stderr is not None:
            record["stderr"] = stderr
        if data is not None:
            record["data"] = data
        if custom_metadata is not None:
            existing = record.get("custom_metadata")
            record["custom_metadata"] = {**existing, **custom_metadata} if existing else custom_metadata
        if self._telemetry is not None:
            record["telemetry_at_end"] = self._telemetry.capture()
        capture.state.append(record)

    def send(self) -> None:
        """Finalise with status FINISHED if not already ended."""
        self.end()

    def get_id(self) -> Optional[str]:
        return self._record["task_id"] if self._record is not None else None

    def get_workflow_id(self) -> Optional[str]:
        return self._record["workflow_id"] if self._record is not None else None

    def get_campaign_id(self) -> Optional[str]:
        return self._record["campaign_id"] if self._record is not None else None

    def get_agent_id(self) -> Optional[str]:
        return self._record.get("agent_id") if self._record is not None else None

    def get_parent_task_id(self) -> Optional[str]:
        return self._record.get("parent_task_id") if self._record is not None else None

    def get_activity_id(self) -> Optional[str]:
        return self._record.get("activity_id") if self._record is not None else None

    def to_dict(self) -> Dict[str, Any]:
        """The record as captured so far (a copy)."""
        return dict(self._record) if self._record is not None else {}

    @property
    def ended(self) -> bool:
        return self._ended


def _error_text(exc_type: Any, exc_val: Any) -> str:
    name = getattr(exc_type, "__name__", str(exc_type))
    return f"{name}: {exc_val}" if str(exc_val) else name
