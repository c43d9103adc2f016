"""Real NVIDIA GPU checks, no fakes: NVML fields, a torch load, CUDA_VISIBLE_DEVICES, tasks, daemon to HDF5.

The whole module is skipped unless nvidia-ml-py initialises NVML and sees at least one device
(decided by our own ``NvmlState``). On a GPU machine: ``scripts/gpu_device_check.sh`` (see
docs/gpu-check.md). Every wait has a deadline; the module takes well under a minute.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from conftest import read_lines, wait_for

from flowcept.telemetry.nvidia import NvidiaSampler, NvmlState


def _probe_nvml() -> tuple:
    state = NvmlState()
    try:
        return state.ensure(), f"{state.status}" + (f" ({state.detail})" if state.detail else "")
    finally:
        state.shutdown()


_NVML_OK, _NVML_WHY = _probe_nvml()
if not _NVML_OK:
    pytest.skip(f"needs a real NVIDIA GPU visible through NVML (nvidia-ml-py): {_NVML_WHY}",
                allow_module_level=True)

try:  # the daemon needs pyzmq; without it only the daemon test is skipped
    import zmq  # noqa: F401

    HAVE_ZMQ = True
except Exception:
    HAVE_ZMQ = False
if HAVE_ZMQ:
    from test_daemon import node_files, start_client, start_daemon  # noqa: F401  (fixture)

pytestmark = pytest.mark.gpu

CORE_FIELDS = ("gpu_memory_used_bytes", "gpu_memory_total_bytes", "gpu_utilization_percent",
               "gpu_temperature_celsius", "gpu_power_watts")
OPTIONAL_NUMBERS = ("gpu_memory_utilization_percent", "gpu_energy_joules", "gpu_sm_clock_mhz",
                    "gpu_memory_clock_mhz", "gpu_graphics_clock_mhz")
GiB = 2**30


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def visible_uuids(visible: Optional[str] = "env") -> List[str]:
    """The UUIDs our sampler reports for a CUDA_VISIBLE_DEVICES value ("env": the environment's)."""
    sampler = NvidiaSampler(visible_devices=visible)
    try:
        return [r["gpu_uuid"] for r in sampler.sample()]
    finally:
        sampler.close()


@pytest.fixture
def nvidia():
    sampler = NvidiaSampler()
    yield sampler
    sampler.close()


# -- (a) every visible device, every field ------------------------------------------------------------

def test_every_visible_device_has_real_fields(nvidia):
    records = nvidia.sample()
    assert nvidia.status == "ok"
    assert len(records) == len(nvidia.state.devices) >= 1
    assert [r["gpu_index"] for r in records] == list(range(len(records)))
    assert len({r["gpu_uuid"] for r in records}) == len(records)
    for r in records:
        assert r["gpu_vendor"] == "nvidia" and isinstance(r["gpu_name"], str) and r["gpu_name"].strip()
        assert r["gpu_uuid"].startswith(("GPU-", "MIG-")), r["gpu_uuid"]
        for name in CORE_FIELDS:
            assert is_number(r[name]), (name, r[name])
        assert r["gpu_memory_total_bytes"] > 0
        assert 0 <= r["gpu_memory_used_bytes"] <= r["gpu_memory_total_bytes"]
        assert 0 <= r["gpu_utilization_percent"] <= 100
        assert 0 < r["gpu_temperature_celsius"] < 120 and 0 < r["gpu_power_watts"] < 2000
        for name in OPTIONAL_NUMBERS:  # a query the device does not support reads None
            assert r[name] is None or is_number(r[name]), (name, r[name])
        assert r["gpu_processes"] is None or all(isinstance(p["pid"], int) for p in r["gpu_processes"])
    unsupported = {d.uuid: sorted(d.guard.failed_fields) for d in nvidia.state.devices if d.guard.failed_fields}
    print(f"devices: {[(r['gpu_name'], r['gpu_uuid']) for r in records]}; unsupported fields: {unsupported}")


def test_inventory_and_machine_info_agree_with_samples(nvidia):
    from flowcept.telemetry import machine_info

    records = nvidia.sample()
    inventory = nvidia.inventory()
    assert [d["gpu_uuid"] for d in inventory] == [r["gpu_uuid"] for r in records]
    for device, record in zip(inventory, records):
        assert device["gpu_memory_total_bytes"] == record["gpu_memory_total_bytes"]
        assert device["gpu_driver_version"] and device["gpu_is_mig"] is record["gpu_uuid"].startswith("MIG-")
    info = machine_info()
    assert info["gpu"]["status"]["nvidia"] == "ok"
    assert [d["gpu_uuid"] for d in info["gpu"]["devices"] if d["gpu_vendor"] == "nvidia"] == \
        [r["gpu_uuid"] for r in records]


def test_energy_counter_never_goes_back(nvidia):
    first = nvidia.sample()
    second = nvidia.sample()
    for a, b in zip(first, second):
        if a["gpu_energy_joules"] is not None:
            assert b["gpu_energy_joules"] >= a["gpu_energy_joules"] > 0


# -- (b) a real load under torch ----------------------------------------------------------------------

def _torch_device_index(torch, uuids: List[str]) -> int:
    """Position of torch's cuda:0 among our records (by UUID where torch exposes it)."""
    try:
        uuid = str(torch.cuda.get_device_properties(0).uuid)
    except Exception:
        return 0
    for i, ours in enumerate(uuids):
        if ours.lower().endswith(uuid.lower().removeprefix("gpu-")):
            return i
    return 0


@pytest.fixture(scope="module")
def torch_load() -> Dict[str, object]:
    """Sample before, during (~1.5 s of matmuls with 2 GiB held) and after a load on cuda:0."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    sampler = NvidiaSampler(energy_refresh_s=0.0)  # a fresh energy read every sample, even where slow
    before = sampler.sample()
    import torch

    if not torch.cuda.is_available():
        sampler.close()
        pytest.skip("torch has no CUDA here")
    index = _torch_device_index(torch, [r["gpu_uuid"] for r in before])
    device = torch.device("cuda:0")
    held = torch.empty(2 * GiB // 4, dtype=torch.float32, device=device)
    held.fill_(1.0)
    a = torch.randn(8192, 8192, device=device)
    torch.cuda.synchronize()
    during: List[dict] = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        for _ in range(3):
            b = a @ a
        during.append(sampler.sample()[index])  # sampled while the matmuls run
        torch.cuda.synchronize()
    mine = sampler.sample(pids=[os.getpid()])[index]
    checksum = float(b[0, 0].item()) + float(held[-1].item())
    del held, a, b
    torch.cuda.empty_cache()
    after = sampler.sample()[index]
    sampler.close()
    return {"before": before[index], "during": during, "mine": mine, "after": after, "checksum": checksum}


def test_memory_rises_with_an_allocation(torch_load):
    before, during = torch_load["before"], torch_load["during"]
    peak = max(r["gpu_memory_used_bytes"] for r in during)
    assert peak - before["gpu_memory_used_bytes"] >= 1.5 * GiB, (before["gpu_memory_used_bytes"], peak)
    assert peak <= before["gpu_memory_total_bytes"]


def test_utilization_seen_under_load(torch_load):
    utils = [r["gpu_utilization_percent"] for r in torch_load["during"]]
    assert any(u and u > 0 for u in utils), utils
    clocks = [r["gpu_sm_clock_mhz"] for r in torch_load["during"] if r["gpu_sm_clock_mhz"] is not None]
    assert all(c > 0 for c in clocks)


def test_energy_counter_increases_under_load(torch_load):
    before, after = torch_load["before"], torch_load["after"]
    if before["gpu_energy_joules"] is None:
        pytest.skip("this device does not report total energy")
    assert after["gpu_energy_joules"] > before["gpu_energy_joules"]
    print(f"energy over the load: {after['gpu_energy_joules'] - before['gpu_energy_joules']:.1f} J; "
          f"power during: {[r['gpu_power_watts'] for r in torch_load['during']][:8]}")


def test_our_pid_among_gpu_processes(torch_load):
    seen = {p["pid"]: p["gpu_memory_used_bytes"] for r in torch_load["during"] for p in r["gpu_processes"] or ()}
    if not seen:
        pytest.xfail("NVML lists no compute process on this device (driver/container does not expose them)")
    if os.getpid() not in seen:
        pytest.xfail(f"NVML lists pids {sorted(seen)} but not ours ({os.getpid()}): another pid namespace "
                     f"(container) - not translatable by the sampler")
    assert seen[os.getpid()] is None or seen[os.getpid()] >= GiB
    mine = torch_load["mine"]["gpu_processes"]
    assert [p["pid"] for p in mine] == [os.getpid()]  # filtered to the pids asked for


# -- (c) CUDA_VISIBLE_DEVICES against CUDA itself ------------------------------------------------------

CUDA_PROBE = r"""
import ctypes, json
cuda = ctypes.CDLL("libcuda.so.1")
out = {"init": cuda.cuInit(0), "uuids": []}
if out["init"] == 0:
    count = ctypes.c_int()
    cuda.cuDeviceGetCount(ctypes.byref(count))
    for i in range(count.value):
        dev = ctypes.c_int()
        cuda.cuDeviceGet(ctypes.byref(dev), i)
        raw = (ctypes.c_ubyte * 16)()
        cuda.cuDeviceGetUuid(raw, dev.value)
        h = bytes(raw).hex()
        out["uuids"].append(f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
print(json.dumps(out))
"""


def cuda_sees(visible: str) -> Optional[List[str]]:
    """The UUIDs CUDA's driver API enumerates under ``CUDA_VISIBLE_DEVICES=visible`` (None: no libcuda)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    done = subprocess.run([sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True, env=env, timeout=60)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["uuids"]


def unique_prefix(uuid: str, others: List[str]) -> str:
    for length in range(8, len(uuid) + 1):
        if not any(o != uuid and o.lower().startswith(uuid[:length].lower()) for o in others):
            return uuid[:length]
    return uuid


def test_cuda_visible_devices_uuid_prefix_and_invalid(nvidia, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    every = [r["gpu_uuid"] for r in nvidia.sample()]
    if not every[-1].startswith("GPU-"):
        pytest.skip("MIG instances: checked with fakes only")
    uuid = every[-1]
    prefix = unique_prefix(uuid, every)
    cases = {uuid: [uuid], prefix: [uuid], uuid[4:]: [uuid], f"{uuid},{uuid}": [uuid],
             f"{uuid},GPU-zzzzzzzz,0": [uuid], "GPU-zzzzzzzz": [], "-1": [], "0": [every[0]]}
    for visible, expected in cases.items():
        assert visible_uuids(visible) == expected, visible
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", prefix)
    assert [r["gpu_uuid"] for r in NvidiaSampler().sample()] == [uuid]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-zzzzzzzz")
    empty = NvidiaSampler()
    assert empty.sample() == [] and empty.status == "no_devices"
    for visible in (uuid, prefix, "GPU-zzzzzzzz"):  # CUDA itself agrees (where libcuda loads)
        seen = cuda_sees(visible)
        if seen is None:
            pytest.skip("libcuda.so.1 not loadable: compared with NVML rules only")
        assert seen == cases[visible], (visible, seen)


# -- (d) tasks carry GPU telemetry -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["cached", "sync"])
def test_tasks_carry_gpu_telemetry(monkeypatch, mode):
    from flowcept import Flowcept, FlowceptTask

    monkeypatch.setenv("FLOWCEPT_TELEMETRY_CAPTURE_GPU", "all")
    monkeypatch.setenv("FLOWCEPT_TELEMETRY_CAPTURE_MODE", mode)
    monkeypatch.setenv("FLOWCEPT_TELEMETRY_CAPTURE_INTERVAL_S", "0.05")
    expected = visible_uuids()
    with Flowcept(workflow_name=f"gpu-{mode}") as f:
        for i in range(3):
            with FlowceptTask(activity_id="on_gpu", used={"i": i}) as task:
                task.end(generated={"i": i})
        workflow_id = f.current_workflow_id
    records = Flowcept.read_buffer_file(workflow_id=workflow_id)
    tasks = [r for r in records if r.get("type") == "task" and r.get("activity_id") == "on_gpu"]
    assert len(tasks) == 3
    for task in tasks:
        for key in ("telemetry_at_start", "telemetry_at_end"):
            gpus = task[key]["gpu"]
            assert [g["gpu_uuid"] for g in gpus] == expected, key
            for g in gpus:
                assert all(is_number(g[name]) for name in CORE_FIELDS), g
                assert g["gpu_processes"] is None or {p["pid"] for p in g["gpu_processes"]} <= {os.getpid()}
    (workflow,) = [r for r in records if r.get("type") == "workflow" and r.get("machine_info")]
    assert workflow["machine_info"]["gpu"]["status"]["nvidia"] == "ok"
    assert [d["gpu_uuid"] for d in workflow["machine_info"]["gpu"]["devices"]] == expected


# -- (e) the node daemon samples the GPUs; consolidation has per-GPU series --------------------------------

@pytest.mark.skipif(not HAVE_ZMQ, reason="the node daemon needs pyzmq")
def test_daemon_gpu_telemetry_to_hdf5(start_daemon, buffer_base: str, tmp_path: Path):
    h5py = pytest.importorskip("h5py")
    from flowcept.consolidation import consolidate

    uuids = visible_uuids()
    daemon = start_daemon("--telemetry-interval", "0.1", gpu=True)
    workflow_id = "wf-gpu-daemon"
    paused, resume = tmp_path / "paused", tmp_path / "resume"
    client = start_client(daemon, workflow_id, 20, "10", str(paused), str(resume))
    try:
        wait_for(paused.exists, 30, "the client to pause")
        [path] = node_files(buffer_base, workflow_id)

        def gpu_lines() -> List[dict]:
            return [r for r in read_lines(path) if r.get("type") == "telemetry" and r.get("kind") == "gpu"]

        wait_for(lambda: len(gpu_lines()) >= 3 * len(uuids), 20, "three GPU samples per device from the daemon")
    finally:
        resume.touch()
        out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err.decode()
    status = daemon.status()
    assert status["telemetry"]["sampler"]["gpu"]["nvidia"] == "ok", status["telemetry"]["sampler"]
    records = gpu_lines()
    assert {r["gpu_uuid"] for r in records} == set(uuids)
    for r in records:
        assert r["workflow_id"] == workflow_id and r["hostname"] and r["timestamp"] > 0
        assert all(is_number(r[name]) for name in CORE_FIELDS), r
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=20) == 0
    report = consolidate(buffer_base, workflow_id, output_format="hdf5", cleanup_files=False)
    with h5py.File(report.output_path, "r") as handle:
        nodes = handle["telemetry/nodes"]
        gpu_groups = [nodes[node]["gpus"][gpu] for node in nodes if "gpus" in nodes[node]
                      for gpu in nodes[node]["gpus"]]
        layout = {node: sorted(nodes[node]) for node in nodes}
        assert len(gpu_groups) >= len(uuids), f"no /telemetry/nodes/<node>/gpus/<gpu>/ per device: {layout}"
        for group in gpu_groups:
            rows = group["timestamp"].shape[0]
            assert rows >= 3, group.name
            columns = {name: group[name][:] for name in group if isinstance(group[name], h5py.Dataset)}
            numeric = {name: values for name, values in columns.items() if values.dtype.kind == "f"}
            assert len(numeric) >= 4, (group.name, sorted(columns))
            assert all(values.shape[0] == rows for values in numeric.values())
            totals = [values for name, values in numeric.items() if "memory_total" in name]
            assert totals and (totals[0] > 0).all(), (group.name, sorted(numeric))
