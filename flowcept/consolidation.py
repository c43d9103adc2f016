"""Reading buffer files and merging every source of one workflow into one output.

Sources of a workflow ``W`` under the base path ``<dir>/<stem>.jsonl`` are:
``<stem>_W_<host>_<pid>.jsonl`` (per process), ``<stem>_W_node-<node>.jsonl`` (per node daemon)
and an earlier ``<stem>_W.jsonl`` (so a second run is idempotent). A file is taken only when
its content says it is ``W``'s: its first complete record with a workflow id carries ``W``
exactly (an id that merely shares a prefix stays out). Names are ambiguous (``<stem>_exp_3_vm_7``
may be ``exp``'s or ``exp_3``'s), so a file with no such record is never merged nor removed,
only reported (``MergeReport.skipped``).

Merging takes two streaming passes. The first reads each source in 2 MiB blocks and finds, with
one regex pass and no JSON parsing, the runs of our own canonical task and telemetry lines of
exactly this workflow, and which process id prefixes each source holds. Ids are a per-process
random prefix and a counter, and one writer appends each record to one source once, so a record
can only be a duplicate when its prefix is held by two sources (a batch spilled to the process's
file after the node daemon wrote it; an earlier output merged again). The second pass copies the
canonical runs of a source no other source shares a prefix with as they are (``copy_file_range``:
the kernel moves the bytes), and deduplicates the rest: ~one byte per record id (``SeenIds``: a
byte per counter value of each process's id prefix), ~70 bytes only for ids of another shape.
Lines of any other shape are parsed one by one. A torn or corrupt line costs that line only and
is reported (file and line number). Workflow records of the same id (start and end) are merged
into one, written last. The output is written to a temporary file and renamed; the merge holds
an exclusive lock file so two processes consolidating the same workflow take turns, and a source
file is removed only when no live writer holds its lock.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import re
import sys
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
    # (path, reason): files named like a source with no record naming their workflow; never
    # merged nor removed (their name may be another workflow's: see find_sources)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
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
    """The workflow id of the first complete record that carries one (None if no record does).

    A torn line does not parse, so it is no evidence, even when its head names a workflow.
    """
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


# The tail of a source's name after ``<stem>_<workflow>_``: ``<host>_<pid>`` (a process) or
# ``node-<node>`` (a node daemon). Hosts and node names may hold ``_`` (safe_name keeps it).
_PROCESS_TAIL = re.compile(r".+_[0-9]+")
_NODE_TAIL = re.compile(r"node-.+")


def _is_source_tail(tail: str) -> bool:
    return bool(_PROCESS_TAIL.fullmatch(tail) or _NODE_TAIL.fullmatch(tail))


def name_readings(tail: str) -> List[str]:
    """Every workflow-name suffix ``x`` such that ``<stem>_W<x>_<tail'>`` reads as a source name.

    ``tail`` is what follows ``<stem>_W_``; ``""`` in the result is the reading as W's own file,
    ``"_3"`` the reading as a file of workflow ``W_3`` (a process on host ``vm``, for the tail
    ``3_vm_7``). A name is W's alone when the result is exactly ``[""]``.
    """
    readings = [""] if _is_source_tail(tail) else []
    for cut in range(1, len(tail)):
        if tail[cut] == "_" and _is_source_tail(tail[cut + 1:]):
            readings.append("_" + tail[:cut])
    return readings


def find_sources(base_path: str, workflow_id: str, include_output: bool = True,
                 skipped: Optional[List[Tuple[str, str]]] = None) -> List[str]:
    """Every file holding records of exactly ``workflow_id`` under ``base_path``.

    A file ``<stem>_W_*`` is a source only when its content confirms W: the first complete
    record carrying a workflow id carries W itself. Its name cannot decide: ``<stem>_exp_3_vm_7``
    is a process of ``exp`` on host ``3_vm`` or one of ``exp_3`` on host ``vm``. A file with no
    such record (empty, only a torn line, only records without a workflow id) is not a source,
    so consolidation never merges nor removes it; it is appended to ``skipped`` as (path, reason).
    """
    directory, stem, suffix = split_base_path(base_path)
    wf = safe_name(workflow_id)
    output = os.path.join(directory, f"{stem}_{wf}{suffix}")
    head = f"{stem}_{wf}_"
    candidates = sorted(glob.glob(os.path.join(glob.escape(directory), glob.escape(head) + "*"
                                               + glob.escape(suffix))))
    sources = []
    for path in candidates:
        name = os.path.basename(path)
        if path.endswith(".tmp") or name.startswith("."):
            continue
        found = _first_workflow_id(path)
        if found == workflow_id:
            sources.append(path)
        elif found is None and skipped is not None:
            skipped.append((path, _unattributed_reason(path, wf, name[len(head):len(name) - len(suffix)])))
    if include_output and os.path.exists(output):
        sources.insert(0, output)
    return sources


def _unattributed_reason(path: str, wf: str, tail: str) -> str:
    """Why a file with no record naming its workflow was left alone (for the report)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    what = "empty" if size == 0 else "no complete record with a workflow id (torn or untagged lines only)"
    others = [wf + x for x in name_readings(tail) if x]
    if "" not in name_readings(tail):
        whose = "its name is not a source name of this workflow"
    elif others:
        whose = "its name also reads as a file of workflow " + ", ".join(repr(o) for o in others)
    else:
        whose = "its name is only this workflow's, but nothing in it can be merged"
    return f"{what}; {whose}: left in place"


