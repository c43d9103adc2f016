"""The state capture reads on its hot path, and the current parent task.

The controller (``Flowcept.start``/``stop``) replaces ``state`` wholesale; capture code reads
one module global and a few attributes, nothing else. The parent task is a ``ContextVar`` so
threads and asyncio tasks each see their own.

A published state also carries the run's constant task fields (campaign id, placement)
already serialised (``suffix``), so capture serialises only what varies per task and
splices the two (``splice``, see ``Pipeline.append_parts``; the hot paths inline it and
append to ``lines``, the run's workflow list in the pipeline).
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any, Callable, Dict, Optional

logger = logging.getLogger(__name__)

current_task_id: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "flowcept_current_task_id", default=None
)

# The parent-task operations as plain names, for hot paths to import. CPython 3.11 compiles
# ``name.method(...)`` without its method-call fast path when ``name`` came from a
# ``from ... import``: ``current_task_id.set(x)`` imported that way makes a bound-method
# object per call (set + reset cost ~170 ns instead of ~100 ns here).
get_parent = current_task_id.get
set_parent = current_task_id.set
reset_parent = current_task_id.reset


class RunState:
    """A snapshot of the active run; immutable once published."""

    __slots__ = ("capturing", "workflow_id", "campaign_id", "workflow_name", "append", "base",
                 "telemetry", "settings", "splice", "rest", "suffix", "pipeline", "lines", "flush_size",
                 "limit")

    def __init__(self, capturing: bool = False, workflow_id: Optional[str] = None,
                 campaign_id: Optional[str] = None, workflow_name: Optional[str] = None,
                 append: Optional[Callable[[dict], None]] = None, base: Optional[Dict[str, Any]] = None,
                 telemetry: Any = None, settings: Any = None):
        self.capturing = capturing
        self.workflow_id = workflow_id
        self.campaign_id = campaign_id
        self.workflow_name = workflow_name
        self.append = append or _not_started
        self.base = base or {}
        self.telemetry = telemetry  # None, or an object with .capture() -> dict
        self.settings = settings
        # The fields every task of this run shares, and their JSON; capture splices them
        # through ``splice`` (a Pipeline's append_parts) when ``append`` is a Pipeline's.
        # workflow_id stays in the serialised head of each line: consolidation recognises
        # lines that start with type, id and workflow id without parsing them.
        self.rest = {"campaign_id": campaign_id, **self.base}
        self.suffix = constant_suffix(self.rest)
        owner = getattr(append, "__self__", None)
        self.splice = getattr(owner, "append_parts", None) if capturing else None
        # The hot paths append spliced lines straight to this run's workflow list (see
        # ``flowcept.buffer``) and tell ``pipeline.full`` when it reaches a multiple of
        # ``flush_size``; ``lines`` is None when they must go through ``append``.
        self.pipeline = owner if self.splice is not None else None
        self.lines = owner.lines_for(workflow_id) if self.pipeline is not None else None
        self.flush_size = owner.flush_size if self.pipeline is not None else 1
        self.limit = 0
        if self.pipeline is not None:
            from flowcept import serialization

            self.limit = serialization.max_value_bytes


def constant_suffix(fields: Dict[str, Any]) -> bytes:
    """``fields`` as the tail of a JSON line: ``,"k":v,...}`` and a newline (``}`` alone when empty).

    Appended to a serialised record without its closing brace, it yields one JSON object; the
    caller guarantees the record is non-empty and shares no key with ``fields``.
    """
    if not fields:
        return b"}\n"
    from flowcept.serialization import dumps

    return b"," + dumps(fields)[1:] + b"\n"


_warned_not_started = False


def _not_started(record: dict) -> None:
    global _warned_not_started
    if not _warned_not_started:
        _warned_not_started = True
        logger.warning("a task was captured outside any started Flowcept; it is not recorded "
                       "(wrap the code in `with Flowcept(...):`)")


IDLE = RunState()
state: RunState = IDLE


def publish(new_state: RunState) -> None:
    """Make ``new_state`` what capture sees from now on."""
    global state
    state = new_state


def emit(record: dict) -> None:
    """Send a finished record through the active run (used by everything that is not a task)."""
    state.append(record)
