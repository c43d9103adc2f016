"""Many processes, one workflow: per-process files, exact-id consolidation, idempotence, torn lines."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest
from conftest import APPS, app_env, read_lines, tasks_of

from flowcept import Flowcept, FlowceptTask

N_PROCS, N_TASKS = 4, 25


def _spawn_workers(workflow_id, n_procs, env_extra, tag="w"):
    procs = [subprocess.Popen([sys.executable, str(APPS / "worker.py"), workflow_id, str(N_TASKS), f"{tag}{k}"],
                              env=app_env(env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k in range(n_procs)]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()


def _check(records, workflow_id, n_procs):
    assert all(r.get("workflow_id") == workflow_id for r in records)
    tasks = tasks_of(records)
    assert len(tasks) == n_procs * N_TASKS * 2
    assert len({r["task_id"] for r in tasks}) == len(tasks)
    pids = {r["pid"] for r in tasks}
    assert len(pids) == n_procs
    workflows = [r for r in records if r["type"] == "workflow"]
    assert len(workflows) == 1 and workflows[0]["workflow_id"] == workflow_id


@pytest.mark.parametrize("consolidate_on_stop", ["false", "true"])
def test_many_processes_one_workflow_prefix_sibling_stays_out(buffer_base, flowcept_tmp, consolidate_on_stop):
    env = {"FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP": consolidate_on_stop}
    _spawn_workers("wf", N_PROCS, env)
    _spawn_workers("wf_2", 2, env, tag="other")
    names = sorted(os.listdir(flowcept_tmp))
    assert any(n.startswith("flowcept_buffer_wf_2") for n in names), names

    records = Flowcept.read_buffer_file(consolidate=True, workflow_id="wf")
    _check(records, "wf", N_PROCS)
    assert os.path.exists(flowcept_tmp / "flowcept_buffer_wf.jsonl")
    assert read_lines(str(flowcept_tmp / "flowcept_buffer_wf.jsonl"))  # every line parses
    again = Flowcept.read_buffer_file(consolidate=True, workflow_id="wf")
    _check(again, "wf", N_PROCS)
    assert sorted(r.get("task_id", "") for r in again) == sorted(r.get("task_id", "") for r in records)

    other = Flowcept.read_buffer_file(consolidate=True, workflow_id="wf_2")
    _check(other, "wf_2", 2)
    # After cleanup only the two consolidated files remain.
    left = sorted(n for n in os.listdir(flowcept_tmp) if n.startswith("flowcept_buffer"))
    assert left == ["flowcept_buffer_wf.jsonl", "flowcept_buffer_wf_2.jsonl"], left


def test_consolidate_without_cleanup_keeps_sources(buffer_base, flowcept_tmp):
    _spawn_workers("keep", 2, {"FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP": "false"})
    before = sorted(os.listdir(flowcept_tmp))
    records = Flowcept.read_buffer_file(consolidate=True, workflow_id="keep", cleanup_files=False)
    _check(records, "keep", 2)
    after = set(os.listdir(flowcept_tmp))
    assert set(before) <= after


def test_records_reach_the_file_while_running(buffer_base, flowcept_tmp):
    from conftest import wait_for

    from flowcept.buffer import get_pipeline

    with Flowcept(workflow_id="live") as fc:
        FlowceptTask(activity_id="early", generated={"a": 1})
        paths = get_pipeline().transport.paths
        wait_for(lambda: any(os.path.exists(p) and os.path.getsize(p) > 0 for p in paths()), 10,
                 "the flusher to write without stop()")
        assert any(r.get("activity_id") == "early" for p in paths() for r in read_lines(p))
    assert fc.output_path and os.path.exists(fc.output_path)


def test_torn_last_line_costs_only_that_line(buffer_base, flowcept_tmp):
    with Flowcept(workflow_id="torn") as fc:
        for i in range(10):
            FlowceptTask(activity_id="t", used={"i": i}, generated={"x": "y" * 50})
    path = fc.output_path
    size = os.path.getsize(path)
    with open(path, "rb+") as handle:
        data = handle.read()
        last_start = data.rstrip(b"\n").rfind(b"\n") + 1
        handle.truncate(last_start + (size - last_start) // 2)
    records = Flowcept.read_buffer_file(path)
    assert len(records) == 10  # 11 records (10 tasks + workflow) minus the torn one
    # A corrupt line in the middle costs that line only, too.
    with open(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    lines[2] = b'{"type": "task", "task_id": '
    with open(path, "wb") as handle:
        handle.write(b"\n".join(lines))
    assert len(Flowcept.read_buffer_file(path)) == 9


def test_torn_line_in_a_source_file_during_consolidation(buffer_base, flowcept_tmp):
    _spawn_workers("tornsrc", 2, {"FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP": "false"})
    sources = sorted(p for p in os.listdir(flowcept_tmp) if p.startswith("flowcept_buffer_tornsrc_"))
    victim = flowcept_tmp / sources[0]
    with open(victim, "ab") as handle:
        handle.write(b'{"type":"task","task_id":"half')
    records = Flowcept.read_buffer_file(consolidate=True, workflow_id="tornsrc")
    _check(records, "tornsrc", 2)


def test_missing_file_is_a_clear_error(flowcept_tmp):
    with pytest.raises(FileNotFoundError):
        Flowcept.read_buffer_file(str(flowcept_tmp / "nope.jsonl"))


def test_buffer_view_cap_falls_back_to_files(monkeypatch):
    monkeypatch.setenv("FLOWCEPT_PROJECT_BUFFER_VIEW_MAX_RECORDS", "50")
    with Flowcept(workflow_id="capped", save_workflow=False) as fc:
        for i in range(120):
            FlowceptTask(activity_id="c", used={"i": i}, generated={"i": i})
        inside = fc.get_buffer()
    assert len(tasks_of(inside)) == 120
    assert len(tasks_of(fc.get_buffer())) == 120


def test_back_pressure_bounds_the_queue(monkeypatch):
    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_INTERVAL_S", "60")
    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_SIZE", "10")
    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_MAX_PENDING", "100")
    from flowcept.buffer import get_pipeline

    with Flowcept(workflow_id="bp") as fc:
        peak = 0
        for i in range(2000):
            FlowceptTask(activity_id="bp", used={"i": i}, generated={"i": i})
            peak = max(peak, get_pipeline().pending())
    assert peak <= 100
    assert len(tasks_of(Flowcept.read_buffer_file(fc.output_path))) == 2000


def test_background_sync_leaves_the_file_to_consolidation(tmp_path, monkeypatch):
    """The flusher's background data sync neither shares the writer's lock nor outlives close."""
    import fcntl

    from flowcept import transport as transport_module
    from flowcept.transport import FileTransport

    monkeypatch.setattr(transport_module, "_BACKGROUND_SYNC_BYTES", 10)
    transport = FileTransport(str(tmp_path / "buf.jsonl"), "host", fsync="stop")
    transport.send("wf", b'{"type":"task","task_id":"a"}\n' * 4, 4)
    transport.background()
    assert transport._unsynced_bytes == 0
    path = transport.path_for("wf")
    transport.close_workflow("wf")
    with open(path, "rb") as handle:  # what consolidation checks before taking a file over
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert handle.read().count(b"\n") == 4


def test_capturing_thread_flushes_while_writes_are_fast_and_stops_when_one_is_slow(buffer_base, monkeypatch):
    """Size-triggered flushes run in the capturing thread while the file takes them at once; a
    slow write (here a FIFO whose reader takes 20 ms per 64 KiB) hands them back to the flusher."""
    import threading
    import time

    import flowcept.buffer
    from flowcept.buffer import get_pipeline
    from flowcept.placement import current_placement
    from flowcept.transport import process_file_path

    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_SIZE", "400")
    monkeypatch.setenv("FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP", "false")
    # "Fast" made lenient for a busy test machine; the FIFO below is slower than 5 ms by far.
    monkeypatch.setattr(flowcept.buffer, "_INLINE_SLOW_S", 1.0)
    with Flowcept(workflow_id="fastfs") as fast:
        for i in range(1000):
            FlowceptTask(activity_id="a", used={"i": i}, generated={"y": i})
        assert get_pipeline().inline and get_pipeline().pending() < 400  # flushed here, as it went
    assert len(tasks_of(fast.get_buffer(), "fastfs")) == 1000

    path = process_file_path(buffer_base, "slowfs", current_placement().hostname, os.getpid())
    os.mkfifo(path)
    received = bytearray()

    def slow_reader() -> None:  # a device that takes its time: the slowness under test, not a wait
        with open(path, "rb", buffering=0) as fifo:
            while chunk := fifo.read(65536):
                received.extend(chunk)
                time.sleep(0.02)

    monkeypatch.setattr(flowcept.buffer, "_INLINE_SLOW_S", 0.005)
    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    flowcept = Flowcept(workflow_id="slowfs").start()
    try:
        for i in range(1200):
            FlowceptTask(activity_id="a", used={"i": i}, generated={"y": i})
        assert not get_pipeline().inline  # the first slow flush gave them back to the flusher
    finally:
        flowcept.stop()
    reader.join(30)
    assert not reader.is_alive()
    with Flowcept(workflow_id="fastagain"):
        assert get_pipeline().inline  # a new run tries the capturing thread again
    lines = [orjson.loads(line) for line in bytes(received).splitlines()]
    assert sorted(r["used"]["i"] for r in lines if r["type"] == "task") == list(range(1200))


def test_buffer_view_cap_falls_back_to_the_hdf5_output(monkeypatch):
    """Past the cap, after an HDF5 consolidation removed the JSONL files, get_buffer() reads the .h5."""
    pytest.importorskip("h5py")
    monkeypatch.setenv("FLOWCEPT_PROJECT_BUFFER_VIEW_MAX_RECORDS", "50")
    monkeypatch.setenv("FLOWCEPT_PROJECT_OUTPUT_FORMAT", "hdf5")
    with Flowcept(workflow_id="capped_h5") as fc:
        for i in range(120):
            FlowceptTask(activity_id="a", used={"i": i}, generated={"i": i})
    assert fc.output_path.endswith(".h5")
    assert sorted(r["used"]["i"] for r in tasks_of(fc.get_buffer(), "capped_h5")) == list(range(120))
