"""The disk spool where MongoDB-bound records wait while the database is unreachable.

A spool is a directory of segment files, one per batch, named ``<time_ns>-<pid>-<seq>.jsonl``
so that their names sort in the order they were written (across processes too). A segment is
written to a temporary name and renamed, so a reader only ever sees whole segments. Draining
holds an exclusive ``flock`` on ``.drain.lock``: two processes sharing a spool take turns, and
a segment is removed only after the database acknowledged all of its records (a replay after a
crash rewrites records the database may already hold, which the MongoDB writes make idempotent).

The spool is bounded by ``max_bytes``: a batch that would pass the bound is refused, counted and
logged; the records stay in the JSONL files the pipeline and the node daemon write, from which
``flowcept.sinks.mongodb.load_workflow`` reloads a workflow.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional

import orjson

logger = logging.getLogger(__name__)

_SUFFIX = ".jsonl"
_SEQ = itertools.count()  # per process: sinks of one process share a spool directory


class Spool:
    """A bounded, ordered, multi-process directory of record batches."""

    def __init__(self, directory: str, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes
        self.refused_records = 0
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def segments(self) -> List[str]:
        """The segment files, oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return [os.path.join(self.directory, n) for n in sorted(names)
                if n.endswith(_SUFFIX) and not n.startswith(".")]

    def is_empty(self) -> bool:
        return not self.segments()

    def size_bytes(self) -> int:
        total = 0
        for path in self.segments():
            try:
                total += os.path.getsize(path)
            except OSError:
                pass
        return total

    def append(self, records: List[Dict[str, Any]]) -> bool:
        """Write a batch as one new segment; False (records counted as refused) past the bound."""
        if not records:
            return True
        from flowcept.serialization import dumps_line

        payload = b"".join(dumps_line(r) for r in records)
        if self.size_bytes() + len(payload) > self.max_bytes:
            self.refused_records += len(records)
            logger.error("MongoDB spool %s is full (%d bytes max): %d record(s) not spooled; they are "
                         "still in the workflow's JSONL files (reload with load_workflow)",
                         self.directory, self.max_bytes, len(records))
            return False
        name = f"{time.time_ns():020d}-{os.getpid():08d}-{next(_SEQ):08d}{_SUFFIX}"
        final = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, "." + name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        return True

    def drain(self, write: Callable[[List[Dict[str, Any]]], Any]) -> Optional[bool]:
        """Replay every segment, oldest first, through ``write`` and remove it once written.

        Returns True when the spool is empty afterwards, False when ``write`` raised (the segment
        that failed and those after it are kept, in order; the error propagates), None when
        another process is draining.
        """
        lock_path = os.path.join(self.directory, ".drain.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return None
            for path in self.segments():
                try:
                    with open(path, "rb") as handle:
                        records = [orjson.loads(line) for line in handle if line.strip()]
                except FileNotFoundError:
                    continue  # drained by a process that held the lock before us
                except orjson.JSONDecodeError:
                    logger.error("corrupt MongoDB spool segment %s moved aside", path)
                    os.replace(path, path + ".corrupt")
                    continue
                write(records)
                os.unlink(path)
            return True
        finally:
            os.close(fd)
