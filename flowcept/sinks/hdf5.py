"""HDF5 sink: records buffered by the daemon and written as one HDF5 file at close.

HDF5 files are not safe to append to across a crash (a killed writer can corrupt the whole
file), so this sink keeps the lines in memory and writes the file once, atomically, through
:func:`flowcept.hdf5_store.write_hdf5` (the layout consolidation writes, see docs/). Use it
beside the JSONL sink, which is the durable one: ``daemon.sinks: [jsonl, hdf5]``. ``h5py`` is
imported only at close.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

logger = logging.getLogger(__name__)


class Hdf5Sink:
    """Collect JSONL lines; write ``path`` (an ``.h5`` file) on close."""

    name = "hdf5"

    def __init__(self, path: str, **_: Any):
        self.path = path
        self._lines: List[bytes] = []
        self._closed = False
        self.records_written = 0

    def write_lines(self, payload: bytes, count: int) -> None:
        """Keep whole JSONL lines (newline-terminated) for the file written at close."""
        if payload:
            self._lines.extend(payload.splitlines())
            self.records_written += count

    def write(self, records: List[Dict[str, Any]]) -> None:
        """Write a batch of record dicts."""
        from flowcept.serialization import dumps_line

        for record in records:
            self._lines.append(dumps_line(record)[:-1])
        self.records_written += len(records)

    def flush(self) -> None:
        """Nothing to make durable before close (see the module docstring)."""

    def close(self) -> None:
        """Write the HDF5 file once; idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self._lines:
            return
        from flowcept.hdf5_store import write_hdf5

        lines, self._lines = self._lines, []
        write_hdf5(self.path, ((line, None) for line in lines))
