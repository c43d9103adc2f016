"""Memory sampler: virtual memory and swap of this machine, in bytes and percent."""

from __future__ import annotations

from typing import Any, Dict

from flowcept.telemetry._guard import FieldGuard, default_psutil


class MemorySampler:
    """Samples ``psutil.virtual_memory()`` and ``swap_memory()`` into flat unit-bearing fields."""

    name = "memory"

    def __init__(self, psutil: Any = None, swap: bool = True):
        self._ps = psutil or default_psutil()
        self.swap = swap
        self._guard = FieldGuard("memory")

    def sample(self) -> Dict[str, Any]:
        """Return virtual memory (and swap) figures; a failing call leaves its fields None."""
        vm = self._guard.call("virtual_memory", self._ps.virtual_memory)
        record: Dict[str, Any] = {
            "memory_total_bytes": getattr(vm, "total", None),
            "memory_available_bytes": getattr(vm, "available", None),
            "memory_used_bytes": getattr(vm, "used", None),
            "memory_free_bytes": getattr(vm, "free", None),
            "memory_percent": getattr(vm, "percent", None),
            "memory_cached_bytes": getattr(vm, "cached", None),
            "memory_buffers_bytes": getattr(vm, "buffers", None),
            "memory_shared_bytes": getattr(vm, "shared", None),
        }
        if self.swap:
            sw = self._guard.call("swap_memory", self._ps.swap_memory)
            record["swap_total_bytes"] = getattr(sw, "total", None)
            record["swap_used_bytes"] = getattr(sw, "used", None)
            record["swap_free_bytes"] = getattr(sw, "free", None)
            record["swap_percent"] = getattr(sw, "percent", None)
        return record
