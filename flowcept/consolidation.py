"""Reading buffer files and merging every source of one workflow into one output.

Sources of a workflow ``W`` under the base path ``<dir>/<stem>.jsonl`` are:
``<stem>_W_<host>_<pid>.jsonl`` (per process), ``<stem>_W_node-<node>.jsonl`` (per node daemon)
and an earlier ``<stem>_W.jsonl`` (so a second run is idempotent). A file is taken only when
its records belong to ``W`` exactly (an id that merely shares a prefix stays out).

Merging streams line by line: memory holds one line plus the set of record keys already
written (about 70 bytes per record, for duplicate removal). A torn or corrupt line costs that
line only and is reported. Workflow records of the same id (start and end) are merged into one.
The output is written to a temporary file and renamed; the merge holds an exclusive lock file
so two processes consolidating the same workflow take turns, and a source file is removed only
when no live writer holds its lock.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import orjson

from flowcept.transport import safe_name, split_base_path

logger = logging.getLogger(__name__)

_TASK_PREFIX = b'{"type":"task","task_id":"'
_TELEMETRY_PREFIX = b'{"type":"telemetry","telemetry_id":"'


class ConsolidationError(RuntimeError):
    """Consolidation could not produce an output (nothing found, unwritable directory...)."""


@dataclass
class MergeReport:
    """What a merge did; printed by the CLI and logged by stop()."""

    output_path: str = ""
    sources: List[str] = field(default_factory=list)
    records_in: int = 0
    records_out: int = 0
    duplicates: int = 0
    bad_lines: List[Tuple[str, int]] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)
    kept_live: List[str] = field(default_factory=list)


# -- reading --------------------------------------------------------------------------------------

def iter_file_lines(path: str, bad_lines: Optional[List[Tuple[str, int]]] = None) -> Iterator[bytes]:
    """Yield the non-empty lines of a JSONL file (without the newline), streaming."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.endswith(b"\n"):
                line = line[:-1]
            elif line and bad_lines is not None and not _parses(line):
                bad_lines.append((path, number))  # torn last line of a killed writer
                continue
            if line.strip():
                yield line


def _parses(line: bytes) -> bool:
    try:
        orjson.loads(line)
        return True
    except orjson.JSONDecodeError:
        return False


