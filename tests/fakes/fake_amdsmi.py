"""A fake ``amdsmi`` module (ROCm 7 Python bindings): the functions, enums and exceptions used.

Enum values are those of amdsmi 7.0.2 (``amdsmi_wrapper``). ``AmdSmiLibraryException(err_code)``
carries ``err_code`` like the real one; unavailable values read "N/A" as in the real bindings.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Dict, List, Optional, Tuple

AMDSMI_STATUS_SUCCESS = 0
AMDSMI_STATUS_NOT_SUPPORTED = 2
AMDSMI_STATUS_NO_PERM = 10
AMDSMI_STATUS_NOT_FOUND = 31
AMDSMI_STATUS_DRIVER_NOT_LOADED = 34
AMDSMI_STATUS_NO_DRV = 51


class AmdSmiException(Exception):
    """Base smi exception class."""


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code):
        err_code = abs(err_code)
        super().__init__(err_code)
        self.err_code = err_code

    def get_error_code(self):
        return self.err_code


class AmdSmiInitFlags(IntEnum):
    INIT_ALL_PROCESSORS = 0xFFFFFFFF
    INIT_AMD_CPUS = 1
    INIT_AMD_GPUS = 2


class AmdSmiClkType(IntEnum):
    SYS = 0
    GFX = 0
    DF = 1
    DCEF = 2
    SOC = 3
    MEM = 4


class AmdSmiTemperatureType(IntEnum):
    EDGE = 0
    HOTSPOT = 1
    JUNCTION = 1
    VRAM = 2


class AmdSmiTemperatureMetric(IntEnum):
    CURRENT = 0
    MAX = 1


@dataclass
class FakeAmdGpu:
    uuid: str
    market_name: str = "AMD Instinct MI250X"
    asic_serial: str = "0x1234ABCD5678EF00"
    vram_total_mb: int = 65536
    vram_used_mb: int = 2048
    gfx_activity: Any = 80
    umc_activity: Any = 25
    socket_power_w: Any = 300
    energy_accumulator: int = 1_000_000
    counter_resolution: float = 15.3  # microjoules per count
    temps: Dict[int, int] = field(default_factory=lambda: {0: 45, 1: 60, 2: 50})
    clocks: Dict[int, int] = field(default_factory=lambda: {0: 1700, 4: 1600})
    processes: List[Tuple[int, int]] = field(default_factory=list)
    fail: Dict[str, int] = field(default_factory=dict)


class _Handle:  # amdsmi_processor_handle is an opaque ctypes pointer in the real bindings
    def __init__(self, gpu: FakeAmdGpu):
        self.gpu = gpu


def make_amdsmi(gpus: List[FakeAmdGpu], init_error: Optional[int] = None) -> types.ModuleType:
    """A module object that behaves like amdsmi over ``gpus``."""
    mod = types.ModuleType("amdsmi")
    for name, value in globals().items():
        if name.startswith(("AMDSMI_", "AmdSmi")):
            setattr(mod, name, value)
    state = {"initialised": False}
    mod.fake_state = state

    def check():
        if not state["initialised"]:
            raise AmdSmiLibraryException(32)  # AMDSMI_STATUS_NOT_INIT

    def device(fname):
        def decorator(function):
            def wrapper(handle, *args):
                check()
                if fname in handle.gpu.fail:
                    raise AmdSmiLibraryException(handle.gpu.fail[fname])
                if "*" in handle.gpu.fail:
                    raise AmdSmiLibraryException(handle.gpu.fail["*"])
                return function(handle.gpu, *args)

            setattr(mod, fname, wrapper)
            return wrapper

        return decorator

    def amdsmi_init(flag=AmdSmiInitFlags.INIT_AMD_GPUS):
        if init_error is not None:
            raise AmdSmiLibraryException(init_error)
        state["initialised"] = True

    def amdsmi_shut_down():
        state["initialised"] = False

    def amdsmi_get_processor_handles():
        check()
        return [_Handle(g) for g in gpus]

    for function in (amdsmi_init, amdsmi_shut_down, amdsmi_get_processor_handles):
        setattr(mod, function.__name__, function)

    @device("amdsmi_get_gpu_device_uuid")
    def _uuid(g):
        return g.uuid

    @device("amdsmi_get_gpu_asic_info")
    def _asic(g):
        return {"market_name": g.market_name, "vendor_name": "Advanced Micro Devices Inc. [AMD/ATI]",
                "asic_serial": g.asic_serial}

    @device("amdsmi_get_gpu_activity")
    def _activity(g):
        return {"gfx_activity": g.gfx_activity, "umc_activity": g.umc_activity, "mm_activity": "N/A"}

    @device("amdsmi_get_gpu_vram_usage")
    def _vram(g):
        return {"vram_total": g.vram_total_mb, "vram_used": g.vram_used_mb}

    @device("amdsmi_get_power_info")
    def _power(g):
        return {"socket_power": g.socket_power_w, "current_socket_power": g.socket_power_w,
                "average_socket_power": "N/A", "gfx_voltage": "N/A", "soc_voltage": "N/A",
                "mem_voltage": "N/A", "power_limit": 500}

    @device("amdsmi_get_energy_count")
    def _energy(g):
        return {"energy_accumulator": g.energy_accumulator, "counter_resolution": g.counter_resolution,
                "timestamp": 1}

    @device("amdsmi_get_temp_metric")
    def _temp(g, sensor, metric):
        if not isinstance(sensor, AmdSmiTemperatureType) or not isinstance(metric, AmdSmiTemperatureMetric):
            raise AmdSmiException("parameter")
        if int(sensor) not in g.temps:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_SUPPORTED)
        return g.temps[int(sensor)]

    @device("amdsmi_get_clock_info")
    def _clock(g, kind):
        if not isinstance(kind, AmdSmiClkType):
            raise AmdSmiException("parameter")
        return {"clk": g.clocks[int(kind)], "min_clk": 500, "max_clk": 2000, "clk_locked": False,
                "clk_deep_sleep": "N/A"}

    @device("amdsmi_get_gpu_process_list")
    def _procs(g):
        return [{"name": "python", "pid": pid, "mem": mem, "engine_usage": {"gfx": 0, "enc": 0},
                 "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": mem}, "cu_occupancy": "N/A"}
                for pid, mem in g.processes]

    @device("amdsmi_get_gpu_driver_info")
    def _driver(g):
        return {"driver_name": "amdgpu", "driver_version": "6.8.5", "driver_date": "2015/01/01 00:00"}

    return mod
