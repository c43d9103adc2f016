"""``FlowceptTask``: one task, captured by hand (object or context manager)."""

from __future__ import annotations

from time import time
from typing import Any, Dict, List, Optional

import orjson

from flowcept import capture
from flowcept.buffer import FAST_OPTIONS, splice_line
from flowcept.capture import get_parent, reset_parent, set_parent
from flowcept.ids import id_factory
from flowcept.records import Status
from flowcept.serialization import _fallback

_ids = id_factory()
_dumps = orjson.dumps
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

    The record holds only what varies per task; the run's constant fields (campaign id,
    placement) are serialised once per run and spliced in when the task is sent
    (``Pipeline.append_parts``, inlined in ``end``). ``to_dict()`` returns the whole record.
    """

    __slots__ = ("_record", "_ended", "_token", "_telemetry", "_run", "_lines")

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
        if not run.capturing:
            self._record = None
            self._ended = True
            self._telemetry = None
            self._run = None
            self._lines = None
            return
        # type, task_id, workflow_id lead every task line (consolidation relies on it).
        self._record = record = {
            "type": "task",
            "task_id": task_id or _ids.prefix + str(next(_ids.counter)),
            "workflow_id": workflow_id or run.workflow_id,
            "activity_id": activity_id,
            "started_at": started_at if started_at is not None else time(),
            "used": used,
        }
        if used is None:  # rare: one key less to set in the common case
            del record["used"]
        parent_task_id = parent_task_id or get_parent()
        if parent_task_id is not None:  # a root task has none: the key is left out, as None fields are
            record["parent_task_id"] = parent_task_id
        self._run = run
        # Lines go straight to the run's workflow list, unless the task names another workflow.
        self._lines = run.lines if workflow_id is None or workflow_id == run.workflow_id else None
        self._ended = False
        if (data is not None or subtype is not None or tags is not None or adapter_id is not None
                or custom_metadata is not None or agent_id is not None or source_agent_id is not None
                or campaign_id or hostname is not None):
            if data is not None:
                record["data"] = data
            if subtype is not None:
                record["subtype"] = subtype
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
            if campaign_id or hostname is not None:  # overrides a constant field: no splicing
                if campaign_id:
                    record["campaign_id"] = campaign_id
                if hostname is not None:
                    record["hostname"] = hostname
                self._lines = None
        self._telemetry = telemetry = run.telemetry if capture_telemetry is None else _telemetry_for(
            run, capture_telemetry)
        if telemetry is not None:
            record["telemetry_at_start"] = telemetry.capture()
        if (generated is not None or ended_at is not None or stdout is not None or stderr is not None
                or status is not None):
            self.end(generated=generated, ended_at=ended_at, stdout=stdout, stderr=stderr,
                     status=status or Status.FINISHED)

    def __enter__(self) -> FlowceptTask:
        record = self._record
        # Set here, not in __init__: a task never entered has no token to reset.
        self._token = set_parent(record["task_id"]) if record is not None else None
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> bool:
        try:
            token = self._token
        except AttributeError:  # __exit__ without __enter__
            token = None
        if token is not None:
            try:
                reset_parent(token)
            except (ValueError, RuntimeError):  # exited in another context, or exited twice
                pass
        if not self._ended:
            if exc_type is not None:
                self.end(stderr=_error_text(exc_type, exc_val), status=Status.ERROR)
            else:
                self.end()
        return False  # an explicit end() inside the block keeps the user's status; errors propagate

    def end(self, generated: Optional[Dict] = None, ended_at: Optional[float] = None,
            stdout: Optional[str] = None, stderr: Optional[str] = None, data: Any = None,
            custom_metadata: Optional[Dict] = None, status: Optional[Status] = None) -> None:
        """Finalise the task (once) and send it; later calls are ignored. No status means FINISHED."""
        if self._ended:
            return
        self._ended = True
        record = self._record
        record["ended_at"] = ended_at if ended_at is not None else time()
        record["status"] = (_FINISHED if status is None or status is _FINISHED_STATUS
                            else _status_text(status))
        if generated is not None:
            record["generated"] = generated
        if stdout is not None or stderr is not None or data is not None or custom_metadata is not None:
            if stdout is not None:
                record["stdout"] = stdout
            if stderr is not None:
                record["stderr"] = stderr
            if data is not None:
                record["data"] = data
            if custom_metadata is not None:
                existing = record.get("custom_metadata")
                record["custom_metadata"] = {**existing, **custom_metadata} if existing else custom_metadata
        telemetry = self._telemetry
        if telemetry is not None:
            record["telemetry_at_end"] = telemetry.capture()
        run = self._run
        lines = self._lines
        if lines is not None and capture.state is run:
            # Pipeline.append_parts without its list lookup: serialise what varies, splice the
            # run's constant tail.
            if telemetry is None:
                try:  # splice_line, inlined; a value the fast path refuses or an oversized one: its way
                    body = _dumps(record, default=_fallback, option=FAST_OPTIONS)
                    if len(body) > run.limit:
                        raise ValueError
                    lines.append(body[:-1] + run.suffix)
                except Exception:
                    lines.append(splice_line(record, run.suffix, run.rest))
            else:
                lines.append(_telemetry_line(record, telemetry, run))
            if not len(lines) % run.flush_size:
                run.pipeline.full(lines)
        else:  # the run changed since the task began, a field overrides a constant one, no pipeline
            capture.state.append(self.to_dict())

    def send(self) -> None:
        """Finalise with status FINISHED if not already ended."""
        self.end()

    def get_id(self) -> Optional[str]:
        return self._record["task_id"] if self._record is not None else None

    def get_workflow_id(self) -> Optional[str]:
        return self._record["workflow_id"] if self._record is not None else None

    def get_campaign_id(self) -> Optional[str]:
        if self._record is None:
            return None
        return self._record.get("campaign_id") or self._run.campaign_id

    def get_agent_id(self) -> Optional[str]:
        return self._record.get("agent_id") if self._record is not None else None

    def get_parent_task_id(self) -> Optional[str]:
        return self._record.get("parent_task_id") if self._record is not None else None

    def get_activity_id(self) -> Optional[str]:
        return self._record.get("activity_id") if self._record is not None else None

    def to_dict(self) -> Dict[str, Any]:
        """The record as captured so far, with the run's constant fields (a copy)."""
        return full_record(self._record, self._run)

    @property
    def ended(self) -> bool:
        return self._ended


