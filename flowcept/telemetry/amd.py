"""AMD GPU sampler through ``amdsmi`` (ROCm's Python bindings).

``import amdsmi`` without ROCm fails with a plain ``KeyError`` after printing two lines to
stdout, so the import is guarded with ``except Exception`` and its stdout is swallowed. As with
NVML, state is explicit (:class:`AmdSmiState`), initialised once per process, and a missing
library, driver or device is a reported ``status``. Visible devices: ``ROCR_VISIBLE_DEVICES``
(indices or ``GPU-<id>`` unique ids) selects first, then ``HIP_VISIBLE_DEVICES`` (or
``CUDA_VISIBLE_DEVICES``, which HIP also honours) indexes into what remains.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Any, Dict, Iterable, List, Optional

from flowcept.telemetry._guard import FieldGuard
from flowcept.telemetry.nvidia import GpuBackendState, GpuDevice, metric_groups, parse_visible

logger = logging.getLogger("flowcept.telemetry")

_MIB = 1024 * 1024


def import_amdsmi() -> Any:
    """Import amdsmi quietly; returns None (and logs) when it cannot be loaded."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import amdsmi
        return amdsmi
    except Exception as error:  # KeyError: 'libamd_smi.so' without ROCm, ImportError without the package
        logger.info("AMD telemetry: amdsmi not usable (%s: %s)", type(error).__name__, error)
        return None


def _number(value: Any) -> Optional[float]:
    """A number, or None for the "N/A" string amdsmi reports for unavailable values."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _norm_id(text: Any) -> str:
    text = str(text or "").lower()
    if text.startswith("gpu-"):
        text = text[4:]
    if text.startswith("0x"):
        text = text[2:]
    return text.replace("-", "")


class AmdSmiState(GpuBackendState):
    """amdsmi initialised once per process with the job's visible GPUs; never raises."""

    vendor = "AMD"

    def __init__(self, backend: Any = None, env: Optional[Dict[str, str]] = None):
        super().__init__(backend)
        self._env = env

    def _shut_down(self) -> None:
        self.backend.amdsmi_shut_down()

    def _initialise(self) -> None:
        self.devices = []
        backend = self._given_backend if self._given_backend is not None else import_amdsmi()
        self.backend = backend
        if backend is None:
            self._set("no_library", "amdsmi not importable")
            return
        try:
            backend.amdsmi_init(backend.AmdSmiInitFlags.INIT_AMD_GPUS)
        except Exception as error:
            code = getattr(error, "err_code", None)
            no_driver = {getattr(backend, "AMDSMI_STATUS_DRIVER_NOT_LOADED", 34),
                         getattr(backend, "AMDSMI_STATUS_NO_DRV", 51)}
            self._set("no_driver" if code in no_driver else "error", f"amdsmi_init failed: {error}")
            return
        try:
            handles = list(backend.amdsmi_get_processor_handles())
        except Exception as error:
            self._set("error", f"amdsmi_get_processor_handles failed: {error}")
            return
        guard = FieldGuard("amdsmi")
        physical = []
        for i, handle in enumerate(handles):
            uuid = guard.call(f"device {i} uuid", backend.amdsmi_get_gpu_device_uuid, handle)
            asic = guard.call(f"device {i} asic", backend.amdsmi_get_gpu_asic_info, handle) or {}
            physical.append((i, handle, uuid, asic.get("market_name"), asic.get("asic_serial")))
        env = os.environ if self._env is None else self._env
        rocr = parse_visible(env.get("ROCR_VISIBLE_DEVICES"))
        if rocr is not None:
            physical = [p for p in (self._match(t, physical) for t in rocr) if p is not None]
        hip = parse_visible(env.get("HIP_VISIBLE_DEVICES", env.get("CUDA_VISIBLE_DEVICES")))
        if hip is not None:
            selected = []
            for token in hip:
                if not token.isdigit() or int(token) >= len(physical):
                    break  # an invalid entry ends the list, as in HIP
                selected.append(physical[int(token)])
            physical = selected
        self.devices = [GpuDevice(vi, p[0], p[2], p[3], p[1], False, "amd") for vi, p in enumerate(physical)]
        self._set("ok" if self.devices else "no_devices", None if self.devices else "no visible AMD GPU")

    @staticmethod
    def _match(token: str, physical: List[tuple]) -> Optional[tuple]:
        if token.isdigit():
            return physical[int(token)] if int(token) < len(physical) else None
        wanted = _norm_id(token)
        for p in physical:
            if wanted and (wanted == _norm_id(p[4]) or wanted in _norm_id(p[2])):
                return p
        return None



