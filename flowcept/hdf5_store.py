"""The consolidated HDF5 file of one workflow: full records plus columns people filter on.

Layout (format 3, documented in ``docs/file-format.md``)::

    /                      attrs: format="flowcept", format_version, workflow_id, records
    /tasks/jsonl           uint8: the group's records as JSONL text (the lines of the JSONL output)
    /tasks/offset          int64, where each record's line starts in /tasks/jsonl
    /tasks/seq             int64, the record's position in the consolidated order
    /tasks/<column>        task_id, workflow_id, campaign_id, activity_id, status, hostname,
                           node_name, parent_task_id (fixed-length UTF-8 strings, "" when absent);
                           started_at, ended_at (float64, NaN when absent);
                           rank, local_rank, pid (int64, -1 when absent)
    /workflows/jsonl,offset,seq  the (merged) workflow record(s)
    /telemetry/jsonl,offset,seq  every telemetry record, plus node_name and timestamp columns
    /telemetry/nodes/<node>/timestamp and one float64 column per numeric field (dotted names),
                           gzip-compressed; /telemetry/nodes/<node>/gpus/<gpu>/... the same per GPU
    /other/jsonl,offset,seq      any other record (objects, untyped lines)

Everything is one-dimensional and chunked; datasets grow as blocks of rows arrive (one h5py
write per column per block of rows, never one per record), so memory stays flat whatever the
size of the workflow. Where the time goes, and what was done about it (~3.8 -> ~1.7 us/task):
a variable-length string per record costs HDF5 a heap object (~0.5 us), so the records are one
JSONL text per group (a memory copy) and the filter columns fixed-length strings; parsing the
columns is most of the rest, so it decodes only those fields of a whole block in one msgspec
call, and a large merge hands blocks to a helper process (:class:`_ColumnWorker`) that parses
them on a second core. The file is written to a temporary name and renamed. h5py, numpy and
msgspec are imported here only, never by ``import flowcept``.
"""

from __future__ import annotations

import collections
import fcntl
import gc
import logging
import math
import mmap
import operator
import os
import pickle
import select
import sys
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

import orjson

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: records as one JSONL text per group; 2: vlen record strings; 1: vlen filter columns too
CHUNK_ROWS = 16384  # rows per HDF5 chunk
BLOB_CHUNK = 1 << 20  # bytes per chunk of a group's JSONL text
WORKER_AFTER_BYTES = 16 << 20  # task text a merge passes before it starts the column worker
WORKER_TIMEOUT_S = 60.0  # a worker silent this long while it owes an answer is given up
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), not named by fcntl before Python 3.10
_PIPE_BYTES = 1 << 20  # the default pipe-max-size for an unprivileged user
_SLOT_BYTES = 2 << 20  # a block handed to the worker; a larger one is parsed here
WRITE_ROWS = 4 * CHUNK_ROWS  # rows per h5py write per column (~0.3 ms each): bounds the columns held
STRING_COLUMNS = ("task_id", "workflow_id", "campaign_id", "activity_id", "status", "hostname", "node_name",
                  "parent_task_id")
FLOAT_COLUMNS = ("started_at", "ended_at")
INT_COLUMNS = ("rank", "local_rank", "pid")
GROUPS = ("tasks", "workflows", "telemetry", "other")
_TASK_FIELDS = (*STRING_COLUMNS, *FLOAT_COLUMNS, *INT_COLUMNS)
_GPU_KEYS = ("gpu", "gpus")
_GPU_ID_KEYS = ("gpu_uuid", "gpu_index", "gpu_id", "uuid", "index")
_MEMBER_ATTRS = {"gpus": ("gpu_uuid", "gpu_index", "gpu_name", "gpu_vendor"),  # several processes may sample one
                 "processes": ("pid", "rank")}
_NODE_ID_KEYS = ("node_name", "hostname")
_TIME_KEYS = ("timestamp", "utc_timestamp", "captured_at", "started_at")
_TASK_HEAD = b'{"type":"task"'
_KINDS = {"task": "tasks", "telemetry": "telemetry", "workflow": "workflows"}


def _h5py() -> Any:
    try:
        import h5py
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("HDF5 output needs h5py: pip install 'flowcept[hdf5]'") from error
    return h5py


def _kind(line: bytes, record: Optional[dict]) -> Tuple[str, Optional[dict]]:
    if record is None:
        if line.startswith(_TASK_HEAD):
            return "tasks", None
        if line.startswith(b'{"type":"telemetry"'):
            return "telemetry", None
        if line.startswith(b'{"type":"workflow"'):
            return "workflows", None
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            return "other", None  # kept as it is: the reader reports it
    kind = record.get("type") if isinstance(record, dict) else None
    return _KINDS.get(kind, "other"), record  # type: ignore[arg-type]


