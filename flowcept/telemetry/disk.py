"""Disk sampler: usage of the mounts that matter to the run, and machine-wide I/O counters.

The mounts are those holding the given paths (by default ``/``, the working directory and
the output directory), resolved once to their mount points and de-duplicated, so a node with
hundreds of mounts (parallel filesystems, containers) costs a handful of ``statvfs`` calls.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional

from flowcept.telemetry._guard import FieldGuard, default_psutil


def _mount_of(path: str, mountpoints: List[str]) -> str:
    real = os.path.realpath(path)
    best = "/"
    for mount in mountpoints:
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best = mount
    return best


class DiskSampler:
    """Samples usage of the mounts holding ``paths`` and the summed disk I/O counters."""

    name = "disk"

    def __init__(self, psutil: Any = None, paths: Optional[Iterable[str]] = None, io: bool = True):
        self._ps = psutil or default_psutil()
        self._guard = FieldGuard("disk")
        self.io = io
        wanted = ["/", os.getcwd()] + [p for p in (paths or []) if p]
        partitions = self._guard.call("disk_partitions", self._ps.disk_partitions, all=False) or []
        mountpoints = [p.mountpoint for p in partitions]
        self.mounts: Dict[str, str] = {}  # mount point -> first path that led to it
        for path in wanted:
            probe = path
            while probe and not os.path.exists(probe):  # the output directory may not exist yet
                parent = os.path.dirname(probe)
                probe = parent if parent != probe else "/"
            mount = _mount_of(probe or "/", mountpoints)
            self.mounts.setdefault(mount, path)

    def sample(self) -> Dict[str, Any]:
        """Return per-mount usage (bytes, percent) and summed I/O counters (bytes, counts, ms)."""
        usage = []
        for mount, path in self.mounts.items():
            du = self._guard.call(f"disk_usage({mount})", self._ps.disk_usage, mount)
            usage.append({
                "mountpoint": mount,
                "path": path,
                "total_bytes": getattr(du, "total", None),
                "used_bytes": getattr(du, "used", None),
                "free_bytes": getattr(du, "free", None),
                "percent": getattr(du, "percent", None),
            })
        record: Dict[str, Any] = {"disk_usage": usage}
        if self.io:
            io = self._guard.call("disk_io_counters", self._ps.disk_io_counters, perdisk=False)
            record.update({
                "disk_read_bytes": getattr(io, "read_bytes", None),
                "disk_write_bytes": getattr(io, "write_bytes", None),
                "disk_read_count": getattr(io, "read_count", None),
                "disk_write_count": getattr(io, "write_count", None),
                "disk_read_time_ms": getattr(io, "read_time", None),
                "disk_write_time_ms": getattr(io, "write_time", None),
                "disk_busy_time_ms": getattr(io, "busy_time", None),
            })
        return record
