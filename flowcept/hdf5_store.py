"""The consolidated HDF5 file of one workflow: full records plus columns people filter on.

Layout (documented in ``docs/file-format.md``)::

    /                      attrs: format="flowcept", format_version, workflow_id, records
    /tasks/record          JSON text of each task, variable-length UTF-8 strings
    /tasks/seq             int64, the record's position in the consolidated order
    /tasks/<column>        task_id, workflow_id, campaign_id, activity_id, status, hostname,
                           node_name, parent_task_id (fixed-length UTF-8 strings, "" when absent);
                           started_at, ended_at (float64, NaN when absent);
                           rank, local_rank, pid (int64, -1 when absent)
    /workflows/record,seq  the (merged) workflow record(s)
    /telemetry/record,seq  every telemetry record as JSON, plus node_name and timestamp
    /telemetry/nodes/<node>/timestamp and one float64 column per numeric field (dotted names),
                           gzip-compressed; /telemetry/nodes/<node>/gpus/<gpu>/... the same per GPU
    /other/record,seq      any other record (objects, untyped lines)

Everything is one-dimensional and chunked; datasets grow as blocks of rows arrive (one h5py
write per column per block, never one per record), so writing keeps memory flat whatever the
size of the workflow. The filter columns are fixed-length strings: writing a variable-length
string costs HDF5 a heap object each (~0.5 us), eight of them per task cost more than
everything else together; a fixed-length column is one memory copy. A column widens (doubling)
when a longer value arrives. The file is written to a temporary name and renamed. h5py and
numpy are imported here only, never by ``import flowcept``.
"""

from __future__ import annotations

import gc
import math
import operator
import os
from itertools import repeat
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import orjson

FORMAT_VERSION = 2  # 2: filter columns are fixed-length strings (1: variable-length)
CHUNK_ROWS = 16384  # rows per HDF5 chunk
WRITE_ROWS = CHUNK_ROWS  # rows per h5py write (per column): bounds the lines and dicts held
STRING_COLUMNS = ("task_id", "workflow_id", "campaign_id", "activity_id", "status", "hostname", "node_name",
                  "parent_task_id")
FLOAT_COLUMNS = ("started_at", "ended_at")
INT_COLUMNS = ("rank", "local_rank", "pid")
GROUPS = ("tasks", "workflows", "telemetry", "other")
_TASK_FIELDS = (*STRING_COLUMNS, *FLOAT_COLUMNS, *INT_COLUMNS)
_PARSE_ROWS = 2048
_GPU_KEYS = ("gpu", "gpus")
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
        record = orjson.loads(line)
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

    def column(self, name: str, dtype: Any, fill: Any = None, compress: bool = False) -> Any:
        if name in self.group:
            return self.group[name]
        kwargs: Dict[str, Any] = {}
        if fill is not None:
            kwargs["fillvalue"] = fill
        if compress:
            kwargs.update(compression="gzip", compression_opts=4, shuffle=True)
        return self.group.create_dataset(name, shape=(self.rows,), maxshape=(None,), dtype=dtype,
                                         chunks=(CHUNK_ROWS,), **kwargs)

    def append(self, name: str, values: Any, dtype: Any, fill: Any = None, compress: bool = False) -> None:
        dataset = self.column(name, dtype, fill, compress)
        end = self.rows + len(values)
        if dataset.shape[0] < end:
            dataset.resize((end,))
        dataset[self.rows:end] = values

    def append_text(self, name: str, values: Any) -> None:
        """Append a fixed-length bytes array (numpy ``S``), widening the column when needed."""
        width = max(8, values.dtype.itemsize)
        if name in self.group:
            dataset = self.group[name]
            if dataset.dtype.itemsize < width:
                dataset = self._widen(name, dataset, max(width, 2 * dataset.dtype.itemsize))
        else:
            dataset = self.column(name, self.h5py.string_dtype("utf-8", _round_width(width)))
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
                                        chunks=(CHUNK_ROWS,))
        for start in range(0, old.shape[0], WRITE_ROWS):
            new[start:start + WRITE_ROWS] = old[start:start + WRITE_ROWS].astype(new.dtype)
        del self.group[name]
        self.group.move(tmp, name)
        return self.group[name]


def _round_width(width: int) -> int:
    return 1 << max(3, (width - 1).bit_length())


