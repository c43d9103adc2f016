"""CPU sampler: utilisation (overall and per CPU), times, frequency and load average.

Utilisation is computed from the difference of two ``cpu_times`` readings owned by this
sampler (never psutil's module-global ``cpu_percent`` state, which other code shares), over at
least ``min_interval_s``. The first reading is taken when the sampler is built; if ``sample()``
comes sooner than ``min_interval_s`` after it, the sampler waits out the remainder once, so the
meaningless first 0.0 is never reported (with ``wait_first=False`` the first value is None
instead, for callers that must not block). Later calls closer together than ``min_interval_s``
repeat the last measured value instead of dividing by a tiny interval.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

from flowcept.telemetry._guard import FieldGuard, default_psutil

_NOT_BUSY = ("idle", "iowait")
_INCLUDED_IN_USER = ("guest", "guest_nice")  # Linux counts guest time in user already


def _busy_total(times: Any) -> Tuple[float, float]:
    fields = times._fields
    total = 0.0
    idle = 0.0
    for name in fields:
        if name in _INCLUDED_IN_USER:
            continue
        value = getattr(times, name)
        total += value
        if name in _NOT_BUSY:
            idle += value
    return total - idle, total


def _percent(before: Any, after: Any) -> Optional[float]:
    busy0, total0 = _busy_total(before)
    busy1, total1 = _busy_total(after)
    elapsed = total1 - total0
    if elapsed <= 0:
        return None
    return round(min(100.0, max(0.0, (busy1 - busy0) / elapsed * 100.0)), 2)


class CpuSampler:
    """Samples this machine's CPUs; ``sample()`` returns a flat dict with unit-bearing names."""

    name = "cpu"

    def __init__(self, psutil: Any = None, per_cpu: bool = False, min_interval_s: float = 0.1,
                 wait_first: bool = True):
        self._ps = psutil or default_psutil()
        self.per_cpu = per_cpu
        self.min_interval_s = min_interval_s
        self.wait_first = wait_first
        self._guard = FieldGuard("cpu")
        self._last_at = time.monotonic()
        self._last_times = self._guard.call("cpu_times", self._ps.cpu_times)
        self._last_per_cpu = self._guard.call("cpu_times_per_cpu", self._ps.cpu_times, percpu=True) \
            if per_cpu else None
        self._percent: Optional[float] = None
        self._percent_per_cpu: Optional[List[Optional[float]]] = None
        self._count = self._guard.call("cpu_count", self._ps.cpu_count)

    def _update_percent(self, times: Any) -> None:
        now = time.monotonic()
        if self.wait_first and self._percent is None and now - self._last_at < self.min_interval_s:
            time.sleep(self.min_interval_s - (now - self._last_at))  # once: a measured first value
            times = self._guard.call("cpu_times", self._ps.cpu_times)
            now = time.monotonic()
        if now - self._last_at < self.min_interval_s or times is None:
            return
        if self._last_times is not None:
            self._percent = _percent(self._last_times, times)
        self._last_times = times
        if self.per_cpu:
            per = self._guard.call("cpu_times_per_cpu", self._ps.cpu_times, percpu=True)
            if per is not None and self._last_per_cpu is not None and len(per) == len(self._last_per_cpu):
                self._percent_per_cpu = [_percent(a, b) for a, b in zip(self._last_per_cpu, per)]
            self._last_per_cpu = per
        self._last_at = now

    def sample(self) -> Dict[str, Any]:
        """Return utilisation over the last interval, cumulative times, frequency and load."""
        guard = self._guard
        times = guard.call("cpu_times", self._ps.cpu_times)
        self._update_percent(times)
        times = self._last_times if times is None else times
        record: Dict[str, Any] = {
            "cpu_percent": self._percent,
            "cpu_count_logical": self._count,
            "cpu_user_seconds": getattr(times, "user", None),
            "cpu_system_seconds": getattr(times, "system", None),
            "cpu_idle_seconds": getattr(times, "idle", None),
            "cpu_iowait_seconds": getattr(times, "iowait", None),
            "cpu_irq_seconds": getattr(times, "irq", None),
            "cpu_softirq_seconds": getattr(times, "softirq", None),
            "cpu_steal_seconds": getattr(times, "steal", None),
        }
        if self.per_cpu:
            record["cpu_percent_per_cpu"] = self._percent_per_cpu
        freq = guard.call("cpu_frequency", self._ps.cpu_freq)
        record["cpu_frequency_mhz"] = round(freq.current, 1) if freq else None
        load = guard.call("load_average", self._ps.getloadavg)
        record["load_avg_1m"], record["load_avg_5m"], record["load_avg_15m"] = (
            (round(load[0], 2), round(load[1], 2), round(load[2], 2)) if load else (None, None, None))
        return record
