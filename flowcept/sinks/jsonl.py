"""JSONL sink: the node daemon's default, one file per node per workflow, appended in large writes.

Fsync policy: every ``write_lines`` goes to the kernel with ``os.write`` on an ``O_APPEND``
descriptor before the daemon acknowledges the batch, so a killed daemon loses nothing it
acknowledged (the page cache survives the process). ``flush()`` fsyncs (``fsync="flush"``, the
default): the daemon flushes when clients say goodbye, every ``fsync_interval_s`` while data
arrives, and at shutdown; ``fsync="never"`` leaves it to the kernel. The file holds a shared
flock while open, so consolidation never removes it under a live writer.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

from flowcept.transport import append_whole, hold_writer_lock

logger = logging.getLogger(__name__)


class JsonlSink:
    """Append JSONL to ``path``; ``write_lines`` takes ready-made lines (the daemon's fast path)."""

    name = "jsonl"

    def __init__(self, path: str, fsync: str = "flush", **_: Any):
        if fsync not in ("never", "flush"):
            raise ValueError(f"JsonlSink fsync must be 'never' or 'flush', got {fsync!r}")
        self.path = path
        self.fsync = fsync
        self._fd: Optional[int] = None
        self._dirty = False
        self.records_written = 0
        self.bytes_written = 0

    def _open(self) -> int:
        if self._fd is None:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
            hold_writer_lock(fd)
            self._fd = fd
        return self._fd

    def write_lines(self, payload: bytes, count: int) -> None:
        """Append whole JSONL lines."""
        if payload:
            self.write_many((payload,), count)

    def write_many(self, payloads: Sequence[Any], count: int) -> None:
        """Append several JSONL payloads in one ``os.writev``, all or nothing (see ``append_whole``).

        Payloads are bytes-like: the daemon passes the ZeroMQ frames it received, unchanged. A
        failed batch leaves no trace in the file: the daemon nacks it and the client keeps it.
        """
        self.bytes_written += append_whole(self._open(), payloads, self.path)
        self._dirty = True
        self.records_written += count

    def write(self, records: List[Dict[str, Any]]) -> None:
        """Write a batch of record dicts."""
        if not records:
            return
        from flowcept.serialization import dumps_line

        self.write_lines(b"".join(dumps_line(record) for record in records), len(records))

    def flush(self) -> None:
        """Fsync what was written since the last flush (policy ``flush``)."""
        if self._fd is not None and self._dirty and self.fsync == "flush":
            try:
                os.fsync(self._fd)
            except OSError as error:
                logger.warning("fsync of %s failed: %s", self.path, error)
        self._dirty = False

    def close(self) -> None:
        """Flush and close the file; idempotent."""
        if self._fd is None:
            return
        self.flush()
        fd, self._fd = self._fd, None
        os.close(fd)
