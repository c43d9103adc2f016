"""Node telemetry for the node daemon: the whole node, each rank's process and each GPU.

Public API (what ``flowcept.daemon`` calls)::

    from flowcept.telemetry.node import NodeSampler

    sampler = NodeSampler(gpu=True, pids_provider=lambda: {4242: 0, 4243: 1})  # pid -> rank
    records = sampler.sample()      # list of dicts, one call per daemon tick (e.g. 1 Hz)
    sampler.status                  # {"gpu": {"nvidia": "ok" | "no_library" | ..., "amd": ...}}
    sampler.close()                 # releases NVML/amdsmi; idempotent

Every record is ``type: "telemetry"`` with ``telemetry_id`` as its second key (consolidation
de-duplicates on it), then ``kind`` (``"node"``, ``"process"`` or ``"gpu"``), ``hostname``,
``timestamp`` (seconds since the epoch) and flat numeric fields with unit-bearing names, ready
to become time series (see docs/telemetry.md for every field):

* ``node``: ``cpu_percent``, ``cpu_*_seconds``, ``cpu_frequency_mhz``, ``load_avg_1m``,
  ``memory_*_bytes``, ``swap_*``, ``disk_*`` (I/O counters; ``disk_usage`` is a list per mount),
  ``net_*`` (``net_interfaces`` maps moving interfaces to their counters).
* ``process``: ``pid``, ``rank`` and ``process_*`` (RSS, CPU%, times, threads, fds, I/O, context
  switches). A pid that has exited is dropped silently.
* ``gpu``: ``gpu_index``, ``gpu_uuid``, ``gpu_name``, ``gpu_vendor``, ``gpu_utilization_percent``,
  ``gpu_memory_used_bytes``, ``gpu_power_watts``, ``gpu_energy_joules``, clocks, temperature and
  ``gpu_processes`` (limited to the provided pids when a provider is given).

``pids_provider`` returns a mapping pid -> rank (rank may be None) or an iterable of pids; it is
called on every ``sample()``. ``extra`` fields (e.g. ``{"job_id": "123"}``) are added to every
record. CPU% values are None on the first sample of a CPU or process (nothing to compare yet):
``sample()`` never blocks to measure them. Nothing here raises out of ``sample()``.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

from flowcept.ids import next_id

logger = logging.getLogger("flowcept.telemetry")

PidsProvider = Callable[[], Union[Mapping[int, Optional[int]], Iterable[int]]]


class NodeSampler:
    """Samples the node, the job's processes and the GPUs; ``sample()`` returns telemetry records."""

    def __init__(self, gpu: bool = True, pids_provider: Optional[PidsProvider] = None, per_cpu: bool = False,
                 disk_paths: Optional[List[str]] = None, gpu_metrics: Optional[List[str]] = None,
                 hostname: Optional[str] = None, extra: Optional[Dict[str, Any]] = None,
                 psutil: Any = None, nvml: Any = None, amdsmi: Any = None):
        from flowcept.telemetry._guard import default_psutil
        from flowcept.telemetry.cpu import CpuSampler
        from flowcept.telemetry.disk import DiskSampler
        from flowcept.telemetry.memory import MemorySampler
        from flowcept.telemetry.network import NetworkSampler

        self._ps = psutil or default_psutil()
        self.hostname = hostname or socket.gethostname()
        self.pids_provider = pids_provider
        self.extra = dict(extra or {})
        self._node_samplers = [CpuSampler(self._ps, per_cpu=per_cpu, wait_first=False), MemorySampler(self._ps),
                               DiskSampler(self._ps, paths=disk_paths), NetworkSampler(self._ps)]
        self._processes: Dict[int, Any] = {}
        self._gpu = None
        if gpu:
            from flowcept.telemetry.gpu import GpuSampler

            self._gpu = GpuSampler(gpu_metrics, nvml=nvml, amdsmi=amdsmi)

    @property
    def status(self) -> Dict[str, Any]:
        """What the sampler can see: GPU backend states and the processes it follows."""
        return {"gpu": self._gpu.status if self._gpu is not None else None,
                "processes": sorted(self._processes)}

    def _head(self, kind: str, now: float) -> Dict[str, Any]:
        record = {"type": "telemetry", "telemetry_id": next_id(), "kind": kind, "hostname": self.hostname,
                  "timestamp": now}
        record.update(self.extra)
        return record

    def _pids(self) -> Dict[int, Optional[int]]:
        if self.pids_provider is None:
            return {}
        try:
            given = self.pids_provider()
        except Exception as error:
            logger.warning("telemetry pids_provider failed: %s", error)
            return {pid: None for pid in self._processes}
        if isinstance(given, Mapping):
            return {int(pid): rank for pid, rank in given.items()}
        return {int(pid): None for pid in given}

    def sample(self) -> List[Dict[str, Any]]:
        """One node record, one per live provided process, one per visible GPU."""
        now = time.time()
        node = self._head("node", now)
        for sampler in self._node_samplers:
            try:
                node.update(sampler.sample())
            except Exception as error:  # samplers guard their fields; this is belt and braces
                logger.debug("node sampler %s failed: %s", sampler.name, error)
        records = [node]
        pids = self._pids()
        for gone in [pid for pid in self._processes if pid not in pids]:
            del self._processes[gone]
        for pid, rank in pids.items():
            record = self._sample_process(pid, rank, now)
            if record is not None:
                records.append(record)
        if self._gpu is not None:
            try:
                gpus = self._gpu.sample(pids=list(pids) if self.pids_provider is not None else None)
            except Exception as error:
                logger.debug("gpu sampling failed: %s", error)
                gpus = []
            for gpu in gpus:
                record = self._head("gpu", now)
                record.update(gpu)
                records.append(record)
        return records

    def _sample_process(self, pid: int, rank: Optional[int], now: float) -> Optional[Dict[str, Any]]:
        from flowcept.telemetry.process import ProcessSampler

        sampler = self._processes.get(pid)
        try:
            if sampler is None:
                sampler = self._processes[pid] = ProcessSampler(pid, self._ps, wait_first=False)
            fields = sampler.sample()
        except Exception:  # exited (ProcessGone, NoSuchProcess) or not ours to read
            self._processes.pop(pid, None)
            return None
        record = self._head("process", now)
        record["pid"] = pid
        record["rank"] = rank
        record.update(fields)
        return record

    def close(self) -> None:
        """Release GPU libraries (idempotent)."""
        if self._gpu is not None:
            self._gpu.close()
        self._processes.clear()
