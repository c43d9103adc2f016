"""Process sampler: one process's memory, CPU, threads, descriptors, I/O and context switches.

CPU% is the change of the process's user+system CPU time divided by the wall time between two
samples of this sampler (100% is one core busy; a process using four cores reads 400%). The
first reading is taken when the sampler is built, and a call closer than ``min_interval_s`` to
the previous measurement repeats the last value; the very first ``sample()`` waits out the
remainder of ``min_interval_s`` once, so a busy process never reads 0 (with ``wait_first=False``
the first value is None instead).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

from flowcept.telemetry._guard import FieldGuard, default_psutil


class ProcessGone(Exception):
    """The sampled process has exited."""


class ProcessSampler:
    """Samples one process (default: this one) through ``psutil.Process(pid)``."""

    name = "process"

    def __init__(self, pid: Optional[int] = None, psutil: Any = None, min_interval_s: float = 0.1,
                 wait_first: bool = True):
        self._ps = psutil or default_psutil()
        self.pid = os.getpid() if pid is None else pid
        self.min_interval_s = min_interval_s
        self.wait_first = wait_first
        self._guard = FieldGuard(f"process {self.pid}")
        self._process = self._ps.Process(self.pid)  # raises NoSuchProcess for a bad pid, by design
        self._last_cpu = self._cpu_seconds()
        self._last_at = time.monotonic()
        self._percent: Optional[float] = None

    def _cpu_seconds(self) -> Optional[float]:
        times = self._guard.call("cpu_times", self._process.cpu_times)
        return None if times is None else times.user + times.system

    def _update_percent(self, cpu: Optional[float]) -> None:
        now = time.monotonic()
        if self.wait_first and self._percent is None and now - self._last_at < self.min_interval_s:
            time.sleep(self.min_interval_s - (now - self._last_at))
            cpu = self._cpu_seconds()
            now = time.monotonic()
        if cpu is None or now - self._last_at < self.min_interval_s:
            return
        if self._last_cpu is not None:
            self._percent = round(max(0.0, (cpu - self._last_cpu) / (now - self._last_at) * 100.0), 2)
        self._last_cpu, self._last_at = cpu, now

    def sample(self) -> Dict[str, Any]:
        """Return the process's figures; raises ProcessGone once the process has exited."""
        process = self._process
        guard = self._guard
        ps = self._ps
        try:
            with process.oneshot():
                if not process.is_running():
                    raise ProcessGone(self.pid)
                times = guard.call("cpu_times", process.cpu_times)
                mem = guard.call("memory_info", process.memory_info)
                threads = guard.call("num_threads", process.num_threads)
                fds = guard.call("num_fds", process.num_fds) if hasattr(process, "num_fds") else None
                io = guard.call("io_counters", process.io_counters) if hasattr(process, "io_counters") else None
                ctx = guard.call("num_ctx_switches", process.num_ctx_switches)
                cpu_num = guard.call("cpu_num", process.cpu_num) if hasattr(process, "cpu_num") else None
        except (ps.NoSuchProcess, ps.ZombieProcess) as error:
            raise ProcessGone(self.pid) from error
        self._update_percent(None if times is None else times.user + times.system)
        return {
            "pid": self.pid,
            "process_cpu_percent": self._percent,
            "process_cpu_user_seconds": getattr(times, "user", None),
            "process_cpu_system_seconds": getattr(times, "system", None),
            "process_cpu_num": cpu_num,
            "process_rss_bytes": getattr(mem, "rss", None),
            "process_vms_bytes": getattr(mem, "vms", None),
            "process_num_threads": threads,
            "process_num_fds": fds,
            "process_io_read_bytes": getattr(io, "read_bytes", None),
            "process_io_write_bytes": getattr(io, "write_bytes", None),
            "process_io_read_count": getattr(io, "read_count", None),
            "process_io_write_count": getattr(io, "write_count", None),
            "process_ctx_switches_voluntary": getattr(ctx, "voluntary", None),
            "process_ctx_switches_involuntary": getattr(ctx, "involuntary", None),
        }