class _NoGC:
    """Pause the cyclic GC: parsing makes many short-lived dicts, and its passes would triple the time."""

    def __enter__(self) -> None:
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: Any) -> None:
        if self.was:
            gc.enable()


class _Appender:
    """Resizable 1-D datasets of one group, appended a block at a time."""

    def __init__(self, group: Any, np: Any, h5py: Any):
        self.group = group
        self.np = np
        self.h5py = h5py
        self.rows = 0

    def column(self, name: str, dtype: Any, fill: Any = None, compress: bool = False, rows: int = CHUNK_ROWS) -> Any:
        """The column ``name``, created if new; ``rows`` it will hold at first (sizes small chunks)."""
        if name in self.group:
            return self.group[name]
        kwargs: Dict[str, Any] = {}
        if fill is not None:
            kwargs["fillvalue"] = fill
        if compress:
            kwargs.update(compression="gzip", compression_opts=4, shuffle=True)
        return self.group.create_dataset(name, shape=(self.rows,), maxshape=(None,), dtype=dtype,
                                         chunks=(_chunk(self.rows + rows, CHUNK_ROWS, 64),), **kwargs)

    def append(self, name: str, values: Any, dtype: Any, fill: Any = None, compress: bool = False) -> None:
        dataset = self.column(name, dtype, fill, compress, len(values))
        end = self.rows + len(values)
        if dataset.shape[0] < end:
            dataset.resize((end,))
        dataset[self.rows:end] = values

    def append_bytes(self, name: str, data: Any) -> int:
        """Append raw bytes (uint8) to a byte-chunked column; returns where they start."""
        if name in self.group:
            dataset = self.group[name]
        else:
            # A group that starts with a small write (a workflow record, a daemon's first batch)
            # gets smaller chunks: HDF5 stores every chunk whole.
            dataset = self.group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=self.np.uint8,
                                                chunks=(_chunk(16 * len(data), BLOB_CHUNK, 64 * 1024),))
        start = dataset.shape[0]
        if len(data):
            dataset.resize((start + len(data),))
            dataset[start:] = data
        return start

    def append_text(self, name: str, values: Any) -> None:
        """Append a fixed-length bytes array (numpy ``S``), widening the column when needed."""
        width = max(8, values.dtype.itemsize)
        if name in self.group:
            dataset = self.group[name]
            if dataset.dtype.itemsize < width:
                dataset = self._widen(name, dataset, max(width, 2 * dataset.dtype.itemsize))
        else:
            dataset = self.column(name, self.h5py.string_dtype("utf-8", _round_width(width)), rows=len(values))
        end = self.rows + len(values)
        if dataset.shape[0] < end:
            dataset.resize((end,))
        # The dataset's own dtype carries the UTF-8 tag: plain ``S`` would be ASCII to HDF5.
        dataset[self.rows:end] = values.astype(dataset.dtype)

    def _widen(self, name: str, old: Any, width: int) -> Any:
        """Copy a string column into a wider one (rare: amortised by doubling)."""
        tmp = f"{name}.widen"
        new = self.group.create_dataset(tmp, shape=old.shape, maxshape=(None,),
                                        dtype=self.h5py.string_dtype("utf-8", _round_width(width)),
                                        chunks=old.chunks)
        for start in range(0, old.shape[0], WRITE_ROWS):
            new[start:start + WRITE_ROWS] = old[start:start + WRITE_ROWS].astype(new.dtype)
        del self.group[name]
        self.group.move(tmp, name)
        return self.group[name]


def _chunk(size: int, largest: int, smallest: int) -> int:
    """A chunk length: the power of two that holds ``size``, within [smallest, largest]."""
    return max(smallest, min(largest, 1 << max(0, size - 1).bit_length()))


def _round_width(width: int) -> int:
    return 1 << max(3, (width - 1).bit_length())


class _Ticket:
    """A block handed to the column worker; ``columns`` once its answer is read."""

    __slots__ = ("block", "columns")

    def __init__(self, block: bytes):
        self.block = block
        self.columns: Optional[Dict[str, Any]] = None


