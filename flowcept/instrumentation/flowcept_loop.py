"""Loops whose iterations are captured as tasks, including the one a ``break`` or error cut short.

Each iteration is a ``type: "task"`` record with ``activity_id`` ``<loop_name>_iteration``,
``subtype`` ``iteration``, ``used`` ``{"i": index, <item_name>: item}`` and ``group_id`` set to
the loop's own task id. The loop itself is recorded once, when it ends, as a task with
``activity_id`` ``<loop_name>`` and ``subtype`` ``loop`` (``generated.iterations`` tells how many
ran). Iteration is a generator, so when a ``for`` loop is left by ``break`` or an exception the
generator is closed at once and the interrupted iteration is still recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from time import time
from typing import Any, Dict, Optional, Sized, Union

from flowcept import capture
from flowcept.capture import current_task_id
from flowcept.ids import id_factory

_ids = id_factory()

__all__ = ["FlowceptLoop", "FlowceptLightweightLoop"]


class FlowceptLoop:
    """Wrap an iterable (sized, an int, or an iterator with ``items_length``) and capture each step."""

    _subtype = "iteration"

    def __init__(self, items: Union[Sized, Iterator, int], loop_name: str = "loop", item_name: str = "item",
                 parent_task_id: Optional[str] = None, workflow_id: Optional[str] = None,
                 items_length: int = 0, capture_enabled: bool = True):
        if isinstance(items, bool):
            raise TypeError("FlowceptLoop items must be a sized iterable, an int or an iterator, not bool")
        if isinstance(items, int):
            self._items: Any = range(items)
            self._length = items if items > 0 else 0
        elif hasattr(items, "__len__") and hasattr(items, "__iter__"):
            self._items = items
            self._length = len(items)  # type: ignore[arg-type]
        elif isinstance(items, Iterator) or hasattr(items, "__next__"):
            self._items = items
            self._length = items_length if items_length and items_length > 0 else None
        elif hasattr(items, "__iter__"):
            self._items = items
            self._length = items_length or None
        else:
            raise TypeError(f"FlowceptLoop cannot iterate over {type(items).__name__}: pass a sized "
                            f"iterable, an int or an iterator (with items_length if known)")
        self.loop_name = loop_name
        self.item_name = item_name
        self._activity_id = f"{loop_name}_iteration"
        run = capture.state
        self.enabled = bool(capture_enabled) and run.capturing
        self.workflow_id = workflow_id or run.workflow_id
        self._parent_task_id = parent_task_id or current_task_id.get()
        self._loop_id = _ids.prefix + str(next(_ids.counter))
        self._current: Optional[Dict[str, Any]] = None
        self._next_index = 0
        self._own_iterator: Optional[Iterator] = None
        self._started_at: Optional[float] = None

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("this FlowceptLoop wraps an iterator of unknown length (pass items_length)")
        return self._length

    def __iter__(self):
        if not self.enabled:
            return iter(self._items)
        return self._instrumented()

    def __next__(self) -> Any:
        if self._own_iterator is None:
            self._own_iterator = iter(self)
        return next(self._own_iterator)

    def get_current_iteration_id(self) -> Optional[str]:
        """Task id of the iteration in progress (None before the first or after the last)."""
        current = self._current
        return current["task_id"] if current is not None else None

    def end_iter(self, generated_value: Dict[str, Any]) -> None:
        """Attach ``generated`` values to the iteration in progress."""
        current = self._current
        if current is not None:
            existing = current.get("generated")
            current["generated"] = {**existing, **generated_value} if existing else generated_value

    def _instrumented(self):
        run = capture.state
        append = run.append
        base = run.base
        telemetry = run.telemetry
        workflow_id = self.workflow_id
        campaign_id = run.campaign_id
        loop_id = self._loop_id
        parent = self._parent_task_id
        activity_id = self._activity_id
        item_name = self.item_name
        subtype = self._subtype
        prefix, counter = _ids.prefix, _ids.counter
        self._started_at = started_at = time()
        index = 0
        record = None
        status = "FINISHED"
        try:
            for item in self._items:
                record = {
                    "type": "task",
                    "task_id": prefix + str(next(counter)),
                    "workflow_id": workflow_id,
                    "campaign_id": campaign_id,
                    "activity_id": activity_id,
                    "subtype": subtype,
                    "group_id": loop_id,
                    "parent_task_id": parent,
                    "started_at": started_at,
                    "used": {"i": index, item_name: item},
                    **base,
                }
                if telemetry is not None:
                    record["telemetry_at_start"] = telemetry.capture()
                self._current = record
                yield item
                started_at = time()
                record["ended_at"] = started_at
                record["status"] = "FINISHED"
                if telemetry is not None:
                    record["telemetry_at_end"] = telemetry.capture()
                append(record)
                record = None
                index += 1
        except GeneratorExit:
            # Left early: `break`, an exception in the loop body, or the iterator was dropped.
            # Python does not tell the generator which; the iteration is marked interrupted.
            raise
        except BaseException as error:  # the wrapped iterable itself failed
            status = "ERROR"
            if record is None:
                record = {"type": "task", "task_id": prefix + str(next(counter)), "workflow_id": workflow_id,
                          "campaign_id": campaign_id, "activity_id": activity_id, "subtype": subtype,
                          "group_id": loop_id, "parent_task_id": parent, "started_at": started_at,
                          "used": {"i": index}, **base}
            record["stderr"] = f"{type(error).__name__}: {error}"
            raise
        finally:
            ended_at = time()
            if record is not None:
                record["ended_at"] = ended_at
                record["status"] = status
                record.setdefault("custom_metadata", {})["interrupted"] = True
                append(record)
                index += 1
            self._current = None
            loop_record = {
                "type": "task",
                "task_id": loop_id,
                "workflow_id": workflow_id,
                "campaign_id": campaign_id,
                "activity_id": self.loop_name,
                "subtype": "loop",
                "parent_task_id": parent,
                "started_at": self._started_at,
                "ended_at": ended_at,
                "status": status,
                "used": {"items_length": self._length},
                "generated": {"iterations": index},
                **base,
            }
            append(loop_record)


class FlowceptLightweightLoop(FlowceptLoop):
    """The same records as FlowceptLoop with the least work per iteration.

    Telemetry is never captured per iteration (only the loop record could carry it), and the
    iteration records of a whole loop are handed to the buffer together.
    """

    _subtype = "iteration"

    def _instrumented(self):
        run = capture.state
        append = run.append
        base = run.base
        workflow_id = self.workflow_id
        campaign_id = run.campaign_id
        loop_id = self._loop_id
        parent = self._parent_task_id
        activity_id = self._activity_id
        item_name = self.item_name
        prefix, counter = _ids.prefix, _ids.counter
        self._started_at = started_at = time()
        index = 0
        record = None
        status = "FINISHED"
        try:
            for item in self._items:
                record = {
                    "type": "task", "task_id": prefix + str(next(counter)), "workflow_id": workflow_id,
                    "campaign_id": campaign_id, "activity_id": activity_id, "subtype": "iteration",
                    "group_id": loop_id, "parent_task_id": parent, "started_at": started_at,
                    "used": {"i": index, item_name: item}, **base,
                }
                self._current = record
                yield item
                started_at = time()
                record["ended_at"] = started_at
                record["status"] = "FINISHED"
                append(record)
                record = None
                index += 1
        except GeneratorExit:
            raise
        except BaseException as error:
            status = "ERROR"
            if record is not None:
                record["stderr"] = f"{type(error).__name__}: {error}"
            raise
        finally:
            ended_at = time()
            if record is not None:
                record["ended_at"] = ended_at
                record["status"] = status
                record.setdefault("custom_metadata", {})["interrupted"] = True
                append(record)
                index += 1
            self._current = None
            append({
                "type": "task", "task_id": loop_id, "workflow_id": workflow_id, "campaign_id": campaign_id,
                "activity_id": self.loop_name, "subtype": "loop", "parent_task_id": parent,
                "started_at": self._started_at, "ended_at": ended_at, "status": status,
                "used": {"items_length": self._length}, "generated": {"iterations": index}, **base,
            })

