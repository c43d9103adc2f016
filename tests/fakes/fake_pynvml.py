"""A fake ``pynvml`` (nvidia-ml-py) module: same function names, constants and error types.

``make_nvml(gpus)`` returns a module object; pass it where the code accepts an NVML backend.
Error classes mirror the real ones: ``NVMLError(value)`` maps the value to its subclass
(``NVMLError(3)`` is an ``NVMLError_NotSupported``) and every subclass carries ``.value``.
Constant values are the real ones (a test compares them with the installed nvidia-ml-py).
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_DEVICE_MIG_ENABLE = 1
NVML_DEVICE_MIG_DISABLE = 0

_ERROR_NAMES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "InvalidArgument",
    NVML_ERROR_NOT_SUPPORTED: "NotSupported",
    NVML_ERROR_NO_PERMISSION: "NoPermission",
    NVML_ERROR_ALREADY_INITIALIZED: "AlreadyInitialized",
    NVML_ERROR_NOT_FOUND: "NotFound",
    NVML_ERROR_DRIVER_NOT_LOADED: "DriverNotLoaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "LibraryNotFound",
    NVML_ERROR_FUNCTION_NOT_FOUND: "FunctionNotFound",
    NVML_ERROR_GPU_IS_LOST: "GpuIsLost",
    NVML_ERROR_UNKNOWN: "Unknown",
}


class NVMLError(Exception):
    """Same contract as pynvml.NVMLError: the value selects the subclass."""

    _valClassMapping: Dict[int, type] = {}

    def __new__(cls, value):
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value=None):
        super().__init__(value)

    def __str__(self):
        return _ERROR_NAMES.get(self.value, f"Unknown Error (code {self.value})")

    def __eq__(self, other):
        return isinstance(other, NVMLError) and self.value == other.value

    __hash__ = Exception.__hash__


def _make_error_classes() -> Dict[str, type]:
    classes = {}
    for value, name in _ERROR_NAMES.items():
        def new(cls, *args, _value=value):
            return NVMLError.__new__(cls, _value)

        cls = type(f"NVMLError_{name}", (NVMLError,), {"__new__": new})
        NVMLError._valClassMapping[value] = cls
        classes[cls.__name__] = cls
    return classes


_ERROR_CLASSES = _make_error_classes()
globals().update(_ERROR_CLASSES)


@dataclass
class FakeGpu:
    """One fake device. ``fail`` maps NVML function names to the error value they raise."""

    uuid: str
    name: str = "NVIDIA Fake A100"
    memory_total: int = 40 * 1024**3
    memory_used: int = 1024**3
    util_gpu: int = 37
    util_memory: int = 12
    temperature: int = 55
    power_mw: int = 123456
    energy_mj: int = 987654321
    energy_delay_s: float = 0.0  # a slow energy query, as some drivers have (CPU really spent in it)
    clocks: Dict[int, int] = field(default_factory=lambda: {0: 1410, 1: 1410, 2: 1215})
    processes: List[Tuple[int, Optional[int]]] = field(default_factory=list)
    fail: Dict[str, int] = field(default_factory=dict)
    mig: List[FakeGpu] = field(default_factory=list)  # non-empty: MIG mode on
    gpu_instance_id: int = 0
    compute_instance_id: int = 0
    calls: Dict[str, int] = field(default_factory=dict)


class _Handle:
    def __init__(self, gpu: FakeGpu, is_mig: bool = False):
        self.gpu = gpu
        self.is_mig = is_mig


class _Struct:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def make_nvml(gpus: List[FakeGpu], init_error: Optional[int] = None, driver_version: str = "550.54.15",
              count_error: Optional[int] = None) -> types.ModuleType:
    """A module object that behaves like pynvml over ``gpus``."""
    mod = types.ModuleType("pynvml")
    for name, value in globals().items():
        if name.startswith("NVML_") or name.startswith("NVMLError"):
            setattr(mod, name, value)
    state = {"initialised": 0, "init_calls": 0, "shutdown_calls": 0}
    mod.fake_state = state
    mod.fake_gpus = gpus

    def check() -> None:
        if not state["initialised"]:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def device_call(fname: str):
        def decorator(function):
            def wrapper(handle, *args):
                check()
                gpu = handle.gpu
                gpu.calls[fname] = gpu.calls.get(fname, 0) + 1
                if fname in gpu.fail:
                    raise NVMLError(gpu.fail[fname])
                if "*" in gpu.fail:
                    raise NVMLError(gpu.fail["*"])
                return function(handle, *args)

            wrapper.__name__ = fname
            setattr(mod, fname, wrapper)
            return wrapper

        return decorator

    def nvmlInit():
        state["init_calls"] += 1
        if init_error is not None:
            raise NVMLError(init_error)
        state["initialised"] += 1

    def nvmlShutdown():
        check()
        state["initialised"] -= 1
        state["shutdown_calls"] += 1

    def nvmlSystemGetDriverVersion():
        check()
        return driver_version

    def nvmlDeviceGetCount():
        check()
        if count_error is not None:
            raise NVMLError(count_error)
        return len(gpus)

    def nvmlDeviceGetHandleByIndex(index):
        check()
        if not 0 <= index < len(gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if "nvmlDeviceGetHandleByIndex" in gpus[index].fail:
            raise NVMLError(gpus[index].fail["nvmlDeviceGetHandleByIndex"])
        return _Handle(gpus[index])

    def nvmlDeviceGetHandleByUUID(uuid):
        check()
        for gpu in gpus:
            if gpu.uuid == uuid:
                return _Handle(gpu)
            for mig in gpu.mig:
                if mig.uuid == uuid:
                    return _Handle(mig, True)
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    for function in (nvmlInit, nvmlShutdown, nvmlSystemGetDriverVersion, nvmlDeviceGetCount,
                     nvmlDeviceGetHandleByIndex, nvmlDeviceGetHandleByUUID):
        setattr(mod, function.__name__, function)

    @device_call("nvmlDeviceGetUUID")
    def _uuid(h):
        return h.gpu.uuid

    @device_call("nvmlDeviceGetName")
    def _name(h):
        return h.gpu.name

    @device_call("nvmlDeviceGetMemoryInfo")
    def _mem(h):
        g = h.gpu
        return _Struct(total=g.memory_total, used=g.memory_used, free=g.memory_total - g.memory_used)

    @device_call("nvmlDeviceGetUtilizationRates")
    def _util(h):
        if h.is_mig:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return _Struct(gpu=h.gpu.util_gpu, memory=h.gpu.util_memory)

    @device_call("nvmlDeviceGetTemperature")
    def _temp(h, sensor):
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return h.gpu.temperature

    @device_call("nvmlDeviceGetPowerUsage")
    def _power(h):
        return h.gpu.power_mw

    @device_call("nvmlDeviceGetTotalEnergyConsumption")
    def _energy(h):
        if h.gpu.energy_delay_s:  # the driver's own slowness: CPU burnt in the call, as on a real one
            # This thread's CPU time, not the clock: on a loaded machine a wall-clock spin can be
            # mostly preempted and burn less CPU than the throttle's threshold.
            until = time.thread_time() + h.gpu.energy_delay_s
            while time.thread_time() < until:
                pass
        return h.gpu.energy_mj

    @device_call("nvmlDeviceGetClockInfo")
    def _clock(h, kind):
        return h.gpu.clocks[kind]

    @device_call("nvmlDeviceGetComputeRunningProcesses")
    def _procs(h):
        return [_Struct(pid=pid, usedGpuMemory=mem, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
                for pid, mem in h.gpu.processes]

    @device_call("nvmlDeviceGetMigMode")
    def _mig_mode(h):
        if h.is_mig:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        on = NVML_DEVICE_MIG_ENABLE if h.gpu.mig else NVML_DEVICE_MIG_DISABLE
        return [on, on]

    @device_call("nvmlDeviceGetMaxMigDeviceCount")
    def _max_mig(h):
        return 7 if h.gpu.mig else 0

    @device_call("nvmlDeviceGetMigDeviceHandleByIndex")
    def _mig_handle(h, index):
        if index >= len(h.gpu.mig):
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return _Handle(h.gpu.mig[index], True)

    @device_call("nvmlDeviceIsMigDeviceHandle")
    def _is_mig(h):
        return h.is_mig

    @device_call("nvmlDeviceGetGpuInstanceId")
    def _gi(h):
        return h.gpu.gpu_instance_id

    @device_call("nvmlDeviceGetComputeInstanceId")
    def _ci(h):
        return h.gpu.compute_instance_id

    return mod


def public_names() -> Set[str]:
    """Names a fake module exposes that must exist in the real pynvml."""
    mod = make_nvml([])
    return {n for n in vars(mod) if not n.startswith(("_", "fake_")) and n not in ("NVMLError",)} | {"NVMLError"}