class _ColumnWorker:
    """A helper process that computes the task columns of blocks while this one writes.

    Parsing the filter columns is most of an HDF5 consolidation's CPU time; on two cores a
    second process doing it while this one merges and writes nearly halves the wall time. It is a
    plain ``python -m flowcept.hdf5_store --column-worker`` over two pipes (never
    multiprocessing, whose spawn re-runs the user's ``__main__`` and whose fork copies threads
    and MPI state). It starts only once a merge has passed ``start_after`` bytes of task text
    (a small consolidation never pays for it) and takes one block at a time; a block that finds
    it busy or not yet up is parsed here, so neither process waits for the other. If it dies or
    answers wrong, the blocks are parsed here and nothing is lost.
    """

    def __init__(self, start_after: int = WORKER_AFTER_BYTES, depth: int = 4):
        self.start_after = start_after
        self.depth = depth  # blocks handed over and not answered yet: one parsed, the rest queued
        self.seen = 0
        self.handed = 0  # blocks the worker parsed (or is parsing)
        self.proc: Optional[Any] = None
        self.ready = False
        self.broken = False
        self.inflight: Deque[_Ticket] = collections.deque()
        self.slots = depth + 1
        self.next_slot = 0
        self.shared: Optional[mmap.mmap] = None  # the blocks, in memory both processes map

    def __bool__(self) -> bool:
        return not self.broken

    def submit(self, block: bytes, rows: int) -> Optional[_Ticket]:
        """Hand ``block`` (``rows`` lines) to the worker if it is up and has room; None: parse it here."""
        self.seen += len(block)
        if self.proc is None:
            if self.seen >= self.start_after:
                self._start()
            return None
        try:
            if not self.ready and not self.wait_ready(0):
                return None
            while self.inflight and self._readable(0):
                self._collect()
            if len(self.inflight) >= self.depth:
                return None
            if len(block) > _SLOT_BYTES:
                return None
            slot = self.next_slot
            self.next_slot = (slot + 1) % self.slots  # depth + 1 slots: never one still in flight
            self.shared[slot * _SLOT_BYTES:slot * _SLOT_BYTES + len(block)] = block
            ticket = _Ticket(block)
            self.inflight.append(ticket)
            self._send(b"".join(n.to_bytes(8, "little") for n in (slot, len(block), rows)))
            self.handed += 1
            return ticket
        except (OSError, ValueError, EOFError) as error:
            self._fail(error)
            return None

    def wait_ready(self, timeout: float) -> bool:
        """Whether the worker is up, waiting at most ``timeout`` s for it to say so."""
        if not self.ready and self.proc is not None and not self.broken and self._readable(timeout):
            if self._read(1) != b"R":
                raise OSError("column worker did not start")
            self.ready = True
        return self.ready

    def _send(self, data: bytes) -> None:
        """Write all of ``data``, reading answers meanwhile: neither side waits on a full pipe."""
        view = memoryview(data)
        out, into = self.proc.stdout, self.proc.stdin
        while view:
            readable, writable, _ = select.select([out], [into], [], WORKER_TIMEOUT_S)
            if not readable and not writable:
                raise OSError(f"column worker stuck for {WORKER_TIMEOUT_S} s")
            if readable:
                self._collect()
            if writable:
                try:
                    view = view[os.write(into.fileno(), view):]
                except BlockingIOError:
                    pass

    def result(self, ticket: _Ticket, wait: bool) -> Optional[Dict[str, Any]]:
        """The columns of ``ticket``; None if not there yet (``wait`` False) or the worker failed."""
        try:
            while ticket.columns is None and ticket in self.inflight and not self.broken:
                if not wait and not self._readable(0):
                    break
                self._collect()
        except (OSError, ValueError, EOFError) as error:
            self._fail(error)
        return ticket.columns

    def _collect(self) -> None:
        """Read the next answer (the oldest block's)."""
        size = int.from_bytes(self._read(8), "little")
        answer = pickle.loads(self._read(size))
        if not isinstance(answer, dict):
            raise ValueError(f"column worker: {answer}")
        self.inflight.popleft().columns = answer

    def _start(self) -> None:
        import subprocess

        affinity = getattr(os, "sched_getaffinity", None)
        if affinity is not None and len(affinity(0)) < 2:  # a rank pinned to one core: no second one to use
            logger.info("HDF5 column worker not started: this process may run on one CPU only")
            self.broken = True
            return

        try:
            memory = os.memfd_create("flowcept-hdf5-blocks")
            try:
                os.ftruncate(memory, self.slots * _SLOT_BYTES)
                self.shared = mmap.mmap(memory, self.slots * _SLOT_BYTES)
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "flowcept.hdf5_store", "--column-worker", str(memory),
                     str(self.slots * _SLOT_BYTES)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, pass_fds=(memory,))
            finally:
                os.close(memory)
        except (OSError, AttributeError) as error:  # AttributeError: no memfd_create (not Linux)
            self._fail(error)
            return
        for pipe in (self.proc.stdin, self.proc.stdout):
            for size in (4 * _PIPE_BYTES, _PIPE_BYTES):  # over pipe-max-size only where allowed
                try:  # a block fits in the pipe: writing it does not wait for the worker to read
                    fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, size)
                    break
                except OSError:
                    pass
        os.set_blocking(self.proc.stdin.fileno(), False)

    def _readable(self, timeout: Optional[float]) -> bool:
        return bool(select.select([self.proc.stdout], [], [], timeout)[0])

    def _read(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            if not self._readable(WORKER_TIMEOUT_S):
                raise OSError(f"column worker silent for {WORKER_TIMEOUT_S} s")
            chunk = os.read(self.proc.stdout.fileno(), size - len(data))
            if not chunk:
                raise EOFError("column worker exited")
            data += chunk
        return bytes(data)

    def _fail(self, error: BaseException) -> None:
        logger.warning("HDF5 column worker given up (%s); parsing in this process", error)
        self.broken = True
        self.inflight.clear()  # their blocks are parsed here (the tickets keep them)
        self.close(patience_s=0.0)  # dead, stalled or confused: not waited for

    def close(self, patience_s: float = 5.0) -> None:
        """End the worker: asked first (``patience_s`` to exit), then killed."""
        proc, self.proc = self.proc, None
        shared, self.shared = self.shared, None
        if proc is None:
            if shared is not None:
                shared.close()
            return
        try:
            proc.stdin.close()  # end of input: the worker exits
        except OSError:
            pass
        try:  # its stdout ends when it exits (Popen.wait(timeout) would poll with sleeps)
            while (patience_s > 0 and select.select([proc.stdout], [], [], patience_s)[0]
                   and os.read(proc.stdout.fileno(), 1 << 16)):
                pass
        except OSError:
            pass
        if patience_s <= 0 and proc.poll() is None:
            proc.kill()
        if proc.poll() is None:
            try:
                proc.wait(timeout=1.0)
            except Exception:  # noqa: BLE001  (TimeoutExpired: it is killed)
                proc.kill()
                proc.wait()
        proc.stdout.close()
        if shared is not None:
            shared.close()


def _column_worker_main(memory: int, length: int) -> None:
    """The worker's loop: read (slot, size, rows) of a block in the shared memory, answer its columns."""
    import numpy as np

    source, sink = sys.stdin.buffer, sys.stdout.buffer
    shared = mmap.mmap(memory, length)
    _row_decoder()
    sink.write(b"R")
    sink.flush()
    while True:
        header = source.read(24)
        if len(header) != 24:
            return
        slot, size, rows = (int.from_bytes(header[i:i + 8], "little") for i in (0, 8, 16))
        block = shared[slot * _SLOT_BYTES:slot * _SLOT_BYTES + size]
        try:
            answer: Any = task_columns(np, block, rows=rows)
        except Exception as error:  # noqa: BLE001  (the writer parses this block itself)
            answer = repr(error)
        payload = pickle.dumps(answer, protocol=5)
        sink.write(len(payload).to_bytes(8, "little"))
        sink.write(payload)
        sink.flush()


class _GroupWriter:
    """One group: JSONL text written as blocks arrive; seqs, offsets, columns in whole chunks."""

    def __init__(self, name: str, parent: Any, np: Any, h5py: Any, worker: Optional[_ColumnWorker] = None):
        self.name = name
        self.parent = parent
        self.np = np
        self.h5py = h5py
        self.worker = worker
        self.appender: Optional[_Appender] = None
        self.rows = 0  # rows whose columns are buffered, not yet written
        # Per added block: [rows, its columns (None while the worker parses them), worker ticket,
        # where its lines start in /<group>/jsonl, its seqs].
        self.entries: List[List[Any]] = []
        self.series: Dict[Tuple[str, str, str], _Series] = {}

    def _app(self) -> _Appender:
        if self.appender is None:
            self.appender = _Appender(self.parent.require_group(self.name), self.np, self.h5py)
        return self.appender

    def add_block(self, seqs: Any, block: bytes, records: Optional[List[Optional[dict]]] = None,
                  starts: Any = None) -> None:
        """Add newline-terminated lines of this group, with their parsed records when known."""
        rows = len(seqs)
        if not rows:
            return
        np = self.np
        if starts is None:
            starts = line_starts(np, block)
        start = self._app().append_bytes("jsonl", np.frombuffer(block, dtype=np.uint8))
        entry: List[Any] = [rows, None, None, starts + start, seqs]
        if self.name == "tasks":
            ticket = self.worker.submit(block, rows) if records is None and self.worker else None
            if ticket is None:
                self._resolve(entry, task_columns(np, block, records, rows))
            else:
                entry[2] = ticket
        elif self.name == "telemetry":
            self._resolve(entry, self._telemetry(_parsed(block, records)))
        else:
            self._resolve(entry, {})
        self.entries.append(entry)
        self.rows += rows
        if self.rows >= WRITE_ROWS:
            self.flush(aligned=True)

    @staticmethod
    def _resolve(entry: List[Any], columns: Dict[str, Any]) -> None:
        entry[1] = {"offset": entry[3], "seq": entry[4], **columns}

    def _resolved_rows(self, wait: bool) -> int:
        """Rows at the head of the buffer whose columns are known (``wait``: all of them)."""
        rows = 0
        for entry in self.entries:
            if entry[1] is None:
                columns = self.worker.result(entry[2], wait) if self.worker else None
                if columns is None:
                    if self.worker and not wait:
                        break  # still being parsed there
                    columns = task_columns(self.np, entry[2].block, rows=entry[0])  # the worker failed
                self._resolve(entry, columns)
            rows += entry[0]
        return rows

    def flush(self, aligned: bool = False) -> None:
        """Write the buffered rows; ``aligned``: whole HDF5 chunks only, the rest stays buffered."""
        # Past 4 batches buffered behind a block the worker still owes, wait for it: a stalled
        # worker then meets its timeout (and is given up) instead of the whole file piling up here.
        ready = self._resolved_rows(wait=not aligned or self.rows >= 4 * WRITE_ROWS)
        rows = ready - ready % CHUNK_ROWS if aligned else ready
        if not rows:
            return
        np = self.np
        app = self._app()
        taken, count = 0, 0
        while count < rows:
            count += self.entries[taken][0]
            taken += 1
        blocks = [entry[1] for entry in self.entries[:taken]]
        columns = {name: np.concatenate([b[name] for b in blocks]) if taken > 1 else blocks[0][name]
                   for name in blocks[0]}
        for name, values in columns.items():
            part = values[:rows]
            if part.dtype.kind == "S":
                app.append_text(name, part)
            elif part.dtype.kind == "f":
                app.append(name, part, np.float64, fill=math.nan)
            else:
                app.append(name, part, np.int64, fill=-1)
        app.rows += rows
        self.rows -= rows
        rest = self.entries[taken:]
        if count > rows:  # the last block taken is split: its tail stays buffered
            rest.insert(0, [count - rows, {name: values[rows:] for name, values in columns.items()}, None, 0, None])
        self.entries = rest

    def _telemetry(self, records: List[dict]) -> Dict[str, Any]:
        np = self.np
        nodes = [_text(_first(r, _NODE_ID_KEYS)) for r in records]
        stamps = [_number(_first(r, _TIME_KEYS)) for r in records]
        for record, node, stamp in zip(records, nodes, stamps):
            flat: Dict[str, float] = {}
            gpus: Dict[str, Dict[str, float]] = {}
            for key, value in record.items():
                if key in _GPU_KEYS:
                    for gpu, sample in _gpu_items(value):
                        _flatten(sample, "", gpus.setdefault(gpu, {}))
                elif key not in _TIME_KEYS:
                    _flatten(value, key, flat)
            node = node or "unknown"
            kind = record.get("kind")
            if kind == "gpu":  # one flat sample of one GPU (daemon, per-process capture)
                gpu = _text(_first(record, _GPU_ID_KEYS)) or "unknown"
                self._series(node, "gpus", gpu, record).add(stamp, flat)
            elif kind == "process":
                self._series(node, "processes", _text(record.get("pid")) or "unknown", record).add(stamp, flat)
            else:
                self._series(node).add(stamp, flat)
            for gpu, sample in gpus.items():
                self._series(node, "gpus", gpu).add(stamp, sample)
        return {"node_name": _text_column(np, nodes), "timestamp": np.array(stamps, dtype=np.float64)}

    def _series(self, node: str, kind: str = "", member: str = "", record: Optional[dict] = None) -> _Series:
        """The series of a node, or of one of its GPUs or processes (``kind`` "gpus"/"processes")."""
        key = (node, kind, member)
        series = self.series.get(key)
        if series is None:
            nodes = self.parent.require_group("telemetry").require_group("nodes")
            group = nodes.require_group(_h5name(node))
            group.attrs["node_name"] = node
            if kind:
                group = group.require_group(kind).require_group(_h5name(member))
                group.attrs["gpu" if kind == "gpus" else "pid"] = member
                for name in _MEMBER_ATTRS[kind]:  # what identifies it, for a reader without the records
                    value = (record or {}).get(name)
                    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                        group.attrs[name] = value
            series = self.series[key] = _Series(_Appender(group, self.np, self.h5py))
        return series

    def close(self) -> int:
        self.flush()
        for series in self.series.values():
            series.flush()
        return self.appender.rows if self.appender is not None else 0


class _Series:
    """One node's (or one GPU's) numeric time series: a column per field, NaN where absent."""

    def __init__(self, appender: _Appender):
        self.appender = appender
        self.rows: List[Tuple[float, Dict[str, float]]] = []

    def add(self, stamp: float, values: Dict[str, float]) -> None:
        self.rows.append((stamp, values))
        if len(self.rows) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        app = self.appender
        np = app.np
        app.append("timestamp", np.array([s for s, _ in self.rows], dtype=np.float64), np.float64,
                   fill=math.nan, compress=True)
        names = dict.fromkeys(name for _, values in self.rows for name in values)
        for name in names:
            column = np.array([values.get(name, math.nan) for _, values in self.rows], dtype=np.float64)
            app.append(name, column, np.float64, fill=math.nan, compress=True)
        app.rows += len(self.rows)
        for name in app.group:  # columns this chunk lacked: extend them with NaN
            dataset = app.group[name]
            if isinstance(dataset, app.h5py.Dataset) and dataset.shape[0] < app.rows:
                dataset.resize((app.rows,))
        self.rows = []


def _columns(records: List[dict], names: Tuple[str, ...]) -> Dict[str, Sequence[Any]]:
    """Columns of ``records`` (None where a record lacks the field), without a call per value.

    The fields the first record has are fetched with one C-level itemgetter per record; a
    record lacking one of them sends that block down the per-field path.
    """
    if not records:
        return {name: () for name in names}
    present = tuple(name for name in names if name in records[0])
    columns: Dict[str, Sequence[Any]] = {name: (None,) * len(records) for name in names if name not in present}
    if present:
        try:
            rows = list(map(operator.itemgetter(*present), records))
            values = list(zip(*rows)) if len(present) > 1 else [tuple(rows)]
            columns.update(zip(present, values))
        except KeyError:
            for name in present:
                columns[name] = [record.get(name) for record in records]
    return columns


def _all_start_with(np: Any, block: bytes, starts: Any, head: bytes) -> bool:
    """Whether every line of ``block`` (starting at ``starts``) begins with ``head`` (numpy gathers)."""
    data = np.frombuffer(block, dtype=np.uint8)
    if not len(starts) or int(starts[-1]) + len(head) > len(data):
        return False
    expected = np.frombuffer(head, dtype=np.uint8)
    return bool((data[starts[:, None] + np.arange(len(head))] == expected).all())


def line_starts(np: Any, block: bytes) -> Any:
    """int64 offsets where each newline-terminated line of ``block`` starts (numpy, no loop)."""
    ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
    starts = np.empty(len(ends), dtype=np.int64)
    if len(ends):
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
    return starts


_ROW_DECODER: Any = None


def _row_decoder() -> Any:
    """A msgspec decoder of a JSON array of objects into just the task filter fields, or False.

    msgspec skips the fields it is not asked for without building them (``used``, ``generated``
    and the rest), which makes it ~2x faster than a full orjson parse followed by dict lookups.
    Any-typed fields: a value of an unexpected type is converted the way the orjson path does.
    """
    global _ROW_DECODER
    if _ROW_DECODER is None:
        try:
            import msgspec
        except ImportError:
            _ROW_DECODER = False
        else:
            row = msgspec.defstruct("TaskColumns", [(name, Any, None) for name in _TASK_FIELDS], gc=False)
            _ROW_DECODER = (msgspec.json.Decoder(List[row]), msgspec.DecodeError)  # type: ignore[valid-type]
    return _ROW_DECODER


def _decode_columns(block: bytes, rows: int) -> Optional[Dict[str, Sequence[Any]]]:
    """The task filter fields of the ``rows`` lines of ``block`` in one msgspec call; None if it cannot."""
    decoder = _row_decoder()
    if not decoder:
        return None
    decode, error = decoder
    try:  # JSON lines hold no raw newline: replacing them makes one JSON array
        decoded = decode.decode(b"[" + block[:-1].replace(b"\n", b",") + b"]")
    except error:
        return None  # a line that is not an object (or not JSON): the per-line path reports it
    if len(decoded) != rows:  # a line holding two objects ("{...},{...}"): per line, which reports it
        return None
    if not decoded:
        return {name: () for name in _TASK_FIELDS}
    return dict(zip(_TASK_FIELDS, zip(*map(operator.attrgetter(*_TASK_FIELDS), decoded))))


def _parsed(block: bytes, records: Optional[List[Optional[dict]]]) -> List[dict]:
    """Records of ``block``'s lines: the given ones, the others parsed (an unparsable line: {})."""
    lines = block.split(b"\n")[:-1]
    if records is None:
        records = [None] * len(lines)
    out = []
    with _NoGC():
        for line, record in zip(lines, records):
            if record is None:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    record = {}
            out.append(record if isinstance(record, dict) else {})
    return out


def task_columns(np: Any, block: bytes, records: Optional[List[Optional[dict]]] = None,
                 rows: Optional[int] = None) -> Dict[str, Any]:
    """The filter columns of newline-terminated task lines as numpy arrays (strings as UTF-8 ``S``)."""
    if rows is None:
        rows = block.count(b"\n")
    values = _decode_columns(block, rows) if records is None else None
    if values is None:
        values = _columns(_parsed(block, records), _TASK_FIELDS)
    columns: Dict[str, Any] = {name: _text_column(np, values[name]) for name in STRING_COLUMNS}
    for name in FLOAT_COLUMNS:
        column = values[name]
        try:  # the common case: every value a number or None (None -> NaN)
            columns[name] = np.array(column, dtype=np.float64)
        except (TypeError, ValueError):
            columns[name] = np.array([_number(v) for v in column], dtype=np.float64)
    for name in INT_COLUMNS:
        columns[name] = _int_column(np, values[name])
    return columns


def _int_column(np: Any, values: Sequence[Any]) -> Any:
    """int64 values, -1 for anything that is not an int (None, floats, text, booleans)."""
    if set(map(type, values)) == {int}:  # the common case, converted in C
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            pass
    return np.array([v if type(v) is int and -2**63 <= v < 2**63 else -1 for v in values], dtype=np.int64)


def _text_column(np: Any, values: Sequence[Any]) -> Any:
    """A numpy ``S`` array of UTF-8 text ("" for None); numpy encodes ASCII text in C."""
    if not len(values):
        return np.array([], dtype="S1")
    value = values[0]
    if (value is None or type(value) is str) and values.count(value) == len(values):
        # common (one host, one activity...): no conversion per value
        if value is None:
            return np.full(len(values), b"", dtype="S1")
        encoded = value.encode("utf-8", "surrogatepass")
        return np.full(len(values), encoded, dtype=f"S{max(1, len(encoded))}")
    try:
        array = np.array(values, dtype="S")  # None becomes b"None": looked at only if that text appears
        if not (array == b"None").any():
            return array
        return np.array(["" if v is None else v for v in values], dtype="S")
    except (UnicodeEncodeError, TypeError, ValueError):
        return np.array([_text(v).encode("utf-8", "surrogatepass") for v in values], dtype="S")


def _first(record: dict, keys: Tuple[str, ...]) -> Any:
    for key in keys:
        value = record.get(key)
        if value is not None:
            return value
    return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _h5name(text: str) -> str:
    return text.replace("/", "_") or "_"


def _gpu_items(value: Any) -> Iterable[Tuple[str, Any]]:
    if isinstance(value, dict):
        return ((str(k), v) for k, v in value.items())
    if isinstance(value, list):
        return ((str(v.get("index", v.get("id", i))) if isinstance(v, dict) else str(i), v)
                for i, v in enumerate(value))
    return ()


def _flatten(value: Any, prefix: str, out: Dict[str, float]) -> None:
    if isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, (int, float)):
        out[prefix] = float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)


