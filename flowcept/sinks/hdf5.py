"""HDF5 sink: records written by the daemon into one HDF5 file, renamed into place at close.

HDF5 files are not safe to append to across a crash (a killed writer can corrupt the whole
file), so this sink streams into a temporary file through
:class:`flowcept.hdf5_store.Hdf5Writer` (the layout consolidation writes, see docs/) and renames
it to ``path`` only at close: a killed daemon leaves no half-written ``path``. Rows are written
to the temporary file in blocks as they arrive, so memory stays bounded however long the run.
Use it beside the JSONL sink, which is the durable one: ``daemon.sinks: [jsonl, hdf5]``.
``h5py`` is imported at the first write. Called from the daemon's writer thread only.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

logger = logging.getLogger(__name__)


class Hdf5Sink:
    """Stream JSONL lines into ``path`` (an ``.h5`` file), complete at close."""

    name = "hdf5"

    def __init__(self, path: str, **_: Any):
        self.path = path
        self._writer: Optional[Any] = None
        self._closed = False
        self.records_written = 0

    def _open(self) -> Any:
        if self._writer is None:
            from flowcept.hdf5_store import Hdf5Writer

            self._writer = Hdf5Writer(self.path)
        return self._writer

    def write_lines(self, payload: bytes, count: int) -> None:
        """Add whole JSONL lines (newline-terminated)."""
        if payload and not self._closed:
            if not payload.endswith(b"\n"):
                payload += b"\n"
            self._open().add_block(payload)
            self.records_written += count

    def write(self, records: List[Dict[str, Any]]) -> None:
        """Write a batch of record dicts."""
        if not records or self._closed:
            return
        from flowcept.serialization import dumps_line

        self._open().add_lines([dumps_line(record)[:-1] for record in records])
        self.records_written += len(records)

    def flush(self) -> None:
        """Nothing to make durable before close (see the module docstring)."""

    def close(self) -> None:
        """Finish the HDF5 file and rename it into place; idempotent."""
        if self._closed:
            return
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
