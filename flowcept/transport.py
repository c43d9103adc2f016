"""Where flushed batches go: the per-process JSONL file (offline default and fallback).

A transport takes JSONL payloads (whole lines, newline-terminated) per workflow. The file
transport appends them with ``os.write`` on an ``O_APPEND`` descriptor: no Python-level
buffering, so a signal handler that flushes in the middle of another flush cannot corrupt
a line, and a killed process leaves only whole batches plus at most one torn last line.
The daemon link (``flowcept.daemon_link``) has the same interface and falls back to this one.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import threading
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

from flowcept.threads import start_background

logger = logging.getLogger(__name__)


def hold_writer_lock(fd: int) -> None:
    """Hold a shared flock while writing: consolidation never deletes a file a live writer holds."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # filesystems without flock: nothing to protect with
        pass

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_RETRY_LIMIT_BYTES = 64 * 1024 * 1024
# fsync policy "stop": the flusher syncs file data in the background past this many unsynced
# bytes, so the sync at stop() (which the job waits for) only has the last few MiB left.
_BACKGROUND_SYNC_BYTES = 4 * 1024 * 1024

# Data (and the size needed to read it back), not the inode's timestamps: what a killed job
# or a crashed node needs, for less I/O than fsync.
_datasync = getattr(os, "fdatasync", os.fsync)


def append_whole(fd: int, payloads: Sequence[Any], path: str = "") -> int:
    """Append bytes-like ``payloads`` to ``fd`` (``os.writev``, no joined copy): all or nothing.

    A write cut short (disk full, quota) is truncated back to where the batch began before the
    error propagates: a retry must not write the batch's first lines twice, and a torn line would
    glue itself to the next batch's first record. The caller must be the file's only appender.
    Returns the bytes written.
    """
    begin = os.fstat(fd).st_size
    total = 0
    try:
        for start in range(0, len(payloads), 512):  # IOV_MAX is 1024 on Linux
            chunk = payloads[start:start + 512]
            size = sum(len(p) for p in chunk)
            written = os.writev(fd, chunk)
            if written < size:  # short write (signal, full disk): finish the rest piece by piece
                view = memoryview(b"".join(chunk))[written:]
                while view:
                    view = view[os.write(fd, view):]
            total += size
    except OSError:
        if total or os.fstat(fd).st_size != begin:
            try:
                os.ftruncate(fd, begin)
            except OSError as error:
                logger.error("could not take back a partly written batch (%s): its first lines may "
                             "appear twice in %s", error, path or f"fd {fd}")
        raise
    return total


def safe_name(text: str) -> str:
    """Make an id usable inside a file name (ids with '/' or spaces stay distinct enough)."""
    return _UNSAFE.sub("-", text)


def split_base_path(base_path: str) -> Tuple[str, str, str]:
    """Return (directory, stem, suffix) of the configured buffer path (a directory: files inside it)."""
    from flowcept.settings import buffer_file_path  # explicit paths (CLI --path) follow the setting's rule

    directory, name = os.path.split(os.path.abspath(buffer_file_path(base_path)))
    stem, suffix = os.path.splitext(name)
    return directory, stem, suffix or ".jsonl"


def process_file_path(base_path: str, workflow_id: Optional[str], hostname: str, pid: int) -> str:
    """``<dir>/<stem>_<workflow_id>_<host>_<pid>.jsonl``: one file per process and workflow."""
    directory, stem, suffix = split_base_path(base_path)
    wf = safe_name(workflow_id) if workflow_id else "no-workflow"
    return os.path.join(directory, f"{stem}_{wf}_{safe_name(hostname)}_{pid}{suffix}")


class Transport(Protocol):
    """What the flusher hands batches to."""

    def send(self, workflow_id: Optional[str], payload: bytes, count: int) -> None:
        """Deliver ``count`` records (JSONL ``payload``) of one workflow; never raises."""

    def flush(self, durable: bool = False) -> None:
        """Make delivered records visible (and durable when asked)."""

    def close_workflow(self, workflow_id: Optional[str]) -> None:
        """The workflow's run ended in this process: flush and release its resources."""

    def close(self) -> None:
        """Release everything; idempotent."""