class Hdf5Writer:
    """Streams records into ``path`` (through a temporary file renamed at :meth:`close`).

    Rows are buffered per group and written WRITE_ROWS at a time, so memory stays bounded
    whatever the number of records. Used by consolidation and by the daemon's HDF5 sink.
    """

    def __init__(self, path: str, workflow_id: Optional[str] = None, parse_worker: bool = False,
                 worker_after: int = WORKER_AFTER_BYTES):
        self.h5py = _h5py()
        import numpy as np

        self.np = np
        self.path = path
        self.workflow_id = workflow_id
        self.tmp = f"{path}.{os.getpid()}.tmp"
        self.count = 0
        self.worker = _ColumnWorker(worker_after) if parse_worker else None
        self.handle = self.h5py.File(self.tmp, "w")
        self.writers = {name: _GroupWriter(name, self.handle, np, self.h5py, self.worker if name == "tasks" else None)
                        for name in GROUPS}

    def add_block(self, block: bytes, count: int = -1, parsed: Optional[Sequence[Optional[dict]]] = None) -> None:
        """Add newline-terminated JSONL lines (with their parsed records when known)."""
        if type(block) is not bytes:
            block = bytes(block)
        if parsed is None and block.startswith(_TASK_HEAD) and block.endswith(b"\n"):
            starts = line_starts(self.np, block)
            if _all_start_with(self.np, block, starts, _TASK_HEAD):
                # the common case: a block of task lines, routed without splitting or parsing
                first = self.count
                self.count += len(starts)
                self.writers["tasks"].add_block(self.np.arange(first, self.count, dtype=self.np.int64), block,
                                                starts=starts)
                return
        self.add_lines(block.split(b"\n")[:-1], parsed)

    def add_lines(self, lines: List[bytes], parsed: Optional[Sequence[Optional[dict]]] = None) -> None:
        """Add JSON lines (without newlines), in order."""
        if not lines:
            return
        np = self.np
        first = self.count
        self.count += len(lines)
        if parsed is None:
            parsed = [None] * len(lines)
        groups: Dict[str, Tuple[List[int], List[bytes], List[Optional[dict]]]] = {}
        for index, (line, record) in enumerate(zip(lines, parsed)):
            group, record = _kind(line, record)
            entry = groups.get(group)
            if entry is None:
                entry = groups[group] = ([], [], [])
            entry[0].append(first + index)
            entry[1].append(line)
            entry[2].append(record)
        for group, (seqs, group_lines, records) in groups.items():
            block = b"\n".join(group_lines) + b"\n"
            known = records if any(r is not None for r in records) else None
            self.writers[group].add_block(np.array(seqs, dtype=np.int64), block, known)

    def close(self) -> int:
        """Write what is buffered, the attributes, and rename the file into place; returns the record count."""
        try:
            for writer in self.writers.values():
                writer.close()
            self.handle.attrs["format"] = "flowcept"
            self.handle.attrs["format_version"] = FORMAT_VERSION
            self.handle.attrs["records"] = self.count
            if self.workflow_id is not None:
                self.handle.attrs["workflow_id"] = self.workflow_id
            self.handle.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        finally:
            if self.worker is not None:
                self.worker.close()
        return self.count

    def abort(self) -> None:
        """Drop the temporary file (an error, or the writer is given up)."""
        if self.worker is not None:
            self.worker.close()
        try:
            self.handle.close()
        except Exception:  # noqa: BLE001  (closing a broken file may fail: it is removed anyway)
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def write_hdf5_blocks(path: str, blocks: Iterable[Tuple[Any, ...]], workflow_id: Optional[str] = None,
                      parse_worker: bool = False) -> int:
    """Write (newline-terminated block, count, parsed-or-None) items to ``path`` atomically."""
    writer = Hdf5Writer(path, workflow_id, parse_worker)
    try:
        for item in blocks:
            writer.add_block(item[0], item[1], item[2])
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def write_hdf5(path: str, merged: Iterable[Tuple[bytes, Optional[dict]]], workflow_id: Optional[str] = None,
               parse_worker: bool = False) -> int:
    """Write (line, parsed-or-None) pairs to ``path`` atomically; returns the number of records."""
    writer = Hdf5Writer(path, workflow_id, parse_worker)
    try:
        lines: List[bytes] = []
        parsed: List[Optional[dict]] = []
        for line, record in merged:
            lines.append(line)
            parsed.append(record)
            if len(lines) >= CHUNK_ROWS:
                writer.add_lines(lines, parsed)
                lines, parsed = [], []
        writer.add_lines(lines, parsed)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def group_lines(group: Any) -> List[bytes]:
    """The JSON lines of one group in row order (format 3's JSONL text, or 1-2's string rows)."""
    if "jsonl" in group:
        return group["jsonl"][:].tobytes().split(b"\n")[:-1]
    if "record" in group:
        return [line if isinstance(line, bytes) else line.encode() for line in group["record"][:]]
    return []