class _GroupWriter:
    """Buffers the rows of one group and writes them WRITE_ROWS at a time."""

    def __init__(self, name: str, parent: Any, np: Any, h5py: Any):
        self.name = name
        self.parent = parent
        self.np = np
        self.h5py = h5py
        self.appender: Optional[_Appender] = None
        self.lines: List[bytes] = []
        self.records: List[Optional[dict]] = []
        self.parsed = 0  # how many of self.records are not None
        self.seqs: List[Any] = []  # numpy int64 arrays
        self.series: Dict[Tuple[str, str], _Series] = {}

    def add(self, seq: int, line: bytes, record: Optional[dict]) -> None:
        self.add_many(self.np.array([seq], dtype=self.np.int64), [line], [record] if record is not None else None)

    def add_many(self, seqs: Any, lines: List[bytes], records: Optional[List[Optional[dict]]]) -> None:
        self.seqs.append(seqs)
        self.lines.extend(lines)
        if records is None:
            self.records.extend([None] * len(lines))
        else:
            self.records.extend(records)
            self.parsed += 1
        if len(self.lines) >= WRITE_ROWS:
            self.flush(aligned=True)

    def flush(self, aligned: bool = False) -> None:
        """Write the buffered rows; ``aligned``: whole HDF5 chunks only, the rest stays buffered."""
        if not self.lines:
            return
        np = self.np
        if aligned and len(self.lines) % CHUNK_ROWS:
            keep = len(self.lines) % CHUNK_ROWS
            seqs = np.concatenate(self.seqs)
            rest = (seqs[-keep:], self.lines[-keep:], self.records[-keep:] if self.parsed else None)
            self.seqs, self.lines = [seqs[:-keep]], self.lines[:-keep]
            if self.parsed:
                self.records = self.records[:-keep]
            self.flush()
            self.add_many(*rest)
            return
        if self.appender is None:
            self.appender = _Appender(self.parent.require_group(self.name), np, self.h5py)
        app = self.appender
        lines = np.empty(len(self.lines), dtype=object)
        lines[:] = self.lines
        app.append("record", lines, self.h5py.string_dtype("utf-8"))
        app.append("seq", np.concatenate(self.seqs), np.int64)
        if self.name in ("tasks", "telemetry"):
            with _NoGC():
                records: List[dict] = []
                columns: Dict[str, List[Any]] = {name: [] for name in _TASK_FIELDS}
                # Parsed a few thousand at a time: few dicts alive, their memory reused (fresh
                # pages cost more than parsing on some machines).
                for start in range(0, len(self.lines), _PARSE_ROWS):
                    part = self.lines[start:start + _PARSE_ROWS]
                    if self.parsed:
                        records = [r if r is not None else orjson.loads(line)
                                   for r, line in zip(self.records[start:start + _PARSE_ROWS], part)]
                    else:
                        records = list(map(orjson.loads, part))
                    if self.name == "tasks":
                        for name, values in _columns(records, _TASK_FIELDS).items():
                            columns[name].extend(values)
                    else:
                        self._telemetry(app, records)
                        app.rows += len(part)
                    records = []
                if self.name == "tasks":
                    self._task_columns(app, columns)
                    app.rows += len(self.lines)
        else:
            app.rows += len(self.lines)
        self.lines, self.records, self.seqs, self.parsed = [], [], [], 0

    def _task_columns(self, app: _Appender, columns: Dict[str, List[Any]]) -> None:
        np = self.np
        for name in STRING_COLUMNS:
            app.append_text(name, _text_column(np, columns[name]))
        for name in FLOAT_COLUMNS:
            column = columns[name]
            try:  # the common case: every value a number or None (None -> NaN)
                array = np.array(column, dtype=np.float64)
            except (TypeError, ValueError):
                array = np.array([_number(v) for v in column], dtype=np.float64)
            app.append(name, array, np.float64, fill=math.nan)
        for name in INT_COLUMNS:
            app.append(name, _int_column(np, columns[name]), np.int64, fill=-1)

    def _telemetry(self, app: _Appender, records: List[dict]) -> None:
        np = self.np
        nodes = [_text(_first(r, _NODE_ID_KEYS)) for r in records]
        stamps = [_number(_first(r, _TIME_KEYS)) for r in records]
        app.append_text("node_name", _text_column(np, nodes))
        app.append("timestamp", np.array(stamps, dtype=np.float64), np.float64, fill=math.nan)
        for record, node, stamp in zip(records, nodes, stamps):
            flat: Dict[str, float] = {}
            gpus: Dict[str, Dict[str, float]] = {}
            for key, value in record.items():
                if key in _GPU_KEYS:
                    for gpu, sample in _gpu_items(value):
                        _flatten(sample, "", gpus.setdefault(gpu, {}))
                elif key not in _TIME_KEYS:
                    _flatten(value, key, flat)
            self._series(node or "unknown", "").add(stamp, flat)
            for gpu, sample in gpus.items():
                self._series(node or "unknown", gpu).add(stamp, sample)

    def _series(self, node: str, gpu: str) -> _Series:
        key = (node, gpu)
        series = self.series.get(key)
        if series is None:
            nodes = self.parent.require_group("telemetry").require_group("nodes")
            group = nodes.require_group(_h5name(node))
            group.attrs["node_name"] = node
            if gpu:
                group = group.require_group("gpus").require_group(_h5name(gpu))
                group.attrs["gpu"] = gpu
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
    try:
        distinct = set(values)
        if len(distinct) == 1:  # common (one host, one activity...): no conversion per value
            value = distinct.pop()
            if value is None:
                return np.full(len(values), b"", dtype="S1")
            if type(value) is str:
                encoded = value.encode("utf-8", "surrogatepass")
                return np.full(len(values), encoded, dtype=f"S{max(1, len(encoded))}")
    except TypeError:  # unhashable values (lists, dicts): the per-value path
        pass
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

    def __init__(self, path: str, workflow_id: Optional[str] = None):
        self.h5py = _h5py()
        import numpy as np

        self.np = np
        self.path = path
        self.workflow_id = workflow_id
        self.tmp = f"{path}.{os.getpid()}.tmp"
        self.count = 0
        self.handle = self.h5py.File(self.tmp, "w")
        self.writers = {name: _GroupWriter(name, self.handle, np, self.h5py) for name in GROUPS}

    def add_block(self, block: bytes, count: int = -1, parsed: Optional[Sequence[Optional[dict]]] = None) -> None:
        """Add newline-terminated JSONL lines (with their parsed records when known)."""
        if type(block) is not bytes:
            block = bytes(block)
        lines = block.split(b"\n")[:-1]
        if parsed is None and all(map(bytes.startswith, lines, repeat(_TASK_HEAD))):
            self._tasks(lines)  # the common case: a block of task lines, routed without parsing
            return
        self.add_lines(lines, parsed)

    def _tasks(self, lines: List[bytes]) -> None:
        first = self.count
        self.count += len(lines)
        self.writers["tasks"].add_many(self.np.arange(first, self.count, dtype=self.np.int64), lines, None)

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
            self.writers[group].add_many(np.array(seqs, dtype=np.int64), group_lines, records)

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
        return self.count

    def abort(self) -> None:
        """Drop the temporary file (an error, or the writer is given up)."""
        try:
            self.handle.close()
        except Exception:  # noqa: BLE001  (closing a broken file may fail: it is removed anyway)
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def write_hdf5_blocks(path: str, blocks: Iterable[Tuple[Any, ...]], workflow_id: Optional[str] = None) -> int:
    """Write (newline-terminated block, count, parsed-or-None) items to ``path`` atomically."""
    writer = Hdf5Writer(path, workflow_id)
    try:
        for item in blocks:
            writer.add_block(item[0], item[1], item[2])
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def write_hdf5(path: str, merged: Iterable[Tuple[bytes, Optional[dict]]], workflow_id: Optional[str] = None) -> int:
    """Write (line, parsed-or-None) pairs to ``path`` atomically; returns the number of records."""
    writer = Hdf5Writer(path, workflow_id)
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


def _decode_lines(lines: Any) -> Iterator[bytes]:
    for line in lines:
        yield line if isinstance(line, bytes) else line.encode()


def iter_hdf5_lines(path: str) -> List[bytes]:
    """The JSON lines of every record in consolidated order (as the JSONL output holds them)."""
    h5py = _h5py()
    import numpy as np

    parts_seq = []
    parts_lines = []
    with h5py.File(path, "r") as handle:
        for name in GROUPS:
            group = handle.get(name)
            if group is None or "record" not in group:
                continue
            parts_seq.append(group["seq"][:])
            parts_lines.append(group["record"][:])
    if not parts_seq:
        return []
    seqs = np.concatenate(parts_seq)
    lines = np.concatenate(parts_lines)
    order = np.argsort(seqs, kind="stable")
    return list(_decode_lines(lines[order]))


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