# -- locks ------------------------------------------------------------------------------------------

def _size_or_none(path: str) -> Optional[int]:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


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


def _whole_lines(rest: bytes, data: bytes) -> Tuple[bytes, bytes]:
    """(the whole lines of ``rest`` + ``data``, the unterminated tail left for the next read)."""
    data = rest + data if rest else data
    cut = data.rfind(b"\n") + 1
    if cut == len(data):
        return data, b""
    return data[:cut], data[cut:]


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
            block, rest = _whole_lines(rest, data)
            if block:
                yield block, line_number
                line_number += block.count(b"\n")
    if rest.strip():
        if _parses(rest):
            yield rest + b"\n", line_number
        else:
            report.bad_lines.append((path, line_number))  # torn last line of a killed writer


_SCAN_BYTES = 2 * 1024 * 1024  # fresh pages cost ~5 ms per MiB on some VMs: a small buffer reused
_STAR = b"*+" if sys.version_info >= (3, 11) else b"*"  # possessive (no backtracking) from 3.11
_COPY_PIECE = 64 * 1024 * 1024
_MAX_SPANS = 4096  # more alternations of clean and other lines than this: the rest counts as other
_TASK_HEAD = b'{"type":"task","task_id":"'
_TELEMETRY_HEAD = b'{"type":"telemetry","telemetry_id":"'
_HEADS = re.compile(rb'\n\{"type":"(?:task|telemetry)","(?:task|telemetry)_id":"([0-9a-f]{16})\.')
_ANY_STD_ID = re.compile(rb'([0-9a-f]{16})\.[0-9]')


def _clean_lines(wf_quoted: bytes, prefixes: Iterable[bytes] = ()) -> re.Pattern:
    """A run of our own canonical task/telemetry lines of exactly this workflow.

    Possessive (no backtracking); ids of the given process prefixes (any when none are given).
    """
    return re.compile(b"(?:" + _clean_line(wf_quoted, prefixes) + b")" + _STAR)


def _clean_line(wf_quoted: bytes, prefixes: Iterable[bytes] = ()) -> bytes:
    """One canonical task/telemetry line of exactly this workflow, newline included."""
    ids = b"(?:" + b"|".join(prefixes) + b")" if prefixes else rb"[0-9a-f]{16}"
    return (rb'\{"type":"(?:task","task_id|telemetry","telemetry_id)":"' + ids + rb'\.[0-9]{1,15}",'
            rb'"workflow_id":' + re.escape(wf_quoted) + rb'[,}][^\n]' + _STAR + rb'\n')


