"""Reading buffer files and merging every source of one workflow into one output.

Sources of a workflow ``W`` under the base path ``<dir>/<stem>.jsonl`` are:
``<stem>_W_<host>_<pid>.jsonl`` (per process), ``<stem>_W_node-<node>.jsonl`` (per node daemon)
and an earlier ``<stem>_W.jsonl`` (so a second run is idempotent). A file is taken only when
its records belong to ``W`` exactly (an id that merely shares a prefix stays out).

Merging streams blocks of 1 MiB: our own task and telemetry lines are recognised a block at
a time by one regex scan (no JSON parsing) and a block without duplicates is copied as is; other
lines are parsed one by one. Duplicate removal costs about one byte per record id (``SeenIds``:
a byte per counter value of each process's id prefix), ~70 bytes only for ids of another shape.
A torn or corrupt line costs that line only and is reported (file and line number). Workflow
records of the same id (start and end) are merged into one, written last. The output is written
to a temporary file and renamed; the merge holds an exclusive lock file so two processes
consolidating the same workflow take turns, and a source file is removed only
when no live writer holds its lock.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

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
    elapsed_s: float = 0.0


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
    """``<dir>/<stem>_<workflow_id>.jsonl`` (or ``.h5``): the one output of a workflow."""
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

    def __enter__(self) -> _MergeLock:
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

# Our own task and telemetry lines start with their type, id and workflow id, and ids are
# ``<16 hex>.<counter>`` (flowcept.ids). Such lines are recognised a block at a time by one regex
# scan, without parsing JSON; any other line takes the per-line path.
_FAST_BODY = (rb'\{"type":"(task|telemetry)","(?:task|telemetry)_id":"([0-9a-f]{16})\.([0-9]{1,15})",'
              rb'"workflow_id":("[^"\\\n]*")')
_FAST_FIRST = re.compile(_FAST_BODY)
# Lines after the first of a block: the leading newline is a literal prefix the regex engine
# searches for quickly (a ``^`` in MULTILINE mode would be tried at every byte).
_FAST_NEXT = re.compile(rb"\n" + _FAST_BODY)
_STD_ID = re.compile(rb"([0-9a-f]{16})\.([0-9]{1,15})")
_BLOCK_BYTES = 1024 * 1024
_MAX_SPAN = 1 << 28  # a counter range wider than this per process goes to the hashed set


class SeenIds:
    """Which record ids a merge already wrote: about one byte per id, not one object per id.

    Ids of the standard shape ``<prefix>.<counter>`` set one byte in a per-(type, prefix)
    array indexed by ``counter - base``; memory is one byte per counter value between the
    lowest and highest id a process wrote to this workflow. Other ids (user-given task ids,
    records without an id) fall back to a set of 64-bit hashes (~70 bytes each).
    """

    def __init__(self) -> None:
        try:
            import numpy
        except ModuleNotFoundError:  # numpy is optional: bytearrays and a per-id loop instead
            numpy = None  # type: ignore[assignment]
        self.np = numpy
        self.maps: Dict[Tuple[bytes, bytes], list] = {}  # (type, prefix) -> [base, array]
        self.hashed: set = set()

    def memory_bytes(self) -> int:
        return sum(len(entry[1]) for entry in self.maps.values()) + 70 * len(self.hashed)

    def _map(self, kind: bytes, prefix: bytes, low: int, high: int) -> Optional[list]:
        entry = self.maps.get((kind, prefix))
        if entry is None:
            if high - low >= _MAX_SPAN:
                return None
            size = max(1024, high - low + 1)
            entry = [low, self.np.zeros(size, dtype=self.np.uint8) if self.np else bytearray(size)]
            self.maps[(kind, prefix)] = entry
            return entry
        base, array = entry
        new_base = min(base, low)
        needed = max(high, base + len(array) - 1) - new_base + 1
        if needed > _MAX_SPAN:
            return None
        if new_base < base or needed > len(array):
            size = max(needed, 2 * len(array)) if new_base == base else needed
            grown = self.np.zeros(size, dtype=self.np.uint8) if self.np else bytearray(size)
            grown[base - new_base:base - new_base + len(array)] = array
            entry[0], entry[1] = new_base, grown
        return entry

    def add_key(self, key: bytes) -> bool:
        """Record one key (``t``/``m``/``o`` tag + id); True when it was new."""
        match = _STD_ID.fullmatch(key, 1)
        if match is not None:
            kind = b"task" if key[:1] == b"t" else (b"telemetry" if key[:1] == b"m" else key[:1])
            counter = int(match.group(2))
            entry = self._map(kind, match.group(1), counter, counter)
            if entry is not None:
                index = counter - entry[0]
                if entry[1][index]:
                    return False
                entry[1][index] = 1
                return True
        hashed = hash(key)
        if hashed in self.hashed:
            return False
        self.hashed.add(hashed)
        return True

    def add_block(self, kinds: Tuple[bytes, ...], prefixes: Tuple[bytes, ...],
                  counters: Tuple[bytes, ...]) -> Optional[List[bool]]:
        """Record a block of standard ids; None when all were new, else a keep-mask."""
        np = self.np
        if np is None or len(set(prefixes)) > 8 or len(set(kinds)) > 1:
            keep = [self.add_key((b"t" if k == b"task" else b"m") + p + b"." + c)
                    for k, p, c in zip(kinds, prefixes, counters)]
            return None if all(keep) else keep
        values = np.array(counters).astype(np.int64)
        kind = kinds[0]
        if len(set(prefixes)) == 1:
            groups = [(prefixes[0], None)]
        else:
            codes = np.array(prefixes)
            groups = [(prefix, codes == np.bytes_(prefix)) for prefix in dict.fromkeys(prefixes)]
        keep_all: Optional[Any] = None
        for prefix, mask in groups:
            group = values if mask is None else values[mask]
            entry = self._map(kind, prefix, int(group.min()), int(group.max()))
            if entry is None:  # absurd counter span: per-id hashing for this block
                keep = [self.add_key((b"t" if k == b"task" else b"m") + p + b"." + c)
                        for k, p, c in zip(kinds, prefixes, counters)]
                return None if all(keep) else keep
            index = group - entry[0]
            fresh = entry[1][index] == 0
            unique_count = len(np.unique(index))
            if fresh.all() and unique_count == len(index):
                entry[1][index] = 1
                continue
            # Duplicates: keep the first occurrence of each id not seen before.
            first = np.zeros(len(index), dtype=bool)
            first[np.unique(index, return_index=True)[1]] = True
            group_keep = fresh & first
            entry[1][index] = 1
            if keep_all is None:
                keep_all = np.ones(len(values), dtype=bool)
            if mask is None:
                keep_all = group_keep
            else:
                keep_all[mask] = group_keep
        return None if keep_all is None else keep_all.tolist()


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


def _file_blocks(path: str, report: MergeReport) -> Iterator[Tuple[bytes, int]]:
    """Yield (block of whole lines ending in a newline, number of its first line)."""
    if path.endswith((".h5", ".hdf5")):
        from flowcept.hdf5_store import iter_hdf5_lines

        lines = iter_hdf5_lines(path)
        for start in range(0, len(lines), 16384):
            yield b"\n".join(lines[start:start + 16384]) + b"\n", start + 1
        return
    line_number = 1
    rest = b""
    with open(path, "rb") as handle:
        while True:
            data = handle.read(_BLOCK_BYTES)
            if not data:
                break
            data = rest + data if rest else data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            rest = data[cut:]
            block = data[:cut] if rest else data
            yield block, line_number
            line_number += block.count(b"\n")
    if rest.strip():
        if _parses(rest):
            yield rest + b"\n", line_number
        else:
            report.bad_lines.append((path, line_number))  # torn last line of a killed writer


class _Merger:
    """The state of one merge: ids seen, workflow records, counters. Streams blocks of lines."""

    def __init__(self, workflow_id: str, report: MergeReport, progress: Optional[Callable[[int], None]],
                 dedup: bool = True):
        self.workflow_id = workflow_id
        # One source holds each record once (one writer appends each batch once), so a
        # single-file merge (every plain run's stop()) skips duplicate tracking entirely.
        self.dedup = dedup
        self.wf_quoted = orjson.dumps(workflow_id)
        self.wf_field = b'"workflow_id":' + self.wf_quoted
        self.report = report
        self.progress = progress
        self.seen = SeenIds() if dedup else None
        self.workflows: List[dict] = []

    def blocks(self, sources: List[str]) -> Iterator[Tuple[bytes, int, Optional[List[Optional[dict]]]]]:
        """Yield (lines joined with newlines, count, parsed records or None) of distinct records."""
        for path in sources:
            try:
                for block, first_line in _file_blocks(path, self.report):
                    if self.progress is not None:
                        self.progress(len(block))
                    yield from self._block(path, block, first_line)
            except FileNotFoundError:
                logger.warning("source %s vanished during consolidation", path)
        if self.workflows:
            yield orjson.dumps(merge_workflow_records(self.workflows)) + b"\n", 1, None

    def _block(self, path: str, block: bytes, first_line: int
               ) -> Iterator[Tuple[bytes, int, Optional[List[Optional[dict]]]]]:
        lines = block.count(b"\n")
        if (not self.dedup and block.count(self.wf_field) == lines == block.count(b'"workflow_id":')
                and b'{"type":"workflow"' not in block):
            self.report.records_in += lines  # every line is a record of this workflow: copy as is
            yield block, lines, None
            return
        first = _FAST_FIRST.match(block)
        matches = _FAST_NEXT.findall(block) if first is not None else []
        if first is not None:
            matches.insert(0, first.groups())
        if len(matches) == lines and matches:
            kinds, prefixes, counters, workflows = zip(*matches)
            if workflows.count(self.wf_quoted) == lines:
                self.report.records_in += lines
                keep = self.seen.add_block(kinds, prefixes, counters) if self.seen is not None else None
                if keep is None:
                    yield block, lines, None
                    return
                kept = [line for line, k in zip(block.split(b"\n"), keep) if k]
                self.report.duplicates += lines - len(kept)
                if kept:
                    yield b"\n".join(kept) + b"\n", len(kept), None
                return
        yield from self._slow_block(path, block, first_line)

    def _slow_block(self, path: str, block: bytes, first_line: int
                    ) -> Iterator[Tuple[bytes, int, Optional[List[Optional[dict]]]]]:
        out: List[bytes] = []
        parsed: List[Optional[dict]] = []
        report = self.report
        for number, line in enumerate(block.split(b"\n")[:-1], first_line):
            if not line.strip():
                continue
            report.records_in += 1
            try:
                key, record = _record_key(line)
            except (orjson.JSONDecodeError, ValueError):
                report.bad_lines.append((path, number))
                continue
            if record is None and self.wf_field not in line:
                record = orjson.loads(line)
            if record is not None:
                if record.get("workflow_id") != self.workflow_id:
                    continue
                if record.get("type") == "workflow":
                    self.workflows.append(record)
                    continue
            if key is not None and self.seen is not None and not self.seen.add_key(key):
                report.duplicates += 1
                continue
            out.append(line)
            parsed.append(record)
        if out:
            yield b"\n".join(out) + b"\n", len(out), parsed


def iter_merged(sources: List[str], workflow_id: str, report: MergeReport,
                progress: Optional[Callable[[int], None]] = None) -> Iterator[Tuple[bytes, Optional[dict]]]:
    """Yield (line, parsed-or-None) of every distinct record of the workflow, then its workflow record."""
    yield from _lines(_Merger(workflow_id, report, progress).blocks(sources))


_WORKFLOW_PAD = 512


def workflow_start_line(record: dict) -> bytes:
    """The workflow start record as a JSON line padded with spaces (valid JSON whitespace).

    When a run's only source is the file of the process that started it, stop() merges the end
    fields into this line in place and renames the file into the output: no rewrite of the
    records. The padding is what the end fields need (status, ended_at, ...).
    """
    from flowcept.serialization import dumps

    return dumps(record) + b" " * _WORKFLOW_PAD + b"\n"


def _merge_in_place(source: str, output: str, workflow_id: str, update: Optional[dict],
                    report: MergeReport) -> bool:
    """The single-source fast path: update the padded first line, rename. False if it does not apply."""
    try:
        with open(source, "r+b") as handle:
            first = handle.readline(1 << 20)
            if not first.endswith(b" \n") or not first.startswith(b'{"type":"workflow"'):
                return False
            start = orjson.loads(first)
            if start.get("workflow_id") != workflow_id:
                return False
            lines = 1
            tail = b"\n"
            while True:
                block = handle.read(_BLOCK_BYTES)
                if not block:
                    break
                if b'"type":"workflow"' in block or b'"workflow_id":' + orjson.dumps(workflow_id) not in block:
                    return False
                lines += block.count(b"\n")
                tail = block[-1:]
            if tail != b"\n":
                return False  # torn last line: the careful path skips it
            merged = orjson.dumps(merge_workflow_records([start] + ([update] if update else [])))
            if len(merged) >= len(first):
                return False
            handle.seek(0)
            handle.write(merged + b" " * (len(first) - 1 - len(merged)) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(source, output)
    except (OSError, orjson.JSONDecodeError):
        return False
    report.records_in = report.records_out = lines
    report.removed.append(source)
    return True


def consolidate(base_path: str, workflow_id: str, output_format: str = "jsonl", cleanup_files: bool = True,
                order_by_time: bool = False, progress: Optional[Callable[[int], None]] = None,
                extra_sources: Optional[List[str]] = None, workflow_update: Optional[dict] = None) -> MergeReport:
    """Merge every source of ``workflow_id`` into one file; idempotent; returns a report.

    ``progress`` is called with the number of input bytes consumed (a progress bar's update).
    ``order_by_time`` sorts by ``started_at``/``timestamp``; it holds the records in memory.
    """
    if not workflow_id:
        raise ValueError("consolidation needs a workflow_id")
    if output_format not in ("jsonl", "hdf5"):
        raise ValueError(f"unknown output format '{output_format}' (jsonl or hdf5)")
    began = time.perf_counter()
    output = consolidated_path(base_path, workflow_id, output_format)
    jsonl_output = consolidated_path(base_path, workflow_id, "jsonl")
    report = MergeReport(output_path=output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with _MergeLock(output):
        sources = find_sources(base_path, workflow_id)
        if os.path.exists(output) and output not in sources:
            sources.insert(0, output)  # an earlier HDF5 output: a second run is idempotent
        for extra in extra_sources or ():
            if extra not in sources and os.path.exists(extra):
                sources.append(extra)
        if not sources:
            raise FileNotFoundError(
                f"no Flowcept files of workflow '{workflow_id}' next to {os.path.abspath(base_path)}")
        report.sources = list(sources)
        if (output_format == "jsonl" and cleanup_files and not order_by_time and len(sources) == 1
                and sources[0] != output and _is_unlocked(sources[0])
                and _merge_in_place(sources[0], output, workflow_id, workflow_update, report)):
            report.elapsed_s = time.perf_counter() - began
            return report
        merger = _Merger(workflow_id, report, progress, dedup=len(sources) > 1)
        if workflow_update:
            merger.workflows.append(dict(workflow_update))
        if output_format == "hdf5":
            from flowcept.hdf5_store import write_hdf5

            merged = _lines(merger.blocks(sources))
            if order_by_time:
                merged = _ordered(merged)
            report.records_out = write_hdf5(output, merged, workflow_id=workflow_id)
        elif order_by_time:
            report.records_out = _write_jsonl(output, ((line + b"\n", 1) for line, _ in
                                                       _ordered(_lines(merger.blocks(sources)))))
        else:
            report.records_out = _write_jsonl(output, ((block, n) for block, n, _ in merger.blocks(sources)))
        if cleanup_files:
            for path in sources:
                if path in (output, jsonl_output):
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
        logger.warning("consolidation of %s skipped %d torn or corrupt line(s): %s", workflow_id,
                       len(report.bad_lines), ", ".join(f"{p}:{n}" for p, n in report.bad_lines[:5]))
    report.elapsed_s = time.perf_counter() - began
    return report


def _lines(blocks: Iterator[Tuple[bytes, int, Optional[List[Optional[dict]]]]]
           ) -> Iterator[Tuple[bytes, Optional[dict]]]:
    for block, _count, parsed in blocks:
        lines = block.split(b"\n")[:-1]
        if parsed is None:
            for line in lines:
                yield line, None
        else:
            yield from zip(lines, parsed)


def _ordered(merged: Iterator[Tuple[bytes, Optional[dict]]]) -> Iterator[Tuple[bytes, Optional[dict]]]:
    """Order by started_at/timestamp (needs the records in memory: opt-in); the workflow stays last."""
    items = []
    for line, record in merged:
        parsed = record if record is not None else orjson.loads(line)
        if parsed.get("type") == "workflow":
            stamp = float("inf")
        else:
            stamp = parsed.get("started_at") or parsed.get("timestamp") or parsed.get("utc_timestamp") or 0
        items.append((stamp, line, record))
    items.sort(key=lambda item: item[0])
    for _, line, record in items:
        yield line, record


def _write_jsonl(output: str, blocks: Iterable[Tuple[bytes, int]]) -> int:
    """Write newline-terminated blocks to a temporary file, fsync, rename; returns the line count."""
    tmp = f"{output}.{os.getpid()}.tmp"
    count = 0
    try:
        with open(tmp, "wb", buffering=0) as handle:
            for block, lines in blocks:
                handle.write(block)
                count += lines
            os.fsync(handle.fileno())
        os.replace(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return count