def iter_hdf5_lines(path: str) -> List[bytes]:
    """The JSON lines of every record in consolidated order (as the JSONL output holds them)."""
    h5py = _h5py()
    import numpy as np

    parts_seq = []
    parts_lines: List[bytes] = []
    with h5py.File(path, "r") as handle:
        for name in GROUPS:
            group = handle.get(name)
            if group is None or "seq" not in group:
                continue
            lines = group_lines(group)
            seqs = group["seq"][:]
            if len(lines) != len(seqs):
                raise ValueError(f"{path}: /{name} holds {len(lines)} records for {len(seqs)} seq values")
            parts_seq.append(seqs)
            parts_lines.extend(lines)
    if not parts_seq:
        return []
    order = np.argsort(np.concatenate(parts_seq), kind="stable")
    return [parts_lines[i] for i in order.tolist()]


def read_hdf5(path: str) -> List[Dict[str, Any]]:
    """Read a consolidated HDF5 file into the same record dicts the JSONL output gives."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Flowcept HDF5 file '{path}' was not found")
    return [orjson.loads(line) for line in iter_hdf5_lines(path)]


def tasks_dataframe(path: str) -> Any:
    """The filterable task columns as a pandas DataFrame (no JSON parsing)."""
    import pandas as pd

    h5py = _h5py()
    columns: Dict[str, Any] = {}
    with h5py.File(path, "r") as handle:
        tasks = handle.get("tasks")
        if tasks is None:
            return pd.DataFrame()
        for name in (*STRING_COLUMNS, *FLOAT_COLUMNS, *INT_COLUMNS):
            if name in tasks:
                data = tasks[name]
                columns[name] = data.asstr()[:] if data.dtype.kind in "OS" else data[:]
    return pd.DataFrame(columns)


if __name__ == "__main__" and sys.argv[1:2] == ["--column-worker"]:
    _column_worker_main(int(sys.argv[2]), int(sys.argv[3]))