class _CleanLines:
    """The patterns of one merge, cached.

    Clean lines of the prefixes a source is known to hold (one regex pass finds the run and
    proves which prefixes it holds), plus one for a line of any prefix.
    """

    _MAX_PREFIXES = 64  # beyond this, one pattern for any prefix and a findall for the prefixes

    def __init__(self, wf_quoted: bytes):
        self.wf_quoted = wf_quoted
        self.any = _clean_lines(wf_quoted)
        self.cache: Dict[Tuple[frozenset, bool], re.Pattern] = {}

    def known(self, prefixes: set, whole_block: bool = False) -> Optional[re.Pattern]:
        """A run of clean lines of these prefixes; ``whole_block``: one such line, for ``subn``."""
        if not prefixes or len(prefixes) > self._MAX_PREFIXES:
            return None
        key = (frozenset(prefixes), whole_block)
        pattern = self.cache.get(key)
        if pattern is None:
            if len(self.cache) > 256:
                self.cache.clear()
            ordered = sorted(key[0])
            pattern = self.cache[key] = (re.compile(_clean_line(self.wf_quoted, ordered)) if whole_block
                                         else _clean_lines(self.wf_quoted, ordered))
        return pattern


def _count_lines(buf: Any, start: int, end: int) -> int:
    """Newlines in ``buf[start:end]``.

    numpy's vectorised count when numpy is already loaded (importing it costs more than it
    saves below a few hundred MiB), else bytes.count.
    """
    np = sys.modules.get("numpy")
    if np is None:
        return buf.count(b"\n", start, end)
    return int(np.count_nonzero(np.frombuffer(buf, np.uint8, end - start, start) == 10))


@dataclass
class _Span:
    """A byte range of a source: ``clean`` when every line is a canonical record of the workflow."""

    start: int
    end: int
    first_line: int
    lines: int
    clean: bool
    tail: bool = False  # the last bytes of a file without a newline (a torn line, or one being written)


@dataclass
class _SourceScan:
    """What the first pass learnt about one source: its spans and the id prefixes it may hold."""

    path: str
    spans: List[_Span] = field(default_factory=list)
    prefixes: set = field(default_factory=set)
    opaque: bool = False  # an HDF5 source: read as a whole, deduplicated
    exclusive: bool = False
    size: int = -1  # the bytes the scan saw: cleanup removes the source only if it still has exactly these

    def add(self, start: int, end: int, first_line: int, lines: int, clean: bool) -> None:
        last = self.spans[-1] if self.spans else None
        if last is not None and last.end == start and (last.clean == clean or len(self.spans) >= _MAX_SPANS):
            last.end, last.lines, last.clean = end, last.lines + lines, last.clean and clean
        else:
            self.spans.append(_Span(start, end, first_line, lines, clean))


def _scan_block(scan: _SourceScan, buf: bytearray, cut: int, base: int, line: int, patterns: _CleanLines) -> int:
    """Split ``buf[:cut]`` (whole lines) into clean and other spans; returns the number of lines."""
    pos = 0
    total = 0
    tried_whole = False
    while pos < cut:
        whole = None if tried_whole else patterns.known(scan.prefixes, whole_block=True)
        if whole is not None:
            # The common case in one C pass: every line left a clean line of a prefix this
            # source is known to hold. Matches are contiguous from ``pos`` when nothing is left
            # over, so each line matched from its first byte; the substitutions count the lines.
            tried_whole = True
            with memoryview(buf) as view:
                left, lines = whole.subn(b"", view[pos:cut])
            if not left:
                scan.add(base + pos, base + cut, line + total, lines, True)
                return total + lines
        known = patterns.known(scan.prefixes)
        end = known.match(buf, pos, cut).end() if known is not None else pos  # type: ignore[union-attr]
        if end == pos:  # a clean line of a prefix not seen yet in this source, or another line
            head = _TASK_HEAD if buf.startswith(_TASK_HEAD, pos) else _TELEMETRY_HEAD
            prefix = bytes(buf[pos + len(head):pos + len(head) + 16])
            line_end = buf.find(b"\n", pos, cut) + 1
            if patterns.any.match(buf, pos, line_end).end() == line_end:
                if known is None and scan.prefixes:  # very many prefixes: any prefix, then findall
                    end = patterns.any.match(buf, pos, cut).end()  # type: ignore[union-attr]
                    scan.prefixes.update(_HEADS.findall(buf, pos, end))
                scan.prefixes.add(prefix)
                end = max(end, line_end)
        if end > pos:
            lines = _count_lines(buf, pos, end)
            scan.add(base + pos, base + end, line + total, lines, True)
            total += lines
            pos = end
            continue
        # A line of another shape: any id in it that looks like ours counts as held here.
        end = buf.find(b"\n", pos, cut) + 1
        scan.prefixes.update(_ANY_STD_ID.findall(buf, pos, end))
        scan.add(base + pos, base + end, line + total, 1, False)
        total += 1
        pos = end
    return total


