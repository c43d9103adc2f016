"""The consolidated HDF5 file of one workflow: full records plus columns people filter on.

Layout (documented in ``docs/file-format.md``)::

    /                      attrs: format="flowcept", format_version, workflow_id, records
    /tasks/record          JSON text of each task, variable-length UTF-8 strings
    /tasks/seq             int64, the record's position in the consolidated order
    /tasks/<column>        task_id, workflow_id, campaign_id, activity_id, status, hostname,
                           node_name, parent_task_id (strings, "" when absent);
                           started_at, ended_at (float64, NaN when absent);
                           rank, local_rank, pid (int64, -1 when absent)
    /workflows/record,seq  the (merged) workflow record(s)
    /telemetry/record,seq  every telemetry record as JSON, plus node_name and timestamp
    /telemetry/nodes/<node>/timestamp and one float64 column per numeric field (dotted names),
                           gzip-compressed; /telemetry/nodes/<node>/gpus/<gpu>/... the same per GPU
    /other/record,seq      any other record (objects, untyped lines)

Everything is one-dimensional and chunked; datasets grow as chunks arrive, so writing keeps
memory flat whatever the size of the workflow. The file is written to a temporary name and
renamed. h5py and numpy are imported here only, never by ``import flowcept``.
"""

from __future__ import annotations

import gc
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import orjson

FORMAT_VERSION = 1
CHUNK_ROWS = 16384
STRING_COLUMNS = ("task_id", "workflow_id", "campaign_id", "activity_id", "status", "hostname", "node_name",
                  "parent_task_id")
FLOAT_COLUMNS = ("started_at", "ended_at")
INT_COLUMNS = ("rank", "local_rank", "pid")
GROUPS = ("tasks", "workflows", "telemetry", "other")
_GPU_KEYS = ("gpu", "gpus")
_NODE_ID_KEYS = ("node_name", "hostname")
_TIME_KEYS = ("timestamp", "utc_timestamp", "captured_at", "started_at")


def _h5py() -> Any:
    try:
        import h5py
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("HDF5 output needs h5py: pip install 'flowcept[hdf5]'") from error
    return h5py


def _kind(line: bytes, record: Optional[dict]) -> Tuple[str, Optional[dict]]:
    if record is None:
        if line.startswith(b'{"type":"task"'):
            return "tasks", None
        if line.startswith(b'{"type":"telemetry"'):
            return "telemetry", None
        if line.startswith(b'{"type":"workflow"'):
            return "workflows", None
        record = orjson.loads(line)
    kind = record.get("type") if isinstance(record, dict) else None
    return {"task": "tasks", "telemetry": "telemetry", "workflow": "workflows"}.get(kind, "other"), record


class _Appender:
    """Resizable 1-D datasets of one group, appended a chunk at a time."""

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


class _GroupWriter:
    """Buffers the rows of one group and writes them CHUNK_ROWS at a time."""

    def __init__(self, name: str, parent: Any, np: Any, h5py: Any):
        self.name = name
        self.parent = parent
        self.np = np
        self.h5py = h5py
        self.appender: Optional[_Appender] = None
        self.lines: List[bytes] = []
        self.records: List[Optional[dict]] = []
        self.seqs: List[int] = []
        self.series: Dict[Tuple[str, str], _Series] = {}

    def add(self, seq: int, line: bytes, record: Optional[dict]) -> None:
        self.seqs.append(seq)
        self.lines.append(line)
        self.records.append(record)
        if len(self.lines) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.lines:
            return
        np = self.np
        if self.appender is None:
            self.appender = _Appender(self.parent.require_group(self.name), np, self.h5py)
        app = self.appender
        lines = np.empty(len(self.lines), dtype=object)
        lines[:] = self.lines
        app.append("record", lines, self.h5py.string_dtype("utf-8"))
        app.append("seq", np.asarray(self.seqs, dtype=np.int64), np.int64)
        if self.name in ("tasks", "telemetry"):
            records = [r if r is not None else orjson.loads(line) for r, line in zip(self.records, self.lines)]
            if self.name == "tasks":
                self._task_columns(app, records)
            else:
                self._telemetry(app, records)
        app.rows += len(self.lines)
        self.lines, self.records, self.seqs = [], [], []

    def _task_columns(self, app: _Appender, records: List[dict]) -> None:
        np = self.np
        string = self.h5py.string_dtype("utf-8")
        for name in STRING_COLUMNS:
            values = np.empty(len(records), dtype=object)
            values[:] = [r.get(name) or "" for r in records]
            if not all(type(v) is str for v in values):  # rare: numbers or objects as ids
                values[:] = [_text(v) if type(v) is not str else v for v in values]
            app.append(name, values, string)
        for name in FLOAT_COLUMNS:
            column = [r.get(name) for r in records]
            try:  # the common case: every value a number or None (None -> NaN)
                array = np.array(column, dtype=np.float64)
            except (TypeError, ValueError):
                array = np.array([_number(v) for v in column], dtype=np.float64)
            app.append(name, array, np.float64, fill=math.nan)
        for name in INT_COLUMNS:
            app.append(name, np.array([v if type(v) is int else -1 for v in (r.get(name) for r in records)],
                                      dtype=np.int64), np.int64, fill=-1)

    def _telemetry(self, app: _Appender, records: List[dict]) -> None:
        np = self.np
        nodes = [_text(_first(r, _NODE_ID_KEYS)) for r in records]
        stamps = [_number(_first(r, _TIME_KEYS)) for r in records]
        values = np.empty(len(records), dtype=object)
        values[:] = nodes
        app.append("node_name", values, self.h5py.string_dtype("utf-8"))
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


def write_hdf5(path: str, merged: Iterable[Tuple[bytes, Optional[dict]]], workflow_id: Optional[str] = None) -> int:
    """Write (line, parsed-or-None) pairs to ``path`` atomically; returns the number of records."""
    h5py = _h5py()
    import numpy as np

    tmp = f"{path}.{os.getpid()}.tmp"
    count = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # many short-lived dicts per chunk: the cyclic GC would triple the time
    try:
        with h5py.File(tmp, "w") as handle:
            writers = {name: _GroupWriter(name, handle, np, h5py) for name in GROUPS}
            tasks = writers["tasks"]
            for line, record in merged:
                if record is None and line.startswith(b'{"type":"task"'):
                    tasks.add(count, line, None)  # the common case, without a call to _kind
                else:
                    group, parsed = _kind(line, record)
                    writers[group].add(count, line, parsed)
                count += 1
            for writer in writers.values():
                writer.close()
            handle.attrs["format"] = "flowcept"
            handle.attrs["format_version"] = FORMAT_VERSION
            handle.attrs["records"] = count
            if workflow_id is not None:
                handle.attrs["workflow_id"] = workflow_id
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        if gc_was_enabled:
            gc.enable()
    return count


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
    return [line if isinstance(line, bytes) else line.encode() for line in lines[order]]


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
                columns[name] = data.asstr()[:] if data.dtype.kind == "O" else data[:]
    return pd.DataFrame(columns)
