"""Loops whose iterations are captured as tasks, including the one a ``break`` or error cut short.

Each iteration is a ``type: "task"`` record with ``activity_id`` ``<loop_name>_iteration``,
``subtype`` ``iteration``, ``used`` ``{"i": index, <item_name>: item}`` and ``group_id`` set to
the loop's own task id. The loop itself is recorded once, when it ends, as a task with
``activity_id`` ``<loop_name>`` and ``subtype`` ``loop`` (``generated.iterations`` tells how many
ran). Iteration is a generator, so when a ``for`` loop is left by ``break`` or an exception the
generator is closed at once and the interrupted iteration is still recorded, with
``custom_metadata.interrupted: true``. Its status (and the loop record's) is ``ERROR`` when an
exception left the loop body or the wrapped iterable raised, ``FINISHED`` when the loop was
left by ``break``/``return``, a consumer stopped pulling (``zip``, ``islice``, ``in``, ``any``,
``next(...)``) or the iterator was closed (normal control flow; see :func:`_closed_by_exception`
for how the two are told apart). A loop still open when its workflow stops (advanced by hand
with ``next()``) records its iteration in progress and its loop record then, both marked
interrupted (:func:`close_open_loops`, called by ``Flowcept.stop()``). The reference (1.0.3)
sends no record at all for an interrupted iteration and marks every sent one FINISHED.

Per iteration only the task id, times and ``used`` are serialised; the fields all iterations
of a loop share are serialised once per loop and spliced in (``Pipeline.append_parts``, inlined).
When the item is a number, a bool or None (immutable: nothing to snapshot), an iteration is
kept as a tuple and the pipeline's drain turns a whole batch of them into lines at once
(:class:`_IterationBatch`: one orjson call per column, one format per line), byte for byte
the lines the per-iteration path writes. Every drain collects them, so stop(), exit and
the signal handlers' flushes reach them as they reach everything else.
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from collections.abc import Iterator
from time import time
from typing import Any, Dict, List, Optional, Sized, Tuple, Union

import orjson

from flowcept import capture
from flowcept.buffer import splice_line
from flowcept.capture import get_parent
from flowcept.ids import id_factory

_ids = id_factory()
_dumps = orjson.dumps

__all__ = ["FlowceptLoop", "FlowceptLightweightLoop", "close_open_loops"]

logger = logging.getLogger(__name__)


class FlowceptLoop:
    """Wrap an iterable (sized, an int, or an iterator with ``items_length``) and capture each step."""

    _subtype = "iteration"
    _per_iteration_telemetry = True

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
        self._parent_task_id = parent_task_id or get_parent()
        self._loop_id = _ids.prefix + str(next(_ids.counter))
        # The iteration in progress: its record (dict), or on the batched path its id number.
        self._current: Any = None
        self._generated: Optional[Dict[str, Any]] = None  # end_iter() values on the batched path
        self._prefix = _ids.prefix
        self._next_index = 0
        self._own_iterator: Optional[Iterator] = None
        self._started_at: Optional[float] = None
        self._generator_ref: Any = None

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("this FlowceptLoop wraps an iterator of unknown length (pass items_length)")
        return self._length

    def __iter__(self):
        if not self.enabled:
            return iter(self._items)
        owner: List[Any] = [None]  # the thread that runs the generator, set when it starts
        generator = self._instrumented(owner)
        self._generator_ref = ref = weakref.ref(generator, _forget)
        _open[ref] = (self.workflow_id, owner)
        return generator

    def __next__(self) -> Any:
        if self._own_iterator is None:
            self._own_iterator = iter(self)
        return next(self._own_iterator)

    def get_current_iteration_id(self) -> Optional[str]:
        """Task id of the iteration in progress (None before the first or after the last)."""
        current = self._current
        if current is None:
            return None
        if type(current) is int:
            return self._prefix + str(current)
        return current["task_id"]

    def end_iter(self, generated_value: Dict[str, Any]) -> None:
        """Attach ``generated`` values to the iteration in progress."""
        current = self._current
        if current is None:
            return
        if type(current) is int:
            existing = self._generated
            self._generated = {**existing, **generated_value} if existing else generated_value
            return
        existing = current.get("generated")
        current["generated"] = {**existing, **generated_value} if existing else generated_value

    def _instrumented(self, owner: List[Any]):
        owner[0] = threading.get_ident()
        pulled_at = _pull_site()  # who asked for the first item: see _closed_by_exception
        run = capture.state
        append = run.append
        pipeline = run.pipeline
        lines = pipeline.lines_for(self.workflow_id) if pipeline is not None else None
        flush_size = run.flush_size
        telemetry = run.telemetry if self._per_iteration_telemetry else None
        workflow_id = self.workflow_id
        loop_id = self._loop_id
        parent = self._parent_task_id
        item_name = self.item_name
        # What every iteration of this loop shares is serialised once: only the task id, the
        # times and ``used`` are serialised per iteration (Pipeline.append_parts).
        rest = {"activity_id": self._activity_id, "subtype": self._subtype, "group_id": loop_id,
                "parent_task_id": parent, "status": "FINISHED", **run.rest}
        if parent is None:  # None fields are left out of records
            del rest["parent_task_id"]
        suffix = capture.constant_suffix(rest)
        prefix, counter = _ids.prefix, _ids.counter
        self._started_at = started_at = time()
        items: Any = None
        detached = False
        index = 0
        record = None
        batch = None
        current_n = None  # on the batched path: the id number of the iteration in progress
        status = "FINISHED"
        error_text = None
        flushing = False
        try:
            items = iter(self._items)  # explicit: after a detach (close_open_loops) the rest is passed through
            if telemetry is None and lines is not None and type(item_name) is str and item_name != "i":
                # The common case: numbers, bools and None kept as tuples, turned into lines in
                # bulk by the pipeline's drain; other items serialised at once (a snapshot).
                self._prefix = prefix
                batch = _IterationBatch(workflow_id, prefix, item_name, suffix, rest)
                entries = batch.entries
                put = entries.append
                pipeline.add_producer(batch)
                for item in items:
                    current_n = n = next(counter)
                    self._current = n
                    yield item
                    ended_at = time()  # the end of this iteration is the start of the next
                    generated = self._generated
                    if generated is None and type(item) in _SCALARS:
                        put((n, started_at, index, item, ended_at))  # the template's order
                    else:
                        self._generated = None
                        done = {"type": "task", "task_id": prefix + str(n), "workflow_id": workflow_id,
                                "started_at": started_at, "used": {"i": index, item_name: item},
                                "ended_at": ended_at}
                        if generated is not None:
                            done["generated"] = generated
                        put(splice_line(done, suffix, rest))
                    started_at = ended_at
                    current_n = None  # recorded: a signal acted upon in the flush below must not record it again
                    index += 1
                    if not len(entries) % _CHUNK:
                        # Turned into JSONL here, not in the flusher: the GIL makes it the same
                        # CPU either way, and here its memory is this thread's, reused chunk
                        # after chunk (a buffer the flusher thread allocates is fresh pages).
                        flushing = True
                        waiting = pipeline.build(batch)
                        if waiting >= flush_size:
                            pipeline.ready(waiting)
                        flushing = False
                return
            for item in items:
                # type, task_id, workflow_id lead every task line (consolidation relies on it).
                record = {"type": "task", "task_id": prefix + str(next(counter)), "workflow_id": workflow_id,
                          "started_at": started_at, "used": {"i": index, item_name: item}}
                if telemetry is not None:
                    record["telemetry_at_start"] = telemetry.capture()
                self._current = record
                yield item
                started_at = time()  # the end of this iteration is the start of the next
                record["ended_at"] = started_at
                if telemetry is not None:
                    record["telemetry_at_end"] = telemetry.capture()
                if lines is not None:
                    lines.append(splice_line(record, suffix, rest))
                else:
                    append({**record, **rest})
                record = None
                index += 1
                if lines is not None and not len(lines) % flush_size:
                    flushing = True
                    pipeline.full(lines)
                    flushing = False
        except GeneratorExit:
            # Left early: `break`/`return`, a consumer that stopped pulling (zip, islice, `in`,
            # any, ...), or the iterator was closed or dropped (FINISHED); or an exception in
            # the loop body (ERROR).
            if (record is not None or current_n is not None) and _closed_by_exception(self._generator_ref,
                                                                                       pulled_at):
                status = "ERROR"
                error_text = "the loop body raised an exception"
            raise
        except _Detach:  # the loop's workflow stopped while it was open (close_open_loops)
            detached = True
        except BaseException as error:  # the wrapped iterable failed, or a signal acted upon in a flush
            status = "ERROR"
            error_text = f"{type(error).__name__}: {error}"
            if record is None and not flushing:  # the failed next() of the iterable: an iteration of its own
                record = {"type": "task", "task_id": prefix + str(next(counter)), "workflow_id": workflow_id,
                          "started_at": started_at, "used": {"i": index}}
            raise
        finally:
            ended_at = time()
            if batch is not None:
                pipeline.remove_producer(batch)  # its last iterations, before the records below
                if current_n is not None:
                    record = {"type": "task", "task_id": prefix + str(current_n), "workflow_id": workflow_id,
                              "started_at": started_at, "used": {"i": index, item_name: item}}
                    if self._generated is not None:
                        record["generated"] = self._generated
                self._generated = None
            if record is not None:
                record["ended_at"] = ended_at
                full = {**record, **rest}
                full["status"] = status
                if error_text is not None:
                    full["stderr"] = error_text
                metadata = full.get("custom_metadata")
                full["custom_metadata"] = {**metadata, "interrupted": True} if metadata else {"interrupted": True}
                append(full)
                index += 1
            self._current = None
            loop_record = {
                "type": "task", "task_id": loop_id, "workflow_id": workflow_id,
                "activity_id": self.loop_name, "subtype": "loop", "parent_task_id": parent,
                "started_at": self._started_at, "ended_at": ended_at, "status": status,
                "used": {"items_length": self._length}, "generated": {"iterations": index}, **run.rest,
            }
            if parent is None:
                del loop_record["parent_task_id"]
            if detached:
                loop_record["custom_metadata"] = {"interrupted": True}
            append(loop_record)
        if detached:
            # What throw() returns to close_open_loops; then the rest of the items, unrecorded
            # (the workflow has ended), so the application's iteration goes on unchanged.
            yield None
            yield from items


_SCALARS = frozenset({int, float, bool, type(None)})


class _IterationBatch:
    """A loop's finished iterations as tuples, until the pipeline's drain ``take()``s them.

    Entries are ``(id number, started_at, index, item, ended_at)`` (the order of the fields
    in the line) with an immutable scalar item, or a line already serialised (an iteration
    the tuple form cannot hold). The loop appends (atomic under the GIL) and every _CHUNK
    iterations ``build()``s a chunk itself; ``take()`` runs under the pipeline's drain lock and
    returns ``(workflow id, [(JSONL chunk, lines), ...])``: the chunks built, then the rest.
    A run of tuples becomes one chunk with one orjson call per column and one join: the
    bytes the per-iteration path gives (same fields, order and number formatting).
    """

    __slots__ = ("workflow_id", "entries", "built", "built_lines", "lock", "constants", "prefix", "item_name",
                 "suffix", "rest")

    def __init__(self, workflow_id: Optional[str], prefix: str, item_name: str, suffix: bytes, rest: dict):
        self.workflow_id = workflow_id
        self.entries: list = []
        self.built: List[Tuple[bytes, int]] = []  # chunks build() made, waiting for take()
        self.built_lines = 0
        self.lock = threading.Lock()  # build() (the loop's thread) against take() (a drain's)
        self.prefix = prefix
        self.item_name = item_name
        self.suffix = suffix
        self.rest = rest
        # What surrounds the five values of a line (task id number, started_at, i, item, ended_at).
        self.constants = [
            b'{"type":"task","task_id":' + orjson.dumps(prefix)[:-1],
            b'","workflow_id":' + orjson.dumps(workflow_id) + b',"started_at":',
            b',"used":{"i":',
            b"," + orjson.dumps(item_name) + b":",
            b'},"ended_at":',
            suffix,
        ]

    def __len__(self) -> int:
        return len(self.entries) + self.built_lines

    def build(self) -> int:
        """Turn the iterations held so far into a JSONL chunk; returns the lines waiting in chunks."""
        with self.lock:
            chunks = self._convert(self._take_entries())
            self.built.extend(chunks)
            self.built_lines += sum(count for _, count in chunks)
            return self.built_lines

    def take(self) -> Tuple[Optional[str], List[Tuple[bytes, int]]]:
        with self.lock:
            taken = self._take_entries()
            built, self.built, self.built_lines = self.built, [], 0
        return self.workflow_id, built + self._convert(taken)

    def _take_entries(self) -> list:
        entries = self.entries
        count = len(entries)
        taken = entries[:count]
        del entries[:count]  # iterations appended meanwhile are past `count`: kept
        return taken

    def _convert(self, taken: list) -> List[Tuple[bytes, int]]:
        if not taken:
            return []
        if bytes not in set(map(type, taken)):
            return self._chunks(taken)
        out: List[Tuple[bytes, int]] = []
        run: list = []
        for entry in taken:
            if type(entry) is bytes:
                if run:
                    out.extend(self._chunks(run))
                    run = []
                out.append((entry, 1))
            else:
                run.append(entry)
        if run:
            out.extend(self._chunks(run))
        return out

    def _chunks(self, tuples: list) -> List[Tuple[bytes, int]]:
        return [self._chunk(tuples[start:start + _CHUNK]) for start in range(0, len(tuples), _CHUNK)]

    def _chunk(self, tuples: list) -> Tuple[bytes, int]:
        count = len(tuples)
        try:
            columns = [_dumps(column)[1:-1].split(b",") for column in zip(*tuples)]
            if any(len(column) != count for column in columns):
                raise ValueError("a column does not split into one value per iteration")
        except Exception:  # an int past 64 bits, ...: the per-iteration way
            return b"".join([self._line(entry) for entry in tuples]), count
        # The constant parts and the columns' values interleaved by slice assignment, then
        # one join: no format call and no bytes object per line.
        constants = self.constants
        width = len(constants) + len(columns)
        pieces: list = [None] * (width * count)
        for j, part in enumerate(constants):
            pieces[2 * j::width] = [part] * count
        for j, column in enumerate(columns):
            pieces[2 * j + 1::width] = column
        return b"".join(pieces), count

    def _line(self, entry: tuple) -> bytes:
        n, started_at, index, item, ended_at = entry
        return splice_line({"type": "task", "task_id": self.prefix + str(n), "workflow_id": self.workflow_id,
                            "started_at": started_at, "used": {"i": index, self.item_name: item},
                            "ended_at": ended_at}, self.suffix, self.rest)


_CHUNK = 512  # iterations per chunk: ~230 KB joined; 4096 (1.8 MB) measured ~10% slower per iteration


def _pull_site() -> Optional[Tuple[int, Any, int]]:
    """Where the generator's first item was asked for: (frame id, code, instruction offset).

    Called once per loop from the generator's first step (0: here, 1: the generator, 2: the
    frame that pulled: a ``for`` statement's, or the one calling zip/islice/any/next/...). The
    frame itself is not kept (it holds the application's locals).
    """
    try:
        frame = sys._getframe(2)
    except ValueError:  # pragma: no cover - pulled from C with no Python frame
        return None
    return id(frame), frame.f_code, frame.f_lasti


def _closed_by_exception(generator_ref: Any, pulled_at: Optional[Tuple[int, Any, int]]) -> bool:
    """Whether the loop's generator is being closed because an exception left the loop body.

    Python does not tell a generator why it is closed, and the exception in flight is out of
    reach: the interpreter stashes it away before it finalises a dropped generator. So this
    asks who dropped the generator, and where:

    - a generator closed explicitly (``close()``) is still referenced (its weak reference
      lives): not an exception;
    - dropped by the frame that pulled the first item, at the very instruction that pulled it:
      a consumer that stopped pulling (``zip``/``islice`` exhausted, ``in`` found, ``any``,
      ``next(...)``, unpacking): not an exception;
    - dropped by anything other than a ``for`` statement that iterates it (a variable rebound,
      a frame that returned, a consumer generator closed, an object freed): a reference
      released, not an exception;
    - dropped by the frame whose ``for`` statement iterates it (directly or through a C
      consumer such as zip): that frame holds it on its stack until the ``for`` block is left,
      so it drops it either by leaving the block (``break``/``return``: a pop), by being
      closed at a ``yield`` (a generator consumer closed: GeneratorExit), or by unwinding an
      exception raised at the instruction it stopped on. Only the last is an exception.

    A drop by that frame after its ``for`` statement is over (``del it``, an attribute or a
    container emptied) is a release too: apart from ``del``, told by the instruction, only a
    drop between the FOR_ITER and the end of the statement, or in exception-handling code
    (which Python 3.12+ places after the function's body), is an exception unwinding.
    Offsets are taken back to their instruction: a specialised FOR_ITER (3.12) reports its
    inline cache.

    Known blind spots (FINISHED where an exception did leave the body): an exception raised by
    the other iterable of a ``zip``; a comprehension's own frame (Python <= 3.11) or a
    generator expression that raised (the frame's traceback keeps the generator alive past
    the exception); a loop wrapped in a Python generator (a progress-bar wrapper: the wrapper
    is closed at its ``yield`` and cannot tell why); ``next(it)`` by hand before a ``for``
    over the same iterator (only the first pull is noted); a ``throw()`` of an exception other
    than GeneratorExit into a consumer generator (coroutines, whose cancellation is an
    exception, are ERROR); on Python 3.12 only, an attribute that held the iterator released
    right after a ``break`` (3.12 copies the code after the loop in front of its end).
    """
    if generator_ref is not None and generator_ref() is not None:
        return False  # explicit close(): not an exception
    if pulled_at is None:
        return False
    try:
        frame = sys._getframe(2)  # 0: here, 1: the generator, 2: the frame that dropped it
    except ValueError:
        return False  # dropped while a frame that returned is cleared
    pulled_id, pulled_code, pulled_lasti = pulled_at
    code = frame.f_code
    if id(frame) != pulled_id or code is not pulled_code:
        return False  # released by whatever else held it
    # An offset can point into an instruction's inline cache (Python 3.12 reports FOR_ITER_GEN's
    # pull there once specialised): both are taken back to the instruction they belong to.
    pulled = _instruction_at(code, pulled_lasti)
    lasti, name, _ = _instruction_at(code, frame.f_lasti)
    if lasti == pulled[0] or pulled[1] != "FOR_ITER":
        return False  # the consumer stopped where it pulls, or a variable of this frame was released
    if name in _LEAVES or name.startswith(_REBINDS) or name in _DELETES:
        return False
    if code.co_flags & _GENERATOR_FLAGS and name in _SUSPENSIONS:
        return False  # a consumer generator closed at its yield
    if name in _UNWINDING:
        return True  # exception handling code (Python 3.12+ moves it past the loop's end)
    # Past the for statement: an attribute or a container let it go. (Python 3.12+ may also copy
    # the code after a loop in front of its end for ``break``: such a release reads as an error.)
    return pulled[0] < lasti < (pulled[2] if isinstance(pulled[2], int) else len(code.co_code))


# Instructions at which a frame iterating the loop with ``for`` drops it without an exception:
# leaving the block (``break``/``return`` pop the iterator), rebinding a name that also held it
# (these cannot raise), and, in a generator frame, being closed where it is suspended.
_LEAVES = frozenset({"POP_TOP", "POP_ITER", "END_FOR", "NOP"})
_REBINDS = ("STORE_FAST", "STORE_DEREF", "STORE_GLOBAL", "STORE_NAME", "RETURN_")
_SUSPENSIONS = frozenset({"YIELD_VALUE", "YIELD_FROM", "RESUME", "SEND", "END_SEND", "CLEANUP_THROW",
                          "JUMP_BACKWARD_NO_INTERRUPT"})
_DELETES = frozenset({"DELETE_FAST", "DELETE_NAME", "DELETE_GLOBAL", "DELETE_DEREF"})  # ``del it``
_UNWINDING = frozenset({"RERAISE", "RAISE_VARARGS", "CLEANUP_THROW", "PUSH_EXC_INFO", "POP_EXCEPT",
                        "WITH_EXCEPT_START", "CHECK_EXC_MATCH", "CHECK_EG_MATCH"})
_GENERATOR_FLAGS = 0x20 | 0x200  # CO_GENERATOR | CO_ASYNC_GENERATOR (not coroutines: cancelled is an error)


def _instruction_at(code: Any, offset: int) -> Tuple[int, str, Any]:
    """(offset, name, argument value) of the instruction of ``code`` that ``offset`` falls in.

    For FOR_ITER the argument value is where the ``for`` statement exits to.
    """
    import dis

    found: Tuple[int, str, Any] = (offset, "", None)
    for instruction in dis.get_instructions(code):
        if instruction.offset > offset:
            break
        found = (instruction.offset, instruction.opname, instruction.argval)
    return found


class _Detach(BaseException):
    """Thrown into an open loop's generator at stop(): record what ran, then pass items through."""


# The loops' live generators (weak references) -> (workflow id, [id of the thread running it]).
_open: Dict[Any, Tuple[Optional[str], List[Any]]] = {}


def _forget(ref: Any) -> None:
    _open.pop(ref, None)


def close_open_loops(workflow_id: Optional[str]) -> int:
    """Record the loops of ``workflow_id`` still open in this thread; returns how many.

    For ``Flowcept.stop()``: a loop advanced by hand (``next(loop)``) or left suspended holds
    its iteration in progress and its loop record until it ends, which may be never. Each such
    loop records them now, as a ``break`` would (the iteration in progress and the loop record
    get ``custom_metadata.interrupted``), and from then on passes its items through unrecorded,
    so the application's iteration goes on unchanged. Loops running in other threads are left
    alone (resuming a generator another thread may be running would raise there): they record
    when they end. Never raises.
    """
    me = threading.get_ident()
    closed = 0
    for ref, (loop_workflow_id, owner) in list(_open.items()):
        generator = ref()
        if generator is None or loop_workflow_id != workflow_id or owner[0] != me:
            continue
        suspended = getattr(generator, "gi_suspended", None)  # Python 3.11+
        if suspended is None:
            frame = generator.gi_frame
            suspended = not generator.gi_running and frame is not None and frame.f_lasti >= 0
        if not suspended:
            continue  # running, finished, or not started (nothing recorded yet)
        _open.pop(ref, None)
        try:
            generator.throw(_Detach())
            closed += 1
        except BaseException:  # never into stop(); the loop's own finally already recorded what it could
            logger.exception("flowcept could not record the open loop %r", generator)
    return closed


class FlowceptLightweightLoop(FlowceptLoop):
    """The same records as FlowceptLoop with the least work per iteration.

    Telemetry is never captured per iteration (only the loop record could carry it).
    """

    _per_iteration_telemetry = False