def _scan_source(path: str, patterns: _CleanLines, buf: bytearray) -> _SourceScan:
    """First pass over one source: its spans and the id prefixes it holds.

    Clean spans are copied as they are when no other source can hold their records; other
    lines are parsed one by one.
    """
    scan = _SourceScan(path)
    if path.endswith((".h5", ".hdf5")):
        scan.opaque = True
        scan.size = os.path.getsize(path)
        return scan
    view = memoryview(buf)
    base = filled = 0
    line = 1
    try:
        with open(path, "rb", buffering=0) as handle:
            while True:
                if filled == len(buf):  # a line longer than the buffer
                    view.release()
                    buf.extend(bytes(len(buf)))
                    view = memoryview(buf)
                read = handle.readinto(view[filled:])
                if not read:
                    break
                filled += read
                cut = buf.rfind(b"\n", 0, filled) + 1
                if cut == 0:
                    continue
                line += _scan_block(scan, buf, cut, base, line, patterns)
                buf[:filled - cut] = view[cut:filled]
                base += cut
                filled -= cut
    finally:
        view.release()
    if filled:
        scan.spans.append(_Span(base, base + filled, line, 1, False, tail=True))
    scan.size = base + filled
    return scan


def _range_blocks(fd: int, start: int, end: int) -> Iterator[bytes]:
    """Blocks of whole lines of ``fd`` between two line boundaries, read with pread."""
    rest = b""
    offset = start
    while offset < end:
        data = os.pread(fd, min(_BLOCK_BYTES, end - offset), offset)
        if not data:
            break  # the file shrank under us
        offset += len(data)
        block, rest = _whole_lines(rest, data)
        if block:
            yield block
    if rest:
        yield rest


