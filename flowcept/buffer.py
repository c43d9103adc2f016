"""The in-process buffer: per-workflow line lists and one flusher thread that never hurts its host.

Capture serialises a record at once (a snapshot of its values) and appends the JSON line to
the list of its workflow (``list.append`` is atomic under the GIL: no lock, no queue object,
no tuple per record). The flusher thread wakes on size or on ``flush_interval_s``, takes
what each list holds with one slice and one ``del`` (appends racing with it land after the
cut and wait for the next drain), joins the lines and hands each workflow's payload to the
transport: no per-record work at all on that side. ``flush()`` is also called by ``stop()``,
at interpreter exit, by multiprocessing's exit hooks in forked children, and by the
SIGTERM/SIGINT handlers (which then chain to the application's handler or behave as the
signal would); they all reach every list, so nothing captured is pending anywhere else.
Past ``max_pending`` queued records the capturing thread drains the lists itself, so memory
stays bounded and nothing is dropped. No method raises into user code: problems are counted
and logged.

Records of one workflow keep their capture order in its file (one list per workflow).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import orjson

from flowcept import serialization
from flowcept.serialization import _LINE_OPTIONS, _fallback
from flowcept.threads import HANDLED_SIGNALS, start_background

_orjson_dumps = orjson.dumps

logger = logging.getLogger(__name__)

# Records per write: one multi-megabyte join+write costs 3x more per record than ~1 MB ones
# (fresh pages for the joined buffer); measured on the 2-core VM.
_WRITE_BATCH = 4096
_INLINE_SLOW_S = 0.005  # a size-triggered flush slower than this goes back to the flusher thread

# The capture fast path leaves out OPT_NON_STR_KEYS (it makes every dict ~25% slower to
# serialise): a record with a non-string key fails there and takes the safe path
# (``serialization.dumps_line``), which writes it exactly as before.
FAST_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class RecordView:
    """The records of this run, kept in memory up to a cap, for ``get_buffer()``.

    Lazy: it keeps the payloads the flusher already joined for the transport (a reference,
    no copy, no object per record) and parses them only when ``get()`` is called. Filled by
    the flusher (never the capturing thread). Once a workflow passes the cap its view is
    marked incomplete and ``get_buffer()`` reads the workflow's files instead.
    """

    def __init__(self, cap: int):
        self.cap = cap
        self.size = 0
        self.by_workflow: Dict[Optional[str], List[Tuple[bytes, int]]] = {}
        self.overflowed: set = set()

    def add(self, workflow_id: Optional[str], lines: List[bytes]) -> None:
        """Keep ``lines`` (JSON lines, with or without their newline)."""
        if lines:
            self.add_payload(workflow_id, b"\n".join(line.rstrip(b"\n") for line in lines) + b"\n", len(lines))

    def add_payload(self, workflow_id: Optional[str], payload: bytes, count: int) -> None:
        """Keep ``payload``: ``count`` newline-terminated JSON lines."""
        if workflow_id in self.overflowed:
            return
        if self.size + count > self.cap:
            self.overflowed.add(workflow_id)
            self.size -= sum(n for _, n in self.by_workflow.pop(workflow_id, ()))
            return
        chunks = self.by_workflow.get(workflow_id)
        if chunks is None:
            self.by_workflow[workflow_id] = chunks = []
        chunks.append((payload, count))
        self.size += count

    def get(self, workflow_id: Optional[str]) -> Optional[List[dict]]:
        """The records of a workflow, or None when the view overflowed for it."""
        if workflow_id in self.overflowed:
            return None
        loads = orjson.loads
        out: List[dict] = []
        for payload, _ in list(self.by_workflow.get(workflow_id, ())):
            out.extend([loads(line) for line in payload.split(b"\n") if line])
        return out

    def forget(self, workflow_id: Optional[str]) -> None:
        self.size -= sum(n for _, n in self.by_workflow.pop(workflow_id, ()))
        self.overflowed.discard(workflow_id)


class Pipeline:
    """Process-wide buffer + flusher + transport. Use :func:`get_pipeline`."""

    def __init__(self, transport: Any, flush_interval_s: float = 0.5, flush_size: int = 2000,
                 max_pending: int = 200000, view_cap: int = 10000):
        self.transport = transport
        self.flush_interval_s = flush_interval_s
        self.flush_size = max(1, flush_size)
        self.max_pending = max(self.flush_size, max_pending)
        # workflow id -> its list of serialised lines. Capture appends (any thread); only the
        # holder of _drain_lock removes, from the front. Entries are never removed (a finished
        # workflow's list stays empty), so a list captured by a RunState stays the live one.
        self.lists: Dict[Optional[str], List[bytes]] = {}
        # Producers that keep captured records in a cheaper form than lines (a loop's
        # iterations as tuples): ``take()`` -> (workflow id, [(JSONL chunk, lines), ...]) turns
        # what they hold into JSONL; every drain calls it first, so flushes at stop, exit and
        # on signals reach them. Replaced, never mutated (the drain iterates it without a lock).
        # Their chunks wait in ``chunks`` (under _drain_lock) and go out before the lists.
        self.producers: Tuple[Any, ...] = ()
        self.chunks: Dict[Optional[str], List[Tuple[bytes, int]]] = {}
        self.view = RecordView(view_cap)
        self.workflow_records: Dict[Optional[str], int] = {}  # workflow records queued, per workflow
        self.records_serialized = 0
        self.flush_errors = 0
        self._drain_lock = threading.RLock()
        self.inline = False  # see ready()
        self.reset_inline()
        # Threads inside a drain or a producer's build (see _Critical), and a SIGTERM/SIGINT
        # that arrived meanwhile in such a thread (the main one), acted upon when it is done.
        self.critical_threads: set = set()
        self.deferred_signal: Optional[Tuple[int, Any]] = None
        self._lists_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.pid = os.getpid()
        self._start_thread()

    # -- hot path -----------------------------------------------------------------------------
    def lines_for(self, workflow_id: Optional[str]) -> List[bytes]:
        """The list the lines of ``workflow_id`` are appended to (created once, kept)."""
        lines = self.lists.get(workflow_id)
        if lines is None:
            with self._lists_lock:
                lines = self.lists.get(workflow_id)
                if lines is None:
                    lines = self.lists[workflow_id] = []
        return lines

    def append(self, record: dict) -> None:
        """Serialise one record and queue the line; called from any application thread.

        Serialising here, rather than in the flusher, snapshots the values at capture time and
        leaves only bytes in the lists: no dict outlives its task, so a long queue costs neither
        GC passes nor the ~1 KB a dict holds, and the flusher only joins and writes.
        """
        try:
            line = _orjson_dumps(record, default=_fallback, option=_LINE_OPTIONS)
        except Exception:
            line = serialization.dumps_line(record)
        else:
            if len(line) > serialization.max_value_bytes:
                line = serialization.dumps_line(record)
        self._queue(record.get("workflow_id"), line, record.get("type") == "workflow")

    def append_parts(self, record: dict, suffix: bytes, rest: dict, workflow_id: Optional[str]) -> None:
        """Queue ``record`` + ``rest`` as one line, serialising only ``record``.

        ``suffix`` is ``rest`` already serialised (see :func:`flowcept.capture.constant_suffix`):
        ``,"k":v,...}`` and a newline. The fields a run or a loop keeps constant (campaign id,
        placement, ...) are thus serialised once per run, not once per task. ``record``
        must be non-empty and share no key with ``rest``. The capture hot paths inline this
        (see :func:`splice_line`); this method is their slow path and the general entry.
        """
        self.append_line(workflow_id, splice_line(record, suffix, rest))

    def full(self, lines: List[bytes]) -> None:
        """A list reached a multiple of flush_size: wake the flusher, or drain here past max_pending.

        Capture calls this when ``len(lines) % flush_size == 0`` only: once per batch, not on
        every append until the flusher gets the GIL (Event.set() takes a lock, ~1 µs).
        """
        self.ready(len(lines))

    def ready(self, pending: int) -> None:
        """``pending`` records wait (a list or a producer reached its batch size): flush them.

        Past max_pending, here (back-pressure: bounded memory, nothing dropped). Otherwise here
        too while the transport says it may and its writes stay fast (a file in the page cache):
        the GIL makes the work cost the same CPU in either thread, but a batch handled here
        reuses this thread's memory, where the flusher's batches fault fresh pages in each time
        (~0.2 us a record on a VM). One slow flush (a congested filesystem) hands the size-
        triggered flushes back to the flusher for good, so the application never waits on I/O.
        """
        if pending >= self.max_pending:
            self.drain()
        elif self.inline and self._drain_lock.acquire(blocking=False):
            try:
                began = time.monotonic()
                self.drain()
                self._background()  # starts a data sync in its own thread past a few MiB: cheap here
                took = time.monotonic() - began
                if took > _INLINE_SLOW_S:
                    self.inline = False
                    logger.debug("a flush took %.1f ms: flushes left to the flusher thread", took * 1e3)
            finally:
                self._drain_lock.release()
        else:
            self._wake.set()

    def append_line(self, workflow_id: Optional[str], line: bytes) -> None:
        """Queue an already serialised JSON line (ending in a newline)."""
        self._queue(workflow_id, line, line.startswith(b'{"type":"workflow"'))

    def _queue(self, workflow_id: Optional[str], line: bytes, is_workflow: bool) -> None:
        if is_workflow:  # counted: the in-place merge at stop() needs exactly one (known_file)
            self.workflow_records[workflow_id] = self.workflow_records.get(workflow_id, 0) + 1
        lines = self.lists.get(workflow_id)
        if lines is None:
            lines = self.lines_for(workflow_id)
        lines.append(line)
        if not len(lines) % self.flush_size:
            self.full(lines)

    def known_file(self, workflow_id: Optional[str]) -> Optional[Tuple[str, int, int]]:
        """(path, bytes, lines) of the workflow's file, when this process wrote all of it; else None.

        Only with one workflow record queued (its start line): the in-place merge at stop()
        needs no other. Call after a drain.
        """
        written = getattr(self.transport, "written", None)
        if written is None or self.workflow_records.get(workflow_id) != 1:
            return None
        return written(workflow_id)

    def add_producer(self, producer: Any) -> None:
        """Have every drain collect ``producer``'s records (see ``producers``)."""
        with self._lists_lock:
            self.producers = self.producers + (producer,)

    def remove_producer(self, producer: Any) -> None:
        """Collect ``producer``'s last records and stop asking it."""
        with self._drain_lock, _Critical(self):
            self._collect(producer, into_list=True)
            with self._lists_lock:
                self.producers = tuple(p for p in self.producers if p is not producer)

    def _collect(self, producer: Any, into_list: bool = False) -> None:
        """Take what ``producer`` holds as JSONL chunks; caller holds _drain_lock.

        ``into_list``: as lines at the end of the workflow's list (a producer's last records,
        so that what its owner appends next follows them in the file).
        """
        try:
            workflow_id, chunks = producer.take()
        except Exception:  # never into the application; count and log
            self.flush_errors += 1
            logger.exception("flowcept could not collect the records of %r", producer)
            return
        if not chunks:
            return
        if into_list:
            lines = self.lines_for(workflow_id)
            for chunk, _ in chunks:
                lines.extend(chunk.splitlines(keepends=True))
        else:
            self.chunks.setdefault(workflow_id, []).extend(chunks)

    def pending(self) -> int:
        """Records captured and not yet handed to the transport."""
        return (sum(len(lines) for lines in list(self.lists.values()))
                + sum(len(producer) for producer in self.producers)
                + sum(count for chunks in list(self.chunks.values()) for _, count in chunks))

    # -- flusher ------------------------------------------------------------------------------
    def _start_thread(self) -> None:
        self._thread = start_background(threading.Thread(target=self._run, name="flowcept-flusher", daemon=True))

    def _run(self) -> None:
        wake, stopping = self._wake, self._stopping
        while not stopping.is_set():
            wake.wait(self.flush_interval_s)
            wake.clear()
            self.drain()
            self._background()

    def _background(self) -> None:
        """The transport's work between flushes (the file transport's periodic data sync)."""
        background = getattr(self.transport, "background", None)
        if background is not None:
            try:
                background()
            except Exception:
                logger.exception("flowcept transport background work failed")

    def reset_inline(self) -> None:
        """Let the capturing thread flush size-triggered batches again, if the transport allows it."""
        self.inline = bool(getattr(self.transport, "inline_sends", False))

    def build(self, producer: Any) -> int:
        """Have ``producer`` turn what it holds into JSONL now (``producer.build()``), signal-safe."""
        with _Critical(self):
            return producer.build()

    def drain(self) -> int:
        """Hand everything queued to the transport; returns the number of records moved."""
        moved = 0
        with self._drain_lock, _Critical(self):
            for producer in self.producers:
                self._collect(producer)
            # The lists first: a workflow's file starts with its start line (the in-place
            # merge at stop() needs it there), whatever a producer holds.
            for workflow_id, lines in list(self.lists.items()):
                count = len(lines)
                if not count:
                    continue
                taken = lines[:count]
                del lines[:count]  # appends that raced with us are past `count`: kept
                moved += count
                for start in range(0, count, _WRITE_BATCH):
                    batch = taken[start:start + _WRITE_BATCH] if count > _WRITE_BATCH else taken
                    self._send(workflow_id, batch)
            if self.chunks:
                chunks, self.chunks = self.chunks, {}
                for workflow_id, counted in chunks.items():
                    for chunk, count in counted:
                        moved += count
                        self._send_payload(workflow_id, chunk, count)
        return moved

    def _send(self, workflow_id: Optional[str], batch: List[bytes]) -> None:
        self._send_payload(workflow_id, b"".join(batch), len(batch))

    def _send_payload(self, workflow_id: Optional[str], payload: bytes, count: int) -> None:
        try:
            self.records_serialized += count
            self.transport.send(workflow_id, payload, count)
            self.view.add_payload(workflow_id, payload, count)
        except Exception:  # never into the application; count and log
            self.flush_errors += 1
            logger.exception("flowcept could not flush %d records", count)

    def flush(self, durable: bool = False) -> None:
        """Write everything queued now (called by stop(), at exit, on signals)."""
        try:
            self.drain()
            self.transport.flush(durable=durable)
        except Exception:
            logger.exception("flowcept flush failed")

    def close_workflow(self, workflow_id: Optional[str]) -> None:
        try:
            self.drain()
            self.transport.close_workflow(workflow_id)
        except Exception:
            logger.exception("flowcept could not close the files of workflow %s", workflow_id)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the flusher, write what is left, close the transport; idempotent."""
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(timeout)
        self.flush(durable=True)
        try:
            self.transport.close()
        except Exception:
            logger.exception("flowcept could not close its transport")

    def counters(self) -> Dict[str, int]:
        out = {"queued": self.pending(), "serialized": self.records_serialized,
               "flush_errors": self.flush_errors}
        for name in ("records_written", "records_failed", "records_dropped", "records_spilled",
                     "records_acked"):
            value = getattr(self.transport, name, None)
            if value is not None:
                out[name.replace("records_", "")] = value
        return out


def splice_line(record: dict, suffix: bytes, rest: dict) -> bytes:
    """``record`` + ``rest`` as one JSON line, serialising only ``record`` (``suffix`` is ``rest``'s JSON tail).

    A record the fast path cannot take (a value orjson refuses, a non-string key, an
    oversized value) goes the safe way, whole.
    """
    try:
        body = _orjson_dumps(record, default=_fallback, option=FAST_OPTIONS)
    except Exception:
        return serialization.dumps_line({**record, **rest})
    if len(body) > serialization.max_value_bytes:
        return serialization.dumps_line({**record, **rest})
    return body[:-1] + suffix


# -- the process-wide pipeline ------------------------------------------------------------------

_pipeline: Optional[Pipeline] = None
# The pipeline shutdown_pipeline() is closing: a signal arriving meanwhile (a multiprocessing
# pool's terminate() reaching a worker in its exit hook) must still flush it.
_closing: Optional[Pipeline] = None
_pipeline_lock = threading.Lock()
_factory: Optional[Callable[[], Pipeline]] = None


def set_pipeline_factory(factory: Callable[[], Pipeline]) -> None:
    """The controller tells the buffer how to build a pipeline from the current settings."""
    global _factory
    _factory = factory


def get_pipeline(create: bool = True) -> Optional[Pipeline]:
    """Return the pipeline of this process (a forked child gets its own), created on demand."""
    global _pipeline
    pipeline = _pipeline
    if pipeline is not None and pipeline.pid == os.getpid():
        return pipeline
    if not create:
        return None
    with _pipeline_lock:
        if _pipeline is None or _pipeline.pid != os.getpid():
            if _factory is None:
                raise RuntimeError("flowcept pipeline requested before Flowcept configured it")
            _pipeline = _factory()
            _install_exit_hooks()
        return _pipeline


def shutdown_pipeline() -> None:
    """Flush and close the pipeline of this process, if it has one (idempotent)."""
    global _pipeline, _closing
    with _pipeline_lock:
        pipeline = _pipeline
        mine = pipeline is not None and pipeline.pid == os.getpid()
        if mine:
            _closing = pipeline  # before _pipeline goes: a signal in between must still find it
        _pipeline = None
    if mine:
        try:
            pipeline.shutdown()
        finally:
            _closing = None


def _pipeline_to_flush() -> Optional[Pipeline]:
    """The pipeline a signal must flush: the current one, or the one shutdown_pipeline() is closing."""
    pipeline = get_pipeline(create=False)
    if pipeline is None:
        closing = _closing
        if closing is not None and closing.pid == os.getpid():
            return closing
    return pipeline


def flush_pipeline(durable: bool = False) -> None:
    """Write what this process has queued, if it has a pipeline."""
    pipeline = get_pipeline(create=False)
    if pipeline is not None:
        pipeline.flush(durable=durable)


def _after_fork_in_child() -> None:
    """A child must never write the parent's queued records nor use its descriptors or threads.

    The parent's pipeline is dropped (its lists cleared, its transport abandoned); capture is
    re-pointed at :func:`_append_in_child`, which builds this process's own pipeline (own file,
    own flusher, own exit hooks) on the child's first record, so a child that only execs pays
    nothing. The placement fields capture copies into every record get the child's pid.
    """
    global _pipeline, _exit_hooks_pid, _pipeline_lock, _closing
    _pipeline_lock = threading.Lock()  # another parent thread may have held it at fork time
    old = _pipeline
    _pipeline = None
    _closing = None
    _exit_hooks_pid = None
    _forget_signal_watchdog()
    _restore_previous_handlers()
    if old is not None:
        for lines in list(old.lists.values()):
            lines.clear()
        old.lists.clear()
        old.producers = ()
        old.chunks = {}
        abandon = getattr(old.transport, "abandon", None)
        if abandon is not None:
            try:
                abandon()
            except Exception:
                pass
    from flowcept import capture

    run = capture.state
    if run is capture.IDLE:
        return
    base = dict(run.base)
    if "pid" in base:
        base["pid"] = os.getpid()
    append = run.append
    if old is not None and getattr(append, "__self__", None) is old:
        append = _append_in_child
    capture.publish(capture.RunState(
        capturing=run.capturing, workflow_id=run.workflow_id, campaign_id=run.campaign_id,
        workflow_name=run.workflow_name, append=append, base=base, telemetry=run.telemetry,
        settings=run.settings))


def _append_in_child(record: dict) -> None:
    """First record of a forked child: create its pipeline, point capture at it, queue."""
    from flowcept import capture

    try:
        pipeline = get_pipeline()
    except Exception:
        logger.exception("flowcept could not start its pipeline in a forked child")
        return
    run = capture.state
    if run.append is _append_in_child:
        capture.publish(capture.RunState(
            capturing=run.capturing, workflow_id=run.workflow_id, campaign_id=run.campaign_id,
            workflow_name=run.workflow_name, append=pipeline.append, base=run.base,
            telemetry=run.telemetry, settings=run.settings))
    pipeline.append(record)


os.register_at_fork(after_in_child=_after_fork_in_child)

# -- exit and signals ------------------------------------------------------------------------------

_exit_hooks_pid: Optional[int] = None
_previous_handlers: Dict[int, Any] = {}
_HANDLED_SIGNALS = HANDLED_SIGNALS


def _install_exit_hooks() -> None:
    """Atexit always; multiprocessing's exit hook in children; signal handlers from the main thread."""
    global _exit_hooks_pid
    if _exit_hooks_pid == os.getpid():
        return
    _exit_hooks_pid = os.getpid()
    atexit.register(shutdown_pipeline)
    if "multiprocessing" in sys.modules:
        # A forked multiprocessing child leaves through os._exit(): atexit never runs there.
        try:
            from multiprocessing import util

            util.Finalize(None, shutdown_pipeline, exitpriority=100)
        except Exception:  # pragma: no cover
            pass
    install_signal_handlers()


