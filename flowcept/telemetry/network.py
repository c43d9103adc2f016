"""Network sampler: summed I/O counters and per-interface counters of the interfaces that moved.

An interface "moved" once its byte counters change after the sampler starts; from then on it
stays in the report, so a time series does not flicker. Idle interfaces (docker bridges, down
links) are left out, which keeps a node with many virtual interfaces cheap to store.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Set, Tuple

from flowcept.telemetry._guard import FieldGuard, default_psutil

_FIELDS = ("bytes_sent", "bytes_recv", "packets_sent", "packets_recv", "errin", "errout", "dropin", "dropout")


class NetworkSampler:
    """Samples ``psutil.net_io_counters(pernic=True)``: totals and moving interfaces."""

    name = "network"

    def __init__(self, psutil: Any = None, per_interface: bool = True):
        self._ps = psutil or default_psutil()
        self._guard = FieldGuard("network")
        self.per_interface = per_interface
        self._moved: Set[str] = set()
        self._first: Dict[str, Tuple[int, int]] = {}
        counters = self._guard.call("net_io_counters", self._ps.net_io_counters, pernic=True) or {}
        for nic, c in counters.items():
            self._first[nic] = (c.bytes_sent, c.bytes_recv)

    def sample(self) -> Dict[str, Any]:
        """Return totals over all interfaces and, per moving interface, its counters."""
        counters: Optional[Dict[str, Any]] = self._guard.call(
            "net_io_counters", self._ps.net_io_counters, pernic=True)
        record: Dict[str, Any] = {}
        if counters is None:
            for name in _FIELDS:
                record[f"net_{name}"] = None
            if self.per_interface:
                record["net_interfaces"] = None
            return record
        totals = dict.fromkeys(_FIELDS, 0)
        per: Dict[str, Dict[str, int]] = {}
        for nic, c in counters.items():
            for name in _FIELDS:
                totals[name] += getattr(c, name, 0) or 0
            if nic not in self._moved:
                first = self._first.setdefault(nic, (c.bytes_sent, c.bytes_recv))
                if first != (c.bytes_sent, c.bytes_recv):
                    self._moved.add(nic)
            if self.per_interface and nic in self._moved:
                per[nic] = {name: getattr(c, name, None) for name in _FIELDS}
        for name in _FIELDS:
            record[f"net_{name}"] = totals[name]
        if self.per_interface:
            record["net_interfaces"] = per
        return record
