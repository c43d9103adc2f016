"""NVIDIA and AMD samplers against fake NVML/amdsmi modules, and the real nvidia-ml-py without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import no_real_gpu
from fakes import fake_pynvml as fnv
from fakes.fake_amdsmi import FakeAmdGpu, make_amdsmi
from fakes.fake_pynvml import FakeGpu, make_nvml

from flowcept.telemetry.amd import AmdSampler
from flowcept.telemetry.gpu import GpuSampler
from flowcept.telemetry.nvidia import NvidiaSampler

UUID0 = "GPU-11111111-aaaa-bbbb-cccc-000000000000"
UUID1 = "GPU-22222222-aaaa-bbbb-cccc-111111111111"
UUID2 = "GPU-22229999-aaaa-bbbb-cccc-222222222222"
MIG_A = "MIG-aaaaaaaa-0000-1111-2222-333333333333"
MIG_B = "MIG-bbbbbbbb-0000-1111-2222-444444444444"


def three_gpus(**kw):
    return [FakeGpu(UUID0, processes=[(os.getpid(), 500 * 2**20), (1, 2**20)]), FakeGpu(UUID1), FakeGpu(UUID2)]


def sampler(nvml, visible=None, **kw):
    return NvidiaSampler(nvml, visible_devices=visible, **kw)


def test_fake_nvml_matches_real_pynvml_names_constants_and_errors():
    import pynvml

    missing = sorted(fnv.public_names() - set(dir(pynvml)))
    assert not missing, missing
    for name in dir(fnv):
        if name.startswith("NVML_") and hasattr(pynvml, name):
            assert getattr(fnv, name) == getattr(pynvml, name), name
    for module in (fnv, pynvml):
        error = module.NVMLError(module.NVML_ERROR_NOT_SUPPORTED)
        assert isinstance(error, module.NVMLError_NotSupported) and error.value == 3
        assert module.NVMLError_LibraryNotFound().value == 12
        assert issubclass(module.NVMLError_Uninitialized, module.NVMLError)


def test_all_devices_with_units():
    nvml = make_nvml(three_gpus())
    records = sampler(nvml).sample()
    assert [r["gpu_uuid"] for r in records] == [UUID0, UUID1, UUID2]
    r = records[0]
    assert r["gpu_index"] == 0 and r["gpu_vendor"] == "nvidia" and r["gpu_name"] == "NVIDIA Fake A100"
    assert r["gpu_utilization_percent"] == 37 and r["gpu_memory_utilization_percent"] == 12
    assert r["gpu_memory_used_bytes"] == 2**30 and r["gpu_memory_total_bytes"] == 40 * 2**30
    assert r["gpu_power_watts"] == pytest.approx(123.456)
    assert r["gpu_energy_joules"] == pytest.approx(987654.321)
    assert r["gpu_temperature_celsius"] == 55
    assert (r["gpu_sm_clock_mhz"], r["gpu_memory_clock_mhz"], r["gpu_graphics_clock_mhz"]) == (1410, 1215, 1410)
    assert {p["pid"] for p in r["gpu_processes"]} == {os.getpid(), 1}


def test_processes_filtered_to_given_pids_and_metric_selection():
    nvml = make_nvml(three_gpus())
    r = sampler(nvml, metrics=["used", "power", "processes"]).sample(pids=[os.getpid()])[0]
    assert r["gpu_processes"] == [{"pid": os.getpid(), "gpu_memory_used_bytes": 500 * 2**20}]
    assert "gpu_memory_used_bytes" in r and "gpu_power_watts" in r
    assert "gpu_utilization_percent" not in r and "gpu_sm_clock_mhz" not in r


def test_nvml_initialised_once_per_process_and_names_read_once():
    nvml = make_nvml(three_gpus())
    s = sampler(nvml)
    for _ in range(5):
        s.sample()
    assert nvml.fake_state["init_calls"] == 1
    assert nvml.fake_gpus[0].calls["nvmlDeviceGetName"] == 1  # identity resolved once, not per sample
    s.close()
    assert nvml.fake_state["shutdown_calls"] == 1


def test_forked_child_initialises_its_own_nvml():
    nvml = make_nvml(three_gpus())
    s = sampler(nvml)
    s.sample()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what it did, exit without running pytest's teardown
        try:
            s.sample()
            os.write(write_fd, str(nvml.fake_state["init_calls"]).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        child_inits = pipe.read()
    os.waitpid(pid, 0)
    assert child_inits == "2" and nvml.fake_state["init_calls"] == 1


@pytest.mark.parametrize("visible, expected", [
    ("1,0", [UUID1, UUID0]),
    ("2", [UUID2]),
    ("0,7,1", [UUID0]),            # an invalid index ends the list, as in CUDA
    ("0,-1,1", [UUID0]),
    (UUID1, [UUID1]),
    ("GPU-1111", [UUID0]),          # unique prefix
    ("11111111-aaaa", [UUID0]),     # without the GPU- prefix
    ("GPU-2222,0", []),             # ambiguous prefix: stops at once
    (f"{UUID2}, 0", [UUID2, UUID0]),
    ("0,0", [UUID0]),
])
def test_cuda_visible_devices_indices_and_uuids(visible, expected):
    s = sampler(make_nvml(three_gpus()), visible=visible)
    records = s.sample()
    assert [r["gpu_uuid"] for r in records] == expected
    assert [r["gpu_index"] for r in records] == list(range(len(expected)))
    assert s.status == ("ok" if expected else "no_devices")


def test_cuda_visible_devices_read_from_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,1")
    records = NvidiaSampler(make_nvml(three_gpus())).sample()
    assert [r["gpu_uuid"] for r in records] == [UUID2, UUID1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    s = NvidiaSampler(make_nvml(three_gpus()))
    assert s.sample() == [] and s.status == "no_devices"


def _mig_gpus():
    parent = FakeGpu(UUID1, name="NVIDIA Fake H100", mig=[
        FakeGpu(MIG_A, name="MIG 1g.10gb", memory_total=10 * 2**30, gpu_instance_id=7, compute_instance_id=0),
        FakeGpu(MIG_B, name="MIG 3g.40gb", memory_total=40 * 2**30, gpu_instance_id=1, compute_instance_id=0)])
    return [FakeGpu(UUID0), parent]


@pytest.mark.parametrize("visible, expected", [
    (MIG_B, [MIG_B]),
    ("MIG-aaaaaaaa", [MIG_A]),
    (f"MIG-{UUID1}/7/0", [MIG_A]),      # legacy MIG-GPU-<uuid>/<gi>/<ci>
    (f"{MIG_A},{MIG_B}", [MIG_A, MIG_B]),
    (f"MIG-{UUID1}/9/9", []),
])
def test_mig_devices(visible, expected):
    s = sampler(make_nvml(_mig_gpus()), visible=visible)
    records = s.sample()
    assert [r["gpu_uuid"] for r in records] == expected
    for r in records:
        assert r["gpu_utilization_percent"] is None  # NVML: not supported on a MIG instance
        assert r["gpu_memory_total_bytes"] in (10 * 2**30, 40 * 2**30)
    if expected:
        assert s.inventory()[0]["gpu_is_mig"] is True and s.inventory()[0]["gpu_physical_index"] == 1


def test_failing_device_beside_working_one(telemetry_logs):
    gpus = three_gpus()
    gpus[1].fail["*"] = fnv.NVML_ERROR_GPU_IS_LOST
    gpus[2].fail["nvmlDeviceGetHandleByIndex"] = fnv.NVML_ERROR_NO_PERMISSION
    s = sampler(make_nvml(gpus))
    first, second = s.sample(), s.sample()
    assert [r["gpu_uuid"] for r in first] == [UUID0, None]
    assert first[0]["gpu_power_watts"] == pytest.approx(123.456)
    lost = first[1]
    assert all(lost[k] is None for k in ("gpu_utilization_percent", "gpu_memory_used_bytes",
                                         "gpu_power_watts", "gpu_energy_joules", "gpu_processes"))
    assert second[0]["gpu_temperature_celsius"] == 55
    power_logs = [r for r in telemetry_logs if "gpu 1" in r.getMessage() and "power" in r.getMessage()]
    assert len(power_logs) == 1  # logged once, not on every sample


def test_not_supported_fields_are_null():
    gpus = three_gpus()
    gpus[0].fail["nvmlDeviceGetTotalEnergyConsumption"] = fnv.NVML_ERROR_NOT_SUPPORTED
    gpus[0].fail["nvmlDeviceGetPowerUsage"] = fnv.NVML_ERROR_NOT_SUPPORTED
    r = sampler(make_nvml(gpus), visible="0").sample()[0]
    assert r["gpu_energy_joules"] is None and r["gpu_power_watts"] is None
    assert r["gpu_memory_used_bytes"] == 2**30


@pytest.mark.parametrize("error, status", [
    (fnv.NVML_ERROR_LIBRARY_NOT_FOUND, "no_library"),
    (fnv.NVML_ERROR_DRIVER_NOT_LOADED, "no_driver"),
    (fnv.NVML_ERROR_UNKNOWN, "error"),
])
def test_init_failures_are_states(error, status):
    s = sampler(make_nvml(three_gpus(), init_error=error))
    assert s.sample() == [] and s.status == status and s.inventory() == []
    s.close()


def test_device_count_failure_is_a_state():
    s = sampler(make_nvml(three_gpus(), count_error=fnv.NVML_ERROR_UNKNOWN))
    assert s.sample() == [] and s.status == "error"


@no_real_gpu
def test_real_nvidia_ml_py_without_gpu_is_a_state():
    import pynvml  # installed as a test dependency; this machine has no NVIDIA driver

    assert pynvml.__name__ == "pynvml"
    s = NvidiaSampler()
    assert s.sample() == []
    assert s.status in ("no_library", "no_driver", "no_devices")
    gpu = GpuSampler()
    assert gpu.sample() == [] and gpu.inventory() == []
    assert gpu.status["nvidia"] == s.status
    s.close()
    gpu.close()


# -- AMD -------------------------------------------------------------------------------------------
AMD0, AMD1, AMD2 = "aaaa0000-0000-1000-8000-000000000001", "bbbb0000-0000-1000-8000-000000000002", \
    "cccc0000-0000-1000-8000-000000000003"


def amd_gpus():
    return [FakeAmdGpu(AMD0, processes=[(os.getpid(), 3 * 2**20)]),
            FakeAmdGpu(AMD1, asic_serial="0x00000000DEADBEEF", gfx_activity="N/A"),
            FakeAmdGpu(AMD2)]


def test_amd_fields_and_units():
    records = AmdSampler(make_amdsmi(amd_gpus()), env={}).sample()
    assert [r["gpu_uuid"] for r in records] == [AMD0, AMD1, AMD2]
    r = records[0]
    assert r["gpu_vendor"] == "amd" and r["gpu_name"] == "AMD Instinct MI250X"
    assert r["gpu_utilization_percent"] == 80 and r["gpu_memory_utilization_percent"] == 25
    assert r["gpu_memory_used_bytes"] == 2048 * 2**20 and r["gpu_memory_total_bytes"] == 65536 * 2**20
    assert r["gpu_power_watts"] == 300
    assert r["gpu_energy_joules"] == pytest.approx(15.3)
    assert (r["gpu_temperature_celsius"], r["gpu_temperature_hotspot_celsius"],
            r["gpu_temperature_memory_celsius"]) == (45, 60, 50)
    assert (r["gpu_sm_clock_mhz"], r["gpu_memory_clock_mhz"]) == (1700, 1600)
    assert r["gpu_processes"] == [{"pid": os.getpid(), "gpu_memory_used_bytes": 3 * 2**20}]
    assert records[1]["gpu_utilization_percent"] is None  # "N/A" in amdsmi


@pytest.mark.parametrize("env, expected", [
    ({"ROCR_VISIBLE_DEVICES": "2,0"}, [AMD2, AMD0]),
    ({"ROCR_VISIBLE_DEVICES": "GPU-00000000DEADBEEF"}, [AMD1]),
    ({"HIP_VISIBLE_DEVICES": "1"}, [AMD1]),
    ({"ROCR_VISIBLE_DEVICES": "2,1", "HIP_VISIBLE_DEVICES": "1"}, [AMD1]),  # HIP indexes ROCR's list
    ({"CUDA_VISIBLE_DEVICES": "2"}, [AMD2]),
    ({"HIP_VISIBLE_DEVICES": ""}, []),
])
def test_amd_visible_devices(env, expected):
    s = AmdSampler(make_amdsmi(amd_gpus()), env=env)
    assert [r["gpu_uuid"] for r in s.sample()] == expected
    assert s.status == ("ok" if expected else "no_devices")


def test_amd_failing_device_and_init_errors():
    gpus = amd_gpus()
    gpus[0].fail["*"] = 2
    records = AmdSampler(make_amdsmi(gpus), env={}).sample()
    assert records[0]["gpu_power_watts"] is None and records[1]["gpu_power_watts"] == 300
    s = AmdSampler(make_amdsmi(gpus, init_error=34), env={})
    assert s.sample() == [] and s.status == "no_driver"


def test_broken_amdsmi_import_is_quiet_and_a_state():
    """amdsmi without ROCm prints two lines then raises KeyError; stdout must stay clean."""
    fakes = Path(__file__).parent / "fakes" / "broken_amdsmi"
    code = ("from flowcept.telemetry.amd import AmdSampler\n"
            "s = AmdSampler()\n"
            "assert s.sample() == []\n"
            "import sys; sys.stderr.write(s.status)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fakes), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr.endswith("no_library")


def test_gpu_sampler_uses_whichever_vendor_has_devices():
    g = GpuSampler(nvml=make_nvml(three_gpus(), init_error=fnv.NVML_ERROR_DRIVER_NOT_LOADED),
                   amdsmi=make_amdsmi(amd_gpus()))
    assert g.status == {"nvidia": "no_driver", "amd": "ok"}
    assert [r["gpu_vendor"] for r in g.sample()] == ["amd"] * 3
    assert len(g.inventory()) == 3 and g.inventory()[0]["gpu_driver_version"] == "6.8.5"


def test_slow_energy_reads_are_throttled_fast_ones_are_not():
    import time

    fast = FakeGpu(UUID0)
    s = sampler(make_nvml([fast]))
    records = [s.sample()[0] for _ in range(3)]
    assert fast.calls["nvmlDeviceGetTotalEnergyConsumption"] == 3  # read every sample
    assert all("gpu_energy_age_s" not in r for r in records)
    slow = FakeGpu(UUID1, energy_delay_s=0.002)
    s = sampler(make_nvml([slow]), energy_refresh_s=0.05)
    first, second, third = s.sample()[0], s.sample()[0], s.sample()[0]
    # the first read is the driver's warm-up, never judged; the second is slow: the third reuses it
    assert slow.calls["nvmlDeviceGetTotalEnergyConsumption"] == 2
    assert "gpu_energy_age_s" not in first and "gpu_energy_age_s" not in second
    assert second["gpu_energy_joules"] == pytest.approx(987654.321)
    assert third["gpu_energy_joules"] == second["gpu_energy_joules"] and 0 <= third["gpu_energy_age_s"] < 0.05
    slow.energy_mj += 5000
    deadline = time.monotonic() + 5
    while "gpu_energy_age_s" in (fresh := s.sample()[0]) and time.monotonic() < deadline:
        pass
    assert slow.calls["nvmlDeviceGetTotalEnergyConsumption"] == 3  # due again after energy_refresh_s
    assert fresh["gpu_energy_joules"] == pytest.approx(987659.321)


def test_energy_throttle_counts_cpu_not_waiting_and_keeps_devices_apart():
    """A fast read that waits (here: for the GIL, a sleeping driver) is not slow; two devices whose
    UUIDs NVML cannot give keep their own counters."""
    import threading

    fast = FakeGpu(UUID0, energy_mj=1000)
    stop = threading.Event()

    def busy() -> None:  # a CPU-bound application thread: the sampler waits for the GIL after each call
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        s = sampler(make_nvml([fast]))
        records = [s.sample()[0] for _ in range(20)]
    finally:
        stop.set()
        worker.join(10)
    assert all("gpu_energy_age_s" not in r for r in records)
    assert fast.calls["nvmlDeviceGetTotalEnergyConsumption"] == 20
    twins = [FakeGpu(UUID1, energy_mj=1000, fail={"nvmlDeviceGetUUID": fnv.NVML_ERROR_UNKNOWN}),
             FakeGpu(UUID2, energy_mj=5000000, fail={"nvmlDeviceGetUUID": fnv.NVML_ERROR_UNKNOWN})]
    records = sampler(make_nvml(twins)).sample()
    assert [r["gpu_energy_joules"] for r in records] == [1.0, 5000.0]