def _restore_previous_handlers() -> None:
    """A forked child has nothing to flush until it captures: it gets the application's handlers back.

    With a Python-level handler installed, a signal that lands just before the main thread blocks
    in a C wait that nothing else ends (a multiprocessing pool worker at ``Pool.terminate()``,
    waiting for a queue lock the parent holds) is noted but never handled: the worker would hang
    and its parent with it. The default action ends it at once. The child's first record installs
    Flowcept's handlers again (``_install_exit_hooks``).
    """
    for signum, previous in list(_previous_handlers.items()):
        try:
            if previous is not None and signal.getsignal(signum) is _on_signal:
                signal.signal(signum, previous)
        except (ValueError, OSError, TypeError):  # not the main thread, or an invalid handler
            pass


def install_signal_handlers() -> None:
    """Flush on SIGTERM/SIGINT, then chain to what the application installed."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _HANDLED_SIGNALS:
        try:
            current = signal.getsignal(signum)
            if current is _on_signal:
                continue
            _previous_handlers[signum] = current
            signal.signal(signum, _on_signal)
        except (ValueError, OSError):  # not the main interpreter/thread
            pass
    _start_signal_watchdog()


# -- the signal watchdog ---------------------------------------------------------------------------
# CPython's C-level handler only notes a signal; the Python handler runs when the main thread next
# executes bytecode. A signal that lands just before the main thread blocks in a C wait that only
# a signal delivered to it ends (sem_wait in a multiprocessing lock: a pool worker at
# Pool.terminate(), waiting for a queue lock its parent holds) is noted and never handled: the
# process would hang instead of flushing and ending. The C handler also writes the signal number
# to the wakeup fd; a watchdog thread reading it re-sends the signal to the main thread until the
# Python handler has run, which interrupts the wait (EINTR) and lets the handler run.

_handler_ran = threading.Event()
_watchdog: Optional[Tuple[int, int, int]] = None  # (pid, read fd, write fd) of this process's watchdog
_NUDGES = 5


def _start_signal_watchdog() -> None:
    """Main thread: have the wakeup fd written to a pipe a watchdog thread reads (if nothing else uses it)."""
    global _watchdog
    if _watchdog is not None and _watchdog[0] == os.getpid():
        return
    try:
        read_fd, write_fd = os.pipe()
    except OSError:
        return
    try:
        os.set_blocking(write_fd, False)
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        if previous != -1:  # the application's (an asyncio loop's): it keeps it, no watchdog
            signal.set_wakeup_fd(previous)
            raise ValueError("the wakeup fd is in use")
    except (ValueError, OSError):
        os.close(read_fd)
        os.close(write_fd)
        return
    _watchdog = (os.getpid(), read_fd, write_fd)
    start_background(threading.Thread(target=_watch_signals, args=(read_fd,), name="flowcept-signals",
                                       daemon=True))


def _watch_signals(read_fd: int) -> None:
    main = threading.main_thread().ident
    echoes: Dict[int, int] = {}  # signal -> bytes our own re-sends will still write to the pipe
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        for signum in _HANDLED_SIGNALS:
            count = data.count(signum)
            echo = min(count, echoes.get(signum, 0))
            if echo:
                echoes[signum] -= echo  # a re-send of ours, not a new signal
                count -= echo
            if not count:
                continue
            try:
                if signal.getsignal(signum) is not _on_signal:
                    continue
            except (ValueError, OSError):
                continue
            echoes[signum] = echoes.get(signum, 0) + _resend_until_handled(main, signum)


def _resend_until_handled(main: Optional[int], signum: int) -> int:
    """Re-send ``signum`` to the main thread until the Python handler has run; returns how many were sent.

    A bounded number: a main thread busy in a long C call that retries on EINTR gets the handler
    when the call returns. Re-sends before the handler runs coalesce into that one run.
    """
    sent = 0
    for attempt in range(_NUDGES):
        if _handler_ran.wait(0.05 * 2 ** attempt) or main is None:  # 50 ms, 100 ms, ... 0.8 s
            break
        try:
            signal.pthread_kill(main, signum)  # interrupts the main thread's wait
        except (OSError, ValueError):
            break
        sent += 1
    _handler_ran.clear()
    return sent


def _forget_signal_watchdog() -> None:
    """Forked child: the wakeup pipe is the parent's; drop it (a new one comes with the child's handlers)."""
    global _watchdog, _handler_ran
    _handler_ran = threading.Event()  # the parent's may have been locked by its watchdog at fork time
    if _watchdog is None:
        return
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    for fd in _watchdog[1:]:
        try:
            os.close(fd)
        except OSError:
            pass
    _watchdog = None


class _Critical:
    """A drain or build in progress in this thread: a signal handler must not flush inside it.

    Python runs signal handlers in the main thread between any two bytecodes, also in the
    middle of a flush the main thread is doing itself (stop(), back-pressure, the inline
    flushes of ``Pipeline.ready``). Flushing again from there could take records the
    interrupted flush had taken but not written yet, then end the process: lost. So the
    handler only notes the signal (``Pipeline.deferred_signal``) and the outermost critical
    section acts on it as it ends, a few milliseconds later at most.
    """

    __slots__ = ("pipeline", "outer")

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.outer = False

    def __enter__(self) -> None:
        me = threading.get_ident()
        threads = self.pipeline.critical_threads
        if me not in threads:
            threads.add(me)
            self.outer = True

    def __exit__(self, *exc: Any) -> None:
        if not self.outer:
            return
        pipeline = self.pipeline
        pipeline.critical_threads.discard(threading.get_ident())
        if pipeline.deferred_signal is not None and threading.current_thread() is threading.main_thread():
            deferred, pipeline.deferred_signal = pipeline.deferred_signal, None
            _on_signal(*deferred)


def _on_signal(signum: int, frame: Any) -> None:
    _handler_ran.set()  # the watchdog stops re-sending
    pipeline = _pipeline_to_flush()
    if pipeline is not None and threading.get_ident() in pipeline.critical_threads:
        pipeline.deferred_signal = (signum, frame)  # acted upon when that flush ends (_Critical)
        return
    if pipeline is not None:
        pipeline.flush(durable=True)
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    # Behave as the signal would have without us: default action, same signal.
    if pipeline is not None:
        try:
            pipeline.transport.close()
        except Exception:
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