class FileTransport:
    """Append batches to per-process, per-workflow JSONL files."""

    inline_sends = True  # writes land in the page cache: the capturing thread may flush itself

    def __init__(self, base_path: str, hostname: str, fsync: str = "stop"):
        self.base_path = base_path
        self.hostname = hostname
        self.fsync_policy = fsync
        self.pid = os.getpid()
        self._fds: Dict[Optional[str], int] = {}
        self._paths: Dict[Optional[str], str] = {}
        self._known: Dict[Optional[str], Optional[List[int]]] = {}  # workflow -> [bytes, lines] we wrote
        self._pending: List[Tuple[Optional[str], bytes, int]] = []  # payloads a failed write kept
        self._pending_bytes = 0
        self._lock = threading.RLock()
        self.records_written = 0
        self.records_failed = 0
        self.records_dropped = 0
        self._error_logged = False
        self._unsynced_bytes = 0
        self._unsynced: set = set()  # workflow ids written to since the last sync
        self._to_sync: set = set()  # paths the sync thread is to sync
        self._sync_thread: Optional[threading.Thread] = None
        self._sync_wake = threading.Event()
        self._sync_stop = False

    def path_for(self, workflow_id: Optional[str]) -> str:
        path = self._paths.get(workflow_id)
        if path is None:
            path = process_file_path(self.base_path, workflow_id, self.hostname, self.pid)
            self._paths[workflow_id] = path
        return path

    def paths(self) -> List[str]:
        return list(self._paths.values())

    def _fd(self, workflow_id: Optional[str]) -> int:
        fd = self._fds.get(workflow_id)
        if fd is None:
            path = self.path_for(workflow_id)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
            hold_writer_lock(fd)
            self._fds[workflow_id] = fd
            size = os.fstat(fd).st_size
            known = self._known.get(workflow_id)
            # What this transport wrote is all the file holds: from empty, or where it left off.
            self._known[workflow_id] = [0, 0] if size == 0 else (known if known and known[0] == size else None)
        return fd

    def _write(self, workflow_id: Optional[str], payload: bytes, count: int) -> None:
        """Append the whole batch or nothing (consolidation assumes no line twice in one file)."""
        append_whole(self._fd(workflow_id), (payload,), self.path_for(workflow_id))
        self._unsynced_bytes += len(payload)
        self._unsynced.add(workflow_id)
        known = self._known.get(workflow_id)
        if known is not None:
            known[0] += len(payload)
            known[1] += count

    def written(self, workflow_id: Optional[str]) -> Optional[Tuple[str, int, int]]:
        """(path, bytes, lines) when this transport wrote every byte of the workflow's file, else None.

        Lets stop() trust the file without reading it back (consolidation checks the size is
        still that). None while a batch waits for a retry, or when the file held data before.
        """
        with self._lock:
            known = self._known.get(workflow_id)
            if known is None or any(w == workflow_id for w, _, _ in self._pending):
                return None
            return self.path_for(workflow_id), known[0], known[1]

    def send(self, workflow_id: Optional[str], payload: bytes, count: int) -> None:
        with self._lock:
            if self._pending:
                self._retry_pending()
            try:
                self._write(workflow_id, payload, count)
            except OSError as error:
                self._keep(workflow_id, payload, count, error)
                return
            self.records_written += count
            if self.fsync_policy == "flush":
                try:  # the batch is written: a failed sync must not make a retry write it again
                    _datasync(self._fds[workflow_id])
                    self._unsynced.discard(workflow_id)
                except OSError as error:
                    logger.warning("fdatasync of %s failed: %s", self.path_for(workflow_id), error)

    def _keep(self, workflow_id: Optional[str], payload: bytes, count: int, error: OSError) -> None:
        """A write failed (full disk, quota, vanished directory): keep the batch for a retry."""
        self.records_failed += count
        if not self._error_logged:
            reason = "disk full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else str(error)
            logger.error("cannot write provenance to %s (%s); keeping records in memory and retrying",
                         self.path_for(workflow_id), reason)
            self._error_logged = True
        if self._pending_bytes + len(payload) > _RETRY_LIMIT_BYTES:
            self.records_dropped += count
            logger.error("retry buffer full: dropped %d records (%d dropped in total)", count,
                         self.records_dropped)
            return
        self._pending.append((workflow_id, payload, count))
        self._pending_bytes += len(payload)

    def _retry_pending(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for index, (workflow_id, payload, count) in enumerate(pending):
            try:
                self._write(workflow_id, payload, count)
            except OSError:
                self._pending = pending[index:]
                self._pending_bytes = sum(len(p) for _, p, _ in self._pending)
                return
            self.records_failed -= count
            self.records_written += count
        if self._error_logged:
            logger.warning("provenance writes recovered")
            self._error_logged = False

    def background(self) -> None:
        """Have data past ``_BACKGROUND_SYNC_BYTES`` synced (fsync policy "stop"); called by the flusher.

        Cheap: the sync itself runs in a thread of its own (started on first use), so the
        flusher goes on draining while the disk works.
        """
        if self.fsync_policy != "stop" or self._unsynced_bytes < _BACKGROUND_SYNC_BYTES:
            return
        with self._lock:
            paths = [self._paths[w] for w in self._unsynced if w in self._fds]
            self._unsynced.clear()
            self._unsynced_bytes = 0
        if not paths:
            return
        self._to_sync.update(paths)
        thread = self._sync_thread
        if thread is None or not thread.is_alive():
            thread = self._sync_thread = start_background(
                threading.Thread(target=self._sync_loop, name="flowcept-sync", daemon=True))
        self._sync_wake.set()

    def _sync_loop(self) -> None:
        """The sync thread: data syncs of the paths ``background()`` hands over, until close().

        Each sync runs on a descriptor of its own, opened read-only by path: a ``dup`` would
        share the writer's flock (a consolidation starting meanwhile would take the file for a
        live writer's), and a workflow closed meanwhile cannot have its descriptor number
        reused under us. A path renamed by a consolidation is skipped (its sync is the merge's).
        """
        wake = self._sync_wake
        while not self._sync_stop:
            wake.wait()
            wake.clear()
            while self._to_sync:
                path = self._to_sync.pop()
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    continue
                try:
                    _datasync(fd)
                except OSError:
                    pass
                finally:
                    os.close(fd)

    def flush(self, durable: bool = False) -> None:
        with self._lock:
            if self._pending:
                self._retry_pending()
            if durable or self.fsync_policy == "flush":
                for workflow_id in list(self._unsynced):
                    fd = self._fds.get(workflow_id)
                    if fd is not None:
                        try:
                            _datasync(fd)
                        except OSError:
                            pass
                self._unsynced.clear()
                self._unsynced_bytes = 0

    def close_workflow(self, workflow_id: Optional[str]) -> None:
        with self._lock:
            if self._pending:
                self._retry_pending()
            fd = self._fds.pop(workflow_id, None)
            if fd is not None:
                try:
                    # One data sync of the final file: what a job killed after stop() needs.
                    if self.fsync_policy != "never":
                        _datasync(fd)  # also when a background sync may still be running
                finally:
                    self._unsynced.discard(workflow_id)
                    os.close(fd)

    def close(self) -> None:
        with self._lock:
            for workflow_id in list(self._fds):
                self.close_workflow(workflow_id)
        self._sync_stop = True
        self._sync_wake.set()

    def abandon(self) -> None:
        """Forget descriptors inherited through fork without touching the parent's files."""
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._paths.clear()
        self._pending.clear()
        self._pending_bytes = 0
        self._unsynced.clear()
        self._unsynced_bytes = 0
        self._to_sync.clear()
        self._sync_thread = None  # the parent's; not running in this process


class MemoryOnlyTransport:
    """project.dump_buffer.enabled: false and no daemon: records live only in get_buffer()'s view."""

    records_written = 0

    def send(self, workflow_id: Optional[str], payload: bytes, count: int) -> None:
        self.records_written += count

    def flush(self, durable: bool = False) -> None:
        pass

    def close_workflow(self, workflow_id: Optional[str]) -> None:
        pass

    def close(self) -> None:
        pass
