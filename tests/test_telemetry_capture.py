"""Per-task telemetry through the public API, process telemetry records, fork safety, machine info."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest
from conftest import no_real_gpu, real_nvidia_gpus, wait_for

from flowcept import Flowcept, FlowceptTask, flowcept_task
from flowcept.settings import load_settings
from flowcept.telemetry import build_capture, ensure_capture, machine_info
from flowcept.telemetry.capture import TelemetryCapture


def tasks_of(flowcept):
    return [r for r in flowcept.get_buffer() if r.get("type") == "task"]


@pytest.fixture
def telemetry_env(monkeypatch):
    for kind in ("CPU", "MEM", "PROCESS_INFO", "DISK", "NETWORK"):
        monkeypatch.setenv(f"FLOWCEPT_TELEMETRY_CAPTURE_{kind}", "true")
    return monkeypatch


def test_default_settings_enable_no_telemetry():
    assert build_capture(load_settings(env={})) is None
    with Flowcept() as f:
        with FlowceptTask(activity_id="plain") as t:
            t.end(generated={"x": 1})
    (task,) = tasks_of(f)
    assert "telemetry_at_start" not in task or task["telemetry_at_start"] is None


def test_cached_telemetry_on_tasks_through_the_api(telemetry_env):
    with Flowcept() as f:
        with FlowceptTask(activity_id="measured") as t:
            t.end(generated={"x": 1})
        with FlowceptTask(activity_id="opted_out", capture_telemetry=False) as t:
            t.end()
    measured, opted_out = tasks_of(f)
    start, end = measured["telemetry_at_start"], measured["telemetry_at_end"]
    assert set(start) == {"cpu", "memory", "process", "disk", "network"}
    assert start["process"]["pid"] == os.getpid() and start["process"]["process_rss_bytes"] > 0
    assert start["memory"]["memory_total_bytes"] > 0 and "disk_usage" in start["disk"]
    assert end["cpu"]["cpu_count_logical"] >= 1
    assert not opted_out.get("telemetry_at_start") and not opted_out.get("telemetry_at_end")


def test_cached_snapshot_is_replaced_never_mutated(telemetry_env):
    telemetry_env.setenv("FLOWCEPT_TELEMETRY_CAPTURE_INTERVAL_S", "0.02")
    capture = build_capture(load_settings())
    try:
        first = capture.capture()
        frozen = orjson.dumps(first)
        assert capture.capture() is first  # a task copies a reference, nothing more
        wait_for(lambda: capture.capture() is not first, timeout=10, what="a refreshed snapshot")
        assert orjson.dumps(first) == frozen
        wait_for(lambda: capture.capture()["cpu"]["cpu_percent"] is not None, timeout=10,
                 what="a measured CPU%")
    finally:
        capture.stop()
        capture.stop()  # idempotent
    assert capture._thread is None


def test_sync_mode_samples_on_the_spot(telemetry_env):
    telemetry_env.setenv("FLOWCEPT_TELEMETRY_CAPTURE_MODE", "sync")
    telemetry_env.setenv("FLOWCEPT_TELEMETRY_CAPTURE_DISK", "false")
    with Flowcept() as f:

        @flowcept_task
        def spin(n):
            return sum(range(n))

        spin(200000)
    (task,) = tasks_of(f)
    start, end = task["telemetry_at_start"], task["telemetry_at_end"]
    assert start is not end and "disk" not in start
    assert end["process"]["process_cpu_user_seconds"] >= start["process"]["process_cpu_user_seconds"]
    assert start["cpu"]["cpu_percent"] is not None  # measured over an interval, even the first


def test_explicit_capture_telemetry_when_settings_enable_nothing():
    with Flowcept() as f:
        with FlowceptTask(activity_id="asked", capture_telemetry=True) as t:
            t.end()
    (task,) = tasks_of(f)
    assert set(task["telemetry_at_start"]) == {"cpu", "memory", "process"}
    assert ensure_capture() is ensure_capture()


def test_process_telemetry_records_emitted_on_interval(monkeypatch):
    monkeypatch.setenv("FLOWCEPT_TELEMETRY_CAPTURE_PROCESS_INFO", "true")
    monkeypatch.setenv("FLOWCEPT_TELEMETRY_CAPTURE_EMIT_INTERVAL_S", "0.02")
    with Flowcept() as f:
        wait_for(lambda: sum(r.get("type") == "telemetry" for r in f.get_buffer()) >= 2, timeout=20,
                 what="two telemetry records")
    records = [r for r in f.get_buffer() if r.get("type") == "telemetry"]
    for r in records:
        assert list(r)[:2] == ["type", "telemetry_id"]
        assert r["workflow_id"] == f.current_workflow_id and r["pid"] == os.getpid()
        assert r["kind"] == "process" and "rank" in r and r["timestamp"] > 0 and r["hostname"]
        assert r["process_rss_bytes"] > 0
    assert len({r["telemetry_id"] for r in records}) == len(records)


def test_forked_child_restarts_the_snapshot_thread():
    capture = TelemetryCapture(process=True, mode="cached", interval_s=0.02).start()
    try:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                me = os.getpid()
                import time

                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    snap = capture.capture()
                    if snap.get("process", {}).get("pid") == me and capture._thread.is_alive():
                        code = 0
                        break
                    time.sleep(0.005)  # polling with a deadline
                os.write(write_fd, str(code).encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            result = pipe.read()
        os.waitpid(pid, 0)
        assert result == "0"
        assert capture.capture()["process"]["pid"] == os.getpid()
    finally:
        capture.stop()


@no_real_gpu
def test_gpu_setting_without_gpu_is_harmless(monkeypatch):
    monkeypatch.setenv("FLOWCEPT_TELEMETRY_CAPTURE_GPU", "used,power")
    with Flowcept() as f:
        with FlowceptTask(activity_id="gpu") as t:
            t.end()
    (task,) = tasks_of(f)
    assert task["telemetry_at_start"]["gpu"] == []


SECRETS = {"FOO_TOKEN": "tok-123-secret", "AWS_SECRET_ACCESS_KEY": "aws-very-secret",
           "MYAPP_API_KEY": "myapp-secret", "DB_PASSWORD": "hunter2-secret"}


def test_machine_info_has_facts_and_no_secrets(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MYAPP_MODE", "fast")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_JOB_PARTITION", "debug")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[01-04]")
    monkeypatch.setenv("FLOWCEPT_TELEMETRY_CAPTURE_ENV_ALLOWLIST", "MYAPP_*")
    info = machine_info(load_settings())
    assert info["hostname"] and info["os"]["system"] and info["cpu"]["count_logical"] >= 1
    assert info["memory"]["total_bytes"] > 0
    assert len(info["gpu"]["devices"]) == real_nvidia_gpus()  # none on the usual runners
    assert info["slurm"] == {**info["slurm"], "job_id": "777", "partition": "debug", "nodelist": "node[01-04]"}
    assert info["environment"]["MYAPP_MODE"] == "fast" and info["environment"]["OMP_NUM_THREADS"] == "4"
    text = orjson.dumps(info).decode()
    for name, value in SECRETS.items():
        assert name not in text and value not in text


def test_workflow_record_carries_machine_info_without_secrets(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    with Flowcept() as f:
        pass
    (workflow,) = [r for r in f.get_buffer() if r.get("type") == "workflow" and "machine_info" in r]
    assert workflow["machine_info"]["cpu"]["count_logical"] >= 1
    text = orjson.dumps(workflow["machine_info"]).decode()
    assert not any(value in text for value in SECRETS.values())


def test_machine_info_never_raises():
    class Broken:
        def __getitem__(self, key):
            raise RuntimeError("broken settings")

    assert machine_info(Broken())["hostname"]
    import flowcept.telemetry
    import flowcept.telemetry.machine  # noqa: F401  (a submodule must not shadow the function)

    assert callable(flowcept.telemetry.machine_info)


def test_import_flowcept_loads_no_gpu_library():
    code = ("import sys, flowcept\n"
            "bad = [m for m in ('pynvml', 'amdsmi', 'psutil') if m in sys.modules]\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_cached_snapshots_are_written_from_their_json_made_once(telemetry_env):
    """A published snapshot is serialised once (an orjson Fragment) and copied into each task's
    line: the lines hold exactly the snapshots the tasks got, also across a refresh."""
    telemetry_env.setenv("FLOWCEPT_TELEMETRY_CAPTURE_INTERVAL_S", "0.02")
    with Flowcept(workflow_id="fragwf") as f:
        snapshots = []
        for i in range(3):
            task = FlowceptTask(activity_id="measured", used={"i": i})
            telemetry = task._telemetry
            assert telemetry.fragment_of(task.to_dict()["telemetry_at_start"]) is not None
            first = telemetry.capture()
            wait_for(lambda t=telemetry, old=first: t.capture() is not old, 5, "a refreshed snapshot")
            task.end(generated={"i": i})  # at_start: the previous snapshot, at_end: the new one
            snapshots.append((orjson.loads(orjson.dumps(task.to_dict()["telemetry_at_start"])),
                              orjson.loads(orjson.dumps(task.to_dict()["telemetry_at_end"]))))
    written = sorted(tasks_of(f), key=lambda r: r["used"]["i"])
    assert [(r["telemetry_at_start"], r["telemetry_at_end"]) for r in written] == snapshots
    assert all(start != end for start, end in snapshots)  # two different snapshots in each line
    assert telemetry.fragment_of({"not": "published"}) is None


def test_decorated_calls_write_cached_snapshots_from_their_json(telemetry_env):
    @flowcept_task
    def square(x):
        return {"y": x * x}

    with Flowcept(workflow_id="fragdeco") as f:
        from flowcept import capture

        telemetry = capture.state.telemetry
        expected = orjson.loads(orjson.dumps(telemetry.capture()))
        assert telemetry.fragment_of(telemetry.capture()) is not None
        for i in range(3):
            square(i)
    records = [r for r in tasks_of(f) if r["activity_id"] == "square"]
    assert [r["generated"] for r in records] == [{"y": 0}, {"y": 1}, {"y": 4}]
    assert all(set(r["telemetry_at_start"]) == set(expected) and r["telemetry_at_end"] for r in records)