def read_jsonl(path: str, report: Optional[MergeReport] = None) -> List[Dict[str, Any]]:
    """Parse a JSONL file; a torn or corrupt line is skipped, logged and reported."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Flowcept buffer file '{path}' was not found")
    records: List[Dict[str, Any]] = []
    bad: List[Tuple[str, int]] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                bad.append((path, number))
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append((path, number))
    if bad:
        logger.warning("skipped %d torn or corrupt line(s) in %s (line %s)", len(bad), path,
                       ", ".join(str(n) for _, n in bad[:10]))
        if report is not None:
            report.bad_lines.extend(bad)
    return records


def read_records(path: str) -> List[Dict[str, Any]]:
    """Read a JSONL or HDF5 Flowcept file into a list of record dicts."""
    if path.endswith((".h5", ".hdf5")):
        from flowcept.hdf5_store import read_hdf5

        return read_hdf5(path)
    return read_jsonl(path)


# -- finding the sources of a workflow --------------------------------------------------------------

def consolidated_path(base_path: str, workflow_id: str, output_format: str = "jsonl") -> str:
    directory, stem, suffix = split_base_path(base_path)
    ext = ".h5" if output_format == "hdf5" else suffix
    return os.path.join(directory, f"{stem}_{safe_name(workflow_id)}{ext}")


def _first_workflow_id(path: str) -> Optional[str]:
    """The workflow id of the first parsable record of a file (None if it has none)."""
    try:
        with open(path, "rb") as handle:
            for line in handle:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("workflow_id") is not None:
                    return str(record["workflow_id"])
    except OSError:
        return None
    return None


def find_sources(base_path: str, workflow_id: str, include_output: bool = True) -> List[str]:
    """Every file holding records of exactly ``workflow_id`` under ``base_path``."""
    directory, stem, suffix = split_base_path(base_path)
    wf = safe_name(workflow_id)
    output = os.path.join(directory, f"{stem}_{wf}{suffix}")
    candidates = sorted(glob.glob(os.path.join(glob.escape(directory), glob.escape(f"{stem}_{wf}_") + "*"
                                               + glob.escape(suffix))))
    sources = []
    for path in candidates:
        if path.endswith(".tmp") or os.path.basename(path).startswith("."):
            continue
        found = _first_workflow_id(path)
        if found is None or found == workflow_id:
            sources.append(path)
    if include_output and os.path.exists(output):
        sources.insert(0, output)
    return sources


# -- locks ------------------------------------------------------------------------------------------

def _is_unlocked(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class _MergeLock:
    def __init__(self, output_path: str):
        directory, name = os.path.split(output_path)
        self.path = os.path.join(directory, f".{name}.lock")
        self.fd: Optional[int] = None

    def __enter__(self) -> "_MergeLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
            try:
                os.unlink(self.path)
            except OSError:
                pass


# -- merging ----------------------------------------------------------------------------------------

def _record_key(line: bytes) -> Tuple[Optional[bytes], Optional[dict]]:
    """Return (dedup key, parsed record if it had to be parsed). Cheap for our own lines."""
    if line.startswith(_TASK_PREFIX):
        end = line.find(b'"', len(_TASK_PREFIX))
        if end > 0:
            return b"t" + line[len(_TASK_PREFIX):end], None
    elif line.startswith(_TELEMETRY_PREFIX):
        end = line.find(b'"', len(_TELEMETRY_PREFIX))
        if end > 0:
            return b"m" + line[len(_TELEMETRY_PREFIX):end], None
    record = orjson.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not an object")
    kind = record.get("type")
    if kind == "workflow":
        return None, record
    for name, tag in (("task_id", b"t"), ("telemetry_id", b"m"), ("object_id", b"o")):
        value = record.get(name)
        if value is not None:
            return tag + str(value).encode(), record
    return b"h" + line, record  # a record without an id: identical lines are duplicates


def merge_workflow_records(records: List[dict]) -> dict:
    """Merge the start and end records of one workflow: later non-None fields win."""
    merged: dict = {}
    for record in sorted(records, key=lambda r: (r.get("ended_at") is not None, r.get("utc_timestamp") or 0)):
        for name, value in record.items():
            if value is not None:
                merged[name] = value
    return merged


def iter_merged(sources: List[str], workflow_id: str, report: MergeReport,
                progress: Optional[Callable[[int], None]] = None) -> Iterator[Tuple[bytes, Optional[dict]]]:
    """Yield (line, parsed-or-None) of every distinct record of the workflow, then its workflow record."""
    seen: set = set()
    workflows: List[dict] = []
    wf_bytes = orjson.dumps(workflow_id)
    for path in sources:
        try:
            lines = iter_file_lines(path, report.bad_lines)
            for line in lines:
                report.records_in += 1
                if progress is not None:
                    progress(len(line) + 1)
                try:
                    key, record = _record_key(line)
                except (orjson.JSONDecodeError, ValueError):
                    report.bad_lines.append((path, -1))
                    continue
                if record is None and b'"workflow_id":' + wf_bytes not in line:
                    record = orjson.loads(line)
                if record is not None:
                    if record.get("workflow_id") != workflow_id:
                        continue
                    if record.get("type") == "workflow":
                        workflows.append(record)
                        continue
                hashed = hash(key)
                if hashed in seen:
                    report.duplicates += 1
                    continue
                seen.add(hashed)
                yield line, record
        except FileNotFoundError:
            logger.warning("source %s vanished during consolidation", path)
    if workflows:
        yield orjson.dumps(merge_workflow_records(workflows)), None


def consolidate(base_path: str, workflow_id: str, output_format: str = "jsonl", cleanup_files: bool = True,
                order_by_time: bool = False, progress: Optional[Callable[[int], None]] = None,
                extra_sources: Optional[List[str]] = None) -> MergeReport:
    """Merge every source of ``workflow_id`` into one file; idempotent; returns a report."""
    if not workflow_id:
        raise ValueError("consolidation needs a workflow_id")
    output = consolidated_path(base_path, workflow_id, output_format)
    jsonl_output = consolidated_path(base_path, workflow_id, "jsonl")
    report = MergeReport(output_path=output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with _MergeLock(output):
        sources = find_sources(base_path, workflow_id)
        for extra in extra_sources or ():
            if extra not in sources and os.path.exists(extra):
                sources.append(extra)
        if not sources:
            raise FileNotFoundError(
                f"no Flowcept files of workflow '{workflow_id}' next to {os.path.abspath(base_path)}")
        report.sources = list(sources)
        merged = iter_merged(sources, workflow_id, report, progress)
        if order_by_time:
            merged = _ordered(merged)
        if output_format == "hdf5":
            from flowcept.hdf5_store import write_hdf5

            report.records_out = write_hdf5(output, merged)
        else:
            report.records_out = _write_jsonl(output, merged)
        if cleanup_files:
            for path in sources:
                if path in (output, jsonl_output) and output_format == "jsonl":
                    continue
                if path == output:
                    continue
                if _is_unlocked(path):
                    try:
                        os.unlink(path)
                        report.removed.append(path)
                    except OSError:
                        pass
                else:
                    report.kept_live.append(path)
    if report.bad_lines:
        logger.warning("consolidation of %s skipped %d torn or corrupt line(s)", workflow_id,
                       len(report.bad_lines))
    return report


def _ordered(merged: Iterator[Tuple[bytes, Optional[dict]]]) -> Iterator[Tuple[bytes, Optional[dict]]]:
    """Order by started_at/timestamp (needs the records in memory: opt-in)."""
    items = []
    for line, record in merged:
        parsed = record if record is not None else orjson.loads(line)
        items.append((parsed.get("started_at") or parsed.get("timestamp") or 0, line, record))
    items.sort(key=lambda item: item[0])
    for _, line, record in items:
        yield line, record


def _write_jsonl(output: str, merged: Iterator[Tuple[bytes, Optional[dict]]]) -> int:
    tmp = f"{output}.{os.getpid()}.tmp"
    count = 0
    try:
        with open(tmp, "wb", buffering=1024 * 1024) as handle:
            write = handle.write
            for line, _ in merged:
                write(line)
                write(b"\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return count