class _Merger:
    """The state of one merge: ids seen, workflow records, counters. Streams blocks of lines."""

    def __init__(self, workflow_id: str, report: MergeReport, progress: Optional[Callable[[int], None]]):
        self.workflow_id = workflow_id
        self.wf_quoted = orjson.dumps(workflow_id)
        self.wf_field = b'"workflow_id":' + self.wf_quoted
        self.report = report
        self.progress = progress
        self._seen: Optional[SeenIds] = None
        self.workflows: List[dict] = []
        self.merged_sizes: Dict[str, int] = {}  # source -> the bytes of it this merge took

    @property
    def seen(self) -> SeenIds:
        """Created on first use: a merge whose sources all copy as they are never imports numpy."""
        if self._seen is None:
            self._seen = SeenIds()
        return self._seen

    def blocks(self, sources: List[str], copy_ok: bool = False) -> Iterator[Tuple[Any, ...]]:
        """Yield (lines joined with newlines, count, parsed records or None) of distinct records.

        Two passes. The first (:func:`_scan_source`) finds, per source, the spans of canonical
        lines of this workflow and the id prefixes the source holds. Ids are a per-process random
        prefix and a counter, and one writer appends each record to one source once, so a record
        can only be a duplicate if its prefix is held by two sources (a batch spilled to the
        process's file after the node daemon wrote it, an earlier output merged again). The
        second pass therefore copies the clean spans of a source whose prefixes no other source
        holds as they are (with ``copy_ok``: ("copy", fd, start, end, lines) items the JSONL
        writer hands to the kernel), and deduplicates everything else.
        """
        patterns = _CleanLines(self.wf_quoted)
        buf = bytearray(_SCAN_BYTES)
        scans = []
        for path in sources:
            try:
                scans.append(_scan_source(path, patterns, buf))
            except FileNotFoundError:
                logger.warning("source %s vanished during consolidation", path)
        holders: Dict[bytes, int] = {}
        for scan in scans:
            for prefix in scan.prefixes:
                holders[prefix] = holders.get(prefix, 0) + 1
        opaque = any(scan.opaque for scan in scans)
        for scan in scans:
            scan.exclusive = not opaque and all(holders[prefix] == 1 for prefix in scan.prefixes)
            self.merged_sizes[scan.path] = scan.size
        for scan in scans:
            try:
                if scan.opaque:
                    for block, first_line in _file_blocks(scan.path, self.report):
                        if self.progress is not None:
                            self.progress(len(block))
                        yield from self._block(scan.path, block, first_line)
                    continue
                yield from self._scanned(scan, copy_ok)
            except FileNotFoundError:
                logger.warning("source %s vanished during consolidation", scan.path)
        if self.workflows:
            yield orjson.dumps(merge_workflow_records(self.workflows)) + b"\n", 1, None

    def _scanned(self, scan: _SourceScan, copy_ok: bool) -> Iterator[Tuple[Any, ...]]:
        progress = self.progress
        fd = os.open(scan.path, os.O_RDONLY)
        try:
            for span in scan.spans:
                if span.tail:
                    if progress is not None:
                        progress(span.end - span.start)
                    rest = os.pread(fd, span.end - span.start, span.start)
                    if not rest.strip():
                        continue
                    if _parses(rest):
                        yield from self._slow_block(scan.path, rest + b"\n", span.first_line)
                    else:
                        self.report.bad_lines.append((scan.path, span.first_line))  # torn by a kill
                    continue
                if span.clean and scan.exclusive:
                    self.report.records_in += span.lines
                    if copy_ok:  # in pieces, so a progress bar moves during a long copy
                        for start in range(span.start, span.end, _COPY_PIECE):
                            end = min(start + _COPY_PIECE, span.end)
                            if progress is not None:
                                progress(end - start)
                            yield ("copy", fd, start, end, span.lines if end == span.end else 0)
                    else:
                        for block in _range_blocks(fd, span.start, span.end):
                            if progress is not None:
                                progress(len(block))
                            yield block, -1, None  # -1: not counted (the consumers split the lines)
                    continue
                line = span.first_line
                for block in _range_blocks(fd, span.start, span.end):
                    if progress is not None:
                        progress(len(block))
                    if span.clean:
                        yield from self._block(scan.path, block, line)
                    else:
                        yield from self._slow_block(scan.path, block, line)
                    line += block.count(b"\n")
        finally:
            os.close(fd)

    def _block(self, path: str, block: bytes, first_line: int
               ) -> Iterator[Tuple[bytes, int, Optional[List[Optional[dict]]]]]:
        lines = block.count(b"\n")
        first = _FAST_FIRST.match(block)
        matches = _FAST_NEXT.findall(block) if first is not None else []
        if first is not None:
            matches.insert(0, first.groups())
        if len(matches) == lines and matches:
            kinds, prefixes, counters, workflows = zip(*matches)
            if workflows.count(self.wf_quoted) == lines:
                self.report.records_in += lines
                keep = self.seen.add_block(kinds, prefixes, counters)
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
            if key is not None and not self.seen.add_key(key):
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
                    report: MergeReport, known: Optional[Tuple[int, int]] = None) -> bool:
    """The single-source fast path: update the padded first line, rename. False if it does not apply.

    ``known`` (bytes, lines): the writer vouches that the file holds exactly that, written by
    it as whole lines with one workflow record: when the size still matches, no read-back.
    """
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
            trusted = known is not None and os.fstat(handle.fileno()).st_size == known[0]
            if trusted:
                lines = known[1]
            while not trusted:
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
                extra_sources: Optional[List[str]] = None, workflow_update: Optional[dict] = None,
                parse_worker: Optional[bool] = None,
                known_files: Optional[Dict[str, Tuple[int, int]]] = None) -> MergeReport:
    """Merge every source of ``workflow_id`` into one file; idempotent; returns a report.

    ``progress`` is called with the number of input bytes consumed (a progress bar's update).
    ``order_by_time`` sorts by ``started_at``/``timestamp``; it holds the records in memory.
    ``parse_worker``: HDF5 output may parse task columns in a helper process (default: the
    ``project.hdf5_parse_worker`` setting). ``known_files``: path -> (bytes, lines) of files
    their writer vouches for (see :func:`_merge_in_place`).
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
        sources = find_sources(base_path, workflow_id, skipped=report.skipped)
        if report.skipped:
            logger.warning("consolidation of %s left %d file(s) it cannot attribute in place: %s", workflow_id,
                           len(report.skipped), "; ".join(f"{p} ({why})" for p, why in report.skipped[:5]))
        if os.path.exists(output) and output not in sources:
            sources.insert(0, output)  # an earlier HDF5 output: a second run is idempotent
        for extra in extra_sources or ():
            if extra not in sources and os.path.exists(extra):
                sources.append(extra)
        if not sources:
            unattributed = (f" ({len(report.skipped)} file(s) named like it hold no record of it)"
                            if report.skipped else "")
            raise FileNotFoundError(
                f"no Flowcept files of workflow '{workflow_id}' next to {os.path.abspath(base_path)}{unattributed}")
        report.sources = list(sources)
        if (output_format == "jsonl" and cleanup_files and not order_by_time and len(sources) == 1
                and sources[0] != output and _is_unlocked(sources[0])
                and _merge_in_place(sources[0], output, workflow_id, workflow_update, report,
                                    (known_files or {}).get(sources[0]))):
            report.elapsed_s = time.perf_counter() - began
            return report
        merger = _Merger(workflow_id, report, progress)
        if workflow_update:
            merger.workflows.append(dict(workflow_update))
        if output_format == "hdf5":
            from flowcept.hdf5_store import write_hdf5, write_hdf5_blocks

            if parse_worker is None:
                from flowcept.settings import load_settings

                parse_worker = bool(load_settings()["project.hdf5_parse_worker"])
            if order_by_time:
                report.records_out = write_hdf5(output, _ordered(_lines(merger.blocks(sources))),
                                                workflow_id=workflow_id, parse_worker=parse_worker)
            else:
                report.records_out = write_hdf5_blocks(output, merger.blocks(sources), workflow_id=workflow_id,
                                                       parse_worker=parse_worker)
        elif order_by_time:
            report.records_out = _write_jsonl(output, ((line + b"\n", 1, None) for line, _ in
                                                       _ordered(_lines(merger.blocks(sources)))))
        else:
            report.records_out = _write_jsonl(output, merger.blocks(sources, copy_ok=True))
        if cleanup_files:
            for path in sources:
                if path in (output, jsonl_output):
                    continue
                # Unlocked is not enough: a writer may have appended after the scan, then closed.
                if _is_unlocked(path) and _size_or_none(path) == merger.merged_sizes.get(path):
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


def _write_jsonl(output: str, blocks: Iterable[Tuple[Any, ...]]) -> int:
    """Write blocks to a temporary file, fsync, rename; returns the line count.

    Items are (newline-terminated block, lines, ...) or ("copy", fd, start, end, lines): a range
    of a source the kernel copies.
    """
    tmp = f"{output}.{os.getpid()}.tmp"
    count = 0
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            for item in blocks:
                if item[0] == "copy":
                    _, fd, start, end, lines = item
                    _copy_range(fd, out, start, end)
                    count += lines
                else:
                    block, lines = item[0], item[1]
                    view = memoryview(block)
                    while view:
                        view = view[os.write(out, view):]
                    count += lines
            os.fsync(out)
        finally:
            os.close(out)
        os.replace(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return count


def _copy_range(src: int, out: int, start: int, end: int) -> None:
    """Append ``src[start:end]`` to ``out`` in the kernel (copy_file_range, else sendfile, else pread)."""
    offset = start
    for method in ("copy_file_range", "sendfile"):
        call = getattr(os, method, None)
        if call is None:
            continue
        try:
            while offset < end:
                if method == "copy_file_range":
                    done = call(src, out, end - offset, offset)
                else:
                    done = call(out, src, offset, end - offset)
                if done <= 0:
                    break
                offset += done
            if offset >= end:
                return
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
    while offset < end:
        data = os.pread(src, min(_BLOCK_BYTES, end - offset), offset)
        if not data:
            raise OSError(errno.EIO, f"source shrank during consolidation (at byte {offset})")
        view = memoryview(data)
        while view:
            view = view[os.write(out, view):]
        offset += len(data)
