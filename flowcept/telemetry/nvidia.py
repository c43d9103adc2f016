"""NVIDIA GPU sampler through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

State is explicit (:class:`NvmlState`): NVML is initialised once per process (again in a forked
child), and a missing library, a missing driver or no visible device is a reported ``status``,
never an exception. The devices are the ones the job can use: ``CUDA_VISIBLE_DEVICES`` is
honoured in all its forms (indices, ``GPU-<uuid>`` or a unique prefix of it, ``MIG-<uuid>``
and the legacy ``MIG-GPU-<uuid>/<gi>/<ci>``; an invalid entry ends the list, as in CUDA).
Indices are NVML (PCI bus) order, which is CUDA's order when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
Names, UUIDs and handles are resolved once; the sampling path makes only cheap NVML queries
(utilisation, memory, temperature, power, energy, clocks, running processes). A query the
device does not support reads None and is logged once.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

from flowcept.telemetry._guard import FieldGuard

logger = logging.getLogger("flowcept.telemetry")

#: An energy read slower than this is made at most every ENERGY_REFRESH_S (see _add_energy).
SLOW_ENERGY_READ_S = 0.0005
ENERGY_REFRESH_S = 10.0

#: Metric groups the ``telemetry_capture.gpu`` setting can select (plus identity, always on).
METRIC_GROUPS = ("utilization", "memory", "temperature", "power", "energy", "clocks", "processes")
_ALIASES = {"used": "memory", "mem": "memory", "util": "utilization", "temp": "temperature",
            "clock": "clocks", "process": "processes"}


def metric_groups(selection: Optional[Iterable[str]]) -> frozenset:
    """Map a ``telemetry_capture.gpu`` list to metric groups; empty or ["all"] selects all."""
    wanted = {_ALIASES.get(str(s).strip().lower(), str(s).strip().lower()) for s in (selection or [])}
    if not wanted or "all" in wanted or not wanted & set(METRIC_GROUPS):
        return frozenset(METRIC_GROUPS)
    return frozenset(wanted & set(METRIC_GROUPS))


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class GpuDevice:
    """One device the job can see: identity resolved once, handle kept for sampling."""

    __slots__ = ("index", "physical_index", "uuid", "name", "handle", "is_mig", "guard")

    def __init__(self, index: int, physical_index: Optional[int], uuid: Optional[str], name: Optional[str],
                 handle: Any, is_mig: bool, vendor: str):
        self.index = index
        self.physical_index = physical_index
        self.uuid = uuid
        self.name = name
        self.handle = handle
        self.is_mig = is_mig
        self.guard = FieldGuard(f"{vendor} gpu {index} ({uuid})")


def parse_visible(value: Optional[str]) -> Optional[List[str]]:
    """Split a *_VISIBLE_DEVICES value; None means unset (all devices), [] means none."""
    if value is None:
        return None
    return [token.strip() for token in value.split(",") if token.strip()]


class GpuBackendState:
    """A vendor library initialised once per process (again in a forked child); never raises.

    Subclasses set ``vendor`` and implement ``_initialise`` (devices and ``status``) and
    ``_shut_down`` (the library's own shutdown call).
    """

    vendor = "GPU"

    def __init__(self, backend: Any = None):
        self._given_backend = backend
        self._pid: Optional[int] = None
        self.backend: Any = None
        self.status = "uninitialized"
        self.detail: Optional[str] = None
        self.devices: List[GpuDevice] = []

    def ensure(self) -> bool:
        """Initialise the library and resolve devices if not done in this process; True when usable."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._initialise()
        return self.status == "ok"

    def _set(self, status: str, detail: Optional[str] = None) -> None:
        self.status, self.detail = status, detail
        if status != "ok":
            logger.info("%s telemetry: %s%s", self.vendor, status, f" ({detail})" if detail else "")

    def _initialise(self) -> None:
        raise NotImplementedError

    def _shut_down(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Shut the library down if this process initialised it."""
        if self.status == "ok" and self._pid == os.getpid() and self.backend is not None:
            try:
                self._shut_down()
            except Exception:
                pass
        self._pid = None
        self.status = "uninitialized"
        self.devices = []


class NvmlState(GpuBackendState):
    """NVML initialised once per process, with the job's visible devices; never raises."""

    vendor = "NVIDIA"

    def __init__(self, backend: Any = None, visible_devices: Optional[str] = "env"):
        super().__init__(backend)
        self._visible_setting = visible_devices
        self.driver_version: Optional[str] = None

    def _shut_down(self) -> None:
        self.backend.nvmlShutdown()

    def _initialise(self) -> None:
        self.devices = []
        backend = self._given_backend
        if backend is None:
            try:
                import pynvml as backend  # nvidia-ml-py; only here, never at import flowcept
            except Exception as error:
                self.backend = None
                self._set("no_library", f"pynvml not importable: {error}")
                return
        self.backend = backend
        try:
            backend.nvmlInit()
        except Exception as error:
            value = getattr(error, "value", None)
            if value == getattr(backend, "NVML_ERROR_LIBRARY_NOT_FOUND", 12):
                self._set("no_library", str(error))
            elif value == getattr(backend, "NVML_ERROR_DRIVER_NOT_LOADED", 9):
                self._set("no_driver", str(error))
            else:
                self._set("error", f"nvmlInit failed: {error}")
            return
        guard = FieldGuard("nvml")
        self.driver_version = _text(guard.call("driver_version", backend.nvmlSystemGetDriverVersion))
        try:
            self.devices = self._resolve(backend)
        except Exception as error:
            self._set("error", f"device enumeration failed: {error}")
            return
        if not self.devices:
            self._set("no_devices", "no visible NVIDIA device")
            return
        self._set("ok")

    def _visible_tokens(self) -> Optional[List[str]]:
        if self._visible_setting == "env":
            return parse_visible(os.environ.get("CUDA_VISIBLE_DEVICES"))
        return parse_visible(self._visible_setting)

    def _resolve(self, nv: Any) -> List[GpuDevice]:
        count = nv.nvmlDeviceGetCount()
        physical = []  # (index, handle, uuid)
        guard = FieldGuard("nvml")
        for i in range(count):
            handle = guard.call(f"device {i} handle", nv.nvmlDeviceGetHandleByIndex, i)
            uuid = None if handle is None else _text(guard.call(f"device {i} uuid", nv.nvmlDeviceGetUUID, handle))
            physical.append((i, handle, uuid))  # a device NVML cannot open keeps its index, unsampled
        tokens = self._visible_tokens()
        chosen: List[tuple] = []  # (physical index, handle, uuid, is_mig)
        if tokens is None:
            chosen = [(i, h, u, False) for i, h, u in physical if h is not None]
        else:
            for token in tokens:
                found = self._match(nv, token, physical)
                if found is None:
                    logger.info("CUDA_VISIBLE_DEVICES entry %r matches no device; later entries ignored",
                                token)
                    break
                if found[1] is not None and all(found[1] is not c[1] for c in chosen):
                    chosen.append(found)
        devices = []
        for visible_index, (phys, handle, uuid, is_mig) in enumerate(chosen):
            name = _text(FieldGuard("nvml").call("name", nv.nvmlDeviceGetName, handle))
            devices.append(GpuDevice(visible_index, phys, uuid, name, handle, is_mig, "nvidia"))
        return devices

    def _match(self, nv: Any, token: str, physical: List[tuple]) -> Optional[tuple]:
        if token.lstrip("-").isdigit():
            index = int(token)
            return (physical[index][0], physical[index][1], physical[index][2], False) \
                if 0 <= index < len(physical) else None
        lowered = token.lower()
        if lowered.startswith("mig-"):
            return self._match_mig(nv, token, physical)
        prefix = lowered if lowered.startswith("gpu-") else "gpu-" + lowered
        hits = [p for p in physical if p[2] and p[2].lower().startswith(prefix)]
        if len(hits) == 1:
            return (hits[0][0], hits[0][1], hits[0][2], False)
        return None  # unknown or ambiguous prefix: CUDA stops here too

    def _match_mig(self, nv: Any, token: str, physical: List[tuple]) -> Optional[tuple]:
        guard = FieldGuard("nvml mig")
        if "/" in token:  # legacy MIG-GPU-<uuid>/<gpu instance>/<compute instance>
            parent_uuid, _, rest = token[4:].partition("/")
            gi_text, _, ci_text = rest.partition("/")
            try:
                gi, ci = int(gi_text), int(ci_text)
            except ValueError:
                return None
            for phys, handle, uuid in physical:
                if handle is not None and uuid and uuid.lower() == parent_uuid.lower():
                    for mig in self._mig_devices(nv, handle):
                        if (guard.call("gi", nv.nvmlDeviceGetGpuInstanceId, mig) == gi
                                and guard.call("ci", nv.nvmlDeviceGetComputeInstanceId, mig) == ci):
                            return (phys, mig, _text(guard.call("uuid", nv.nvmlDeviceGetUUID, mig)), True)
            return None
        for phys, handle, _ in physical:
            if handle is None:
                continue
            for mig in self._mig_devices(nv, handle):
                mig_uuid = _text(guard.call("uuid", nv.nvmlDeviceGetUUID, mig))
                if mig_uuid and mig_uuid.lower().startswith(token.lower()):
                    return (phys, mig, mig_uuid, True)
        return None

    @staticmethod
    def _mig_devices(nv: Any, handle: Any) -> List[Any]:
        try:
            current, _pending = nv.nvmlDeviceGetMigMode(handle)
        except Exception:
            return []  # not a MIG-capable GPU
        if not current:
            return []
        out = []
        for i in range(nv.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                out.append(nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, i))
            except Exception:
                continue  # empty slot (NVML_ERROR_NOT_FOUND)
        return out


class NvidiaSampler:
    """Samples the job's NVIDIA GPUs; ``sample()`` returns one record per device."""

    name = "nvidia"
    vendor = "nvidia"

    def __init__(self, backend: Any = None, metrics: Optional[Iterable[str]] = None,
                 visible_devices: Optional[str] = "env", state: Optional[NvmlState] = None,
                 energy_refresh_s: float = ENERGY_REFRESH_S, clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.thread_time):
        self.state = state or NvmlState(backend, visible_devices)
        self.metrics = metric_groups(metrics)
        self.energy_refresh_s = energy_refresh_s
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._energy: Dict[int, tuple] = {}  # device index -> (joules, read at, read was slow)

    @property
    def status(self) -> str:
        self.state.ensure()
        return self.state.status

    def inventory(self) -> List[Dict[str, Any]]:
        """Model, memory and driver of each visible device (for machine info)."""
        if not self.state.ensure():
            return []
        nv = self.state.backend
        out = []
        for dev in self.state.devices:
            mem = dev.guard.call("memory", nv.nvmlDeviceGetMemoryInfo, dev.handle)
            out.append({"gpu_index": dev.index, "gpu_physical_index": dev.physical_index, "gpu_uuid": dev.uuid,
                        "gpu_name": dev.name, "gpu_vendor": "nvidia", "gpu_is_mig": dev.is_mig,
                        "gpu_memory_total_bytes": getattr(mem, "total", None),
                        "gpu_driver_version": self.state.driver_version})
        return out

    def sample(self, pids: Optional[Iterable[int]] = None) -> List[Dict[str, Any]]:
        """Return one flat record per visible GPU; processes limited to ``pids`` when given."""
        if not self.state.ensure():
            return []
        nv = self.state.backend
        wanted = self.metrics
        pid_set = None if pids is None else set(pids)
        records = []
        for dev in self.state.devices:
            call: Callable[..., Any] = dev.guard.call
            h = dev.handle
            rec: Dict[str, Any] = {"gpu_index": dev.index, "gpu_uuid": dev.uuid, "gpu_name": dev.name,
                                   "gpu_vendor": "nvidia"}
            if "utilization" in wanted:
                util = call("utilization", nv.nvmlDeviceGetUtilizationRates, h)
                rec["gpu_utilization_percent"] = getattr(util, "gpu", None)
                rec["gpu_memory_utilization_percent"] = getattr(util, "memory", None)
            if "memory" in wanted:
                mem = call("memory", nv.nvmlDeviceGetMemoryInfo, h)
                rec["gpu_memory_used_bytes"] = getattr(mem, "used", None)
                rec["gpu_memory_total_bytes"] = getattr(mem, "total", None)
            if "temperature" in wanted:
                rec["gpu_temperature_celsius"] = call("temperature", nv.nvmlDeviceGetTemperature, h,
                                                      nv.NVML_TEMPERATURE_GPU)
            if "power" in wanted:
                milliwatts = call("power", nv.nvmlDeviceGetPowerUsage, h)
                rec["gpu_power_watts"] = None if milliwatts is None else milliwatts / 1000.0
            if "energy" in wanted:
                self._add_energy(rec, dev, call)
            if "clocks" in wanted:
                rec["gpu_sm_clock_mhz"] = call("sm_clock", nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)
                rec["gpu_memory_clock_mhz"] = call("memory_clock", nv.nvmlDeviceGetClockInfo, h,
                                                   nv.NVML_CLOCK_MEM)
                rec["gpu_graphics_clock_mhz"] = call("graphics_clock", nv.nvmlDeviceGetClockInfo, h,
                                                     nv.NVML_CLOCK_GRAPHICS)
            if "processes" in wanted:
                procs = call("processes", nv.nvmlDeviceGetComputeRunningProcesses, h)
                rec["gpu_processes"] = None if procs is None else [
                    {"pid": p.pid, "gpu_memory_used_bytes": getattr(p, "usedGpuMemory", None)}
                    for p in procs if pid_set is None or p.pid in pid_set]
            records.append(rec)
        return records

    def _add_energy(self, rec: Dict[str, Any], dev: GpuDevice, call: Callable[..., Any]) -> None:
        """The energy counter; where reading it is slow, read at most every ``energy_refresh_s``.

        On some systems (a virtualised H200 here) one nvmlDeviceGetTotalEnergyConsumption costs
        ~3.5 ms of CPU, 40x every other query together. There the last value is reported with
        ``gpu_energy_age_s`` (seconds since it was read) until it is due again; a fast read is
        made every sample and carries no age. Slow means this thread's CPU time for the read
        (waiting for the GIL back after it is not the read's cost), and never the first read
        (the driver's warm-up).
        """
        now = self._clock()
        last = self._energy.get(dev.index)
        if last is not None and last[2] and now - last[1] < self.energy_refresh_s:
            rec["gpu_energy_joules"] = last[0]
            rec["gpu_energy_age_s"] = round(now - last[1], 3)
            return
        cpu_before = self._cpu_clock()
        millijoules = call("energy", self.state.backend.nvmlDeviceGetTotalEnergyConsumption, dev.handle)
        slow = last is not None and self._cpu_clock() - cpu_before > SLOW_ENERGY_READ_S
        joules = None if millijoules is None else millijoules / 1000.0
        self._energy[dev.index] = (joules, self._clock(), slow)
        rec["gpu_energy_joules"] = joules

    def close(self) -> None:
        """Release NVML (the sampler can be used again: it re-initialises)."""
        self.state.shutdown()