def full_record(record: Optional[Dict[str, Any]], run: Any) -> Dict[str, Any]:
    """``record`` completed with the constant fields of ``run`` it does not set itself (a copy)."""
    if record is None:
        return {}
    out = dict(record)
    if run is not None:
        for name, value in run.rest.items():
            if name not in out:
                out[name] = value
    return out


def _telemetry_line(record: Dict[str, Any], telemetry: Any, run: Any) -> bytes:
    """``splice_line`` of a record holding telemetry snapshots, without serialising cached ones again.

    A cached snapshot is written from the JSON made when it was published
    (``TelemetryCapture.fragment_of``); anything else goes the usual way.
    """
    fragment_of = getattr(telemetry, "fragment_of", None)
    if fragment_of is not None:
        swapped = None
        for key in ("telemetry_at_start", "telemetry_at_end"):
            fragment = fragment_of(record.get(key))
            if fragment is not None:
                if swapped is None:
                    swapped = dict(record)
                swapped[key] = fragment
        if swapped is not None:
            try:
                body = _dumps(swapped, default=_fallback, option=FAST_OPTIONS)
            except Exception:  # a value the fast path refuses: the usual way, which handles it
                body = None
            if body is not None and len(body) <= run.limit:
                return body[:-1] + run.suffix
    return splice_line(record, run.suffix, run.rest)


def _telemetry_for(run: Any, capture_telemetry: bool) -> Any:
    """The telemetry source of a task that said whether it wants telemetry (None: it does not)."""
    if not capture_telemetry:
        return None
    if run.telemetry is not None:
        return run.telemetry
    from flowcept.telemetry import ensure_capture

    return ensure_capture()


def _error_text(exc_type: Any, exc_val: Any) -> str:
    name = getattr(exc_type, "__name__", str(exc_type))
    return f"{name}: {exc_val}" if str(exc_val) else name
