"""CPU, memory, disk, network and process samplers on this machine's real psutil."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types

import psutil
import pytest

from flowcept.telemetry.cpu import CpuSampler
from flowcept.telemetry.disk import DiskSampler
from flowcept.telemetry.memory import MemorySampler
from flowcept.telemetry.network import NetworkSampler
from flowcept.telemetry.node import NodeSampler
from flowcept.telemetry.process import ProcessGone, ProcessSampler


@pytest.fixture
def busy_process():
    """A child that spins one core until killed."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield child
    child.kill()
    child.wait(timeout=10)


def _psutil_with(**broken):
    """Real psutil, except the named functions raise (a sensor the machine lacks)."""
    proxy = types.SimpleNamespace(**{n: getattr(psutil, n) for n in dir(psutil) if not n.startswith("_")})

    def fail(*_a, **_k):
        raise OSError("no such sensor")

    for name in broken:
        setattr(proxy, name, fail)
    return proxy


def test_cpu_first_sample_is_measured_not_zero_and_per_cpu_listed():
    sampler = CpuSampler(per_cpu=True)
    record = sampler.sample()
    assert record["cpu_percent"] is not None and 0.0 <= record["cpu_percent"] <= 100.0
    assert len(record["cpu_percent_per_cpu"]) == psutil.cpu_count()
    assert record["cpu_user_seconds"] > 0 and record["cpu_count_logical"] == psutil.cpu_count()
    assert record["load_avg_1m"] is not None


def test_cpu_without_waiting_reports_none_first_never_zero():
    record = CpuSampler(wait_first=False).sample()
    assert record["cpu_percent"] is None  # nothing measured yet: null, not a fake 0.0


def test_failing_field_is_null_and_logged_once_others_survive(telemetry_logs):
    sampler = CpuSampler(psutil=_psutil_with(cpu_freq=True, getloadavg=True))
    first, second = sampler.sample(), sampler.sample()
    assert first["cpu_frequency_mhz"] is None and first["load_avg_1m"] is None
    assert first["cpu_user_seconds"] is not None and second["cpu_percent"] is not None
    assert sum("cpu_frequency" in r.getMessage() for r in telemetry_logs) == 1


def test_memory_fields_in_bytes():
    record = MemorySampler().sample()
    assert record["memory_total_bytes"] == psutil.virtual_memory().total
    assert 0 < record["memory_used_bytes"] < record["memory_total_bytes"]
    assert "swap_total_bytes" in record and 0 <= record["memory_percent"] <= 100


def test_disk_usage_covers_output_directory_mount(tmp_path):
    out_dir = tmp_path / "not" / "yet" / "created"
    sampler = DiskSampler(paths=[str(out_dir)])
    record = sampler.sample()
    mounts = {u["mountpoint"] for u in record["disk_usage"]}
    assert "/" in mounts
    expected = max((p.mountpoint for p in psutil.disk_partitions()
                    if str(tmp_path).startswith(p.mountpoint.rstrip("/") + "/")), key=len, default="/")
    assert expected in mounts
    assert all(u["total_bytes"] and u["total_bytes"] >= u["used_bytes"] for u in record["disk_usage"])
    assert "disk_read_bytes" in record


def test_network_reports_interfaces_that_moved():
    sampler = NetworkSampler()
    server = socket.create_server(("127.0.0.1", 0))
    try:
        client = socket.create_connection(server.getsockname(), timeout=5)
        conn, _ = server.accept()
        client.sendall(b"x" * 65536)
        received = 0
        while received < 65536:
            received += len(conn.recv(65536))
        client.close()
        conn.close()
    finally:
        server.close()
    record = sampler.sample()
    assert "lo" in record["net_interfaces"]
    assert record["net_interfaces"]["lo"]["bytes_recv"] > 0
    assert record["net_bytes_recv"] >= record["net_interfaces"]["lo"]["bytes_recv"]


def test_process_cpu_percent_of_busy_process_is_not_zero(busy_process):
    sampler = ProcessSampler(busy_process.pid)
    record = sampler.sample()
    assert record["pid"] == busy_process.pid
    assert record["process_cpu_percent"] > 20.0
    assert record["process_rss_bytes"] > 0 and record["process_num_threads"] >= 1
    assert record["process_num_fds"] >= 3 and record["process_ctx_switches_involuntary"] is not None


def test_process_gone_is_reported(busy_process):
    sampler = ProcessSampler(busy_process.pid, wait_first=False)
    busy_process.kill()
    busy_process.wait(timeout=10)
    with pytest.raises(ProcessGone):
        sampler.sample()


def test_node_sampler_records_node_processes_and_drops_exited_pids(busy_process):
    pids = {os.getpid(): 0, busy_process.pid: 1}
    sampler = NodeSampler(gpu=False, pids_provider=lambda: dict(pids), extra={"job_id": "42"})
    records = sampler.sample()
    assert [r["kind"] for r in records] == ["node", "process", "process"]
    for r in records:
        assert list(r)[:2] == ["type", "telemetry_id"] and r["type"] == "telemetry"
        assert r["hostname"] and r["timestamp"] > 0 and r["job_id"] == "42"
    assert {r["rank"] for r in records[1:]} == {0, 1}
    assert records[0]["cpu_percent"] is None and "memory_used_bytes" in records[0]
    busy_process.kill()
    busy_process.wait(timeout=10)
    pids[999999999] = 2  # never existed
    records = sampler.sample()
    assert [r.get("pid") for r in records if r["kind"] == "process"] == [os.getpid()]
    assert len({r["telemetry_id"] for r in records}) == len(records)
    sampler.close()
    sampler.close()