class AmdSampler:
    """Samples the job's AMD GPUs; ``sample()`` returns one record per device."""

    name = "amd"
    vendor = "amd"

    def __init__(self, backend: Any = None, metrics: Optional[Iterable[str]] = None,
                 env: Optional[Dict[str, str]] = None, state: Optional[AmdSmiState] = None):
        self.state = state or AmdSmiState(backend, env)
        self.metrics = metric_groups(metrics)

    @property
    def status(self) -> str:
        self.state.ensure()
        return self.state.status

    def inventory(self) -> List[Dict[str, Any]]:
        """Model, memory and driver of each visible device (for machine info)."""
        if not self.state.ensure():
            return []
        amd = self.state.backend
        out = []
        for dev in self.state.devices:
            vram = dev.guard.call("vram", amd.amdsmi_get_gpu_vram_usage, dev.handle) or {}
            driver = dev.guard.call("driver", amd.amdsmi_get_gpu_driver_info, dev.handle) or {}
            total = _number(vram.get("vram_total"))
            out.append({"gpu_index": dev.index, "gpu_physical_index": dev.physical_index, "gpu_uuid": dev.uuid,
                        "gpu_name": dev.name, "gpu_vendor": "amd", "gpu_is_mig": False,
                        "gpu_memory_total_bytes": None if total is None else int(total * _MIB),
                        "gpu_driver_version": driver.get("driver_version")})
        return out

    def sample(self, pids: Optional[Iterable[int]] = None) -> List[Dict[str, Any]]:
        """Return one flat record per visible GPU; processes limited to ``pids`` when given."""
        if not self.state.ensure():
            return []
        amd = self.state.backend
        wanted = self.metrics
        pid_set = None if pids is None else set(pids)
        records = []
        for dev in self.state.devices:
            call = dev.guard.call
            h = dev.handle
            rec: Dict[str, Any] = {"gpu_index": dev.index, "gpu_uuid": dev.uuid, "gpu_name": dev.name,
                                   "gpu_vendor": "amd"}
            if "utilization" in wanted:
                act = call("activity", amd.amdsmi_get_gpu_activity, h) or {}
                rec["gpu_utilization_percent"] = _number(act.get("gfx_activity"))
                rec["gpu_memory_utilization_percent"] = _number(act.get("umc_activity"))
            if "memory" in wanted:
                vram = call("vram", amd.amdsmi_get_gpu_vram_usage, h) or {}
                used, total = _number(vram.get("vram_used")), _number(vram.get("vram_total"))
                rec["gpu_memory_used_bytes"] = None if used is None else int(used * _MIB)
                rec["gpu_memory_total_bytes"] = None if total is None else int(total * _MIB)
            if "temperature" in wanted:
                types, metric = amd.AmdSmiTemperatureType, amd.AmdSmiTemperatureMetric.CURRENT
                for field, sensor in (("gpu_temperature_celsius", types.EDGE),
                                      ("gpu_temperature_hotspot_celsius", types.HOTSPOT),
                                      ("gpu_temperature_memory_celsius", types.VRAM)):
                    rec[field] = _number(call(field, amd.amdsmi_get_temp_metric, h, sensor, metric))
            if "power" in wanted:
                power = call("power", amd.amdsmi_get_power_info, h) or {}
                watts = _number(power.get("current_socket_power"))
                rec["gpu_power_watts"] = watts if watts is not None else _number(power.get("average_socket_power"))
            if "energy" in wanted:
                energy = call("energy", amd.amdsmi_get_energy_count, h) or {}
                acc, res = _number(energy.get("energy_accumulator")), _number(energy.get("counter_resolution"))
                rec["gpu_energy_joules"] = None if acc is None or res is None else acc * res / 1e6
            if "clocks" in wanted:
                clk = amd.AmdSmiClkType
                gfx = call("gfx_clock", amd.amdsmi_get_clock_info, h, clk.GFX) or {}
                mem = call("memory_clock", amd.amdsmi_get_clock_info, h, clk.MEM) or {}
                rec["gpu_sm_clock_mhz"] = _number(gfx.get("clk"))
                rec["gpu_memory_clock_mhz"] = _number(mem.get("clk"))
            if "processes" in wanted:
                procs = call("processes", amd.amdsmi_get_gpu_process_list, h)
                rec["gpu_processes"] = None if procs is None else [
                    {"pid": p.get("pid"),
                     "gpu_memory_used_bytes": _number((p.get("memory_usage") or {}).get("vram_mem", p.get("mem")))}
                    for p in procs if pid_set is None or p.get("pid") in pid_set]
            records.append(rec)
        return records

    def close(self) -> None:
        """Release amdsmi (the sampler can be used again: it re-initialises)."""
        self.state.shutdown()
