"""SIGTERM/SIGINT of a process after N captured tasks: none lost, the app's own handler still runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import APPS, app_env, tasks_of, wait_for

from flowcept import Flowcept

N = 50


def _run_and_signal(flowcept_tmp, signum, mode, workflow_id, **settings):
    ready = str(flowcept_tmp / "ready")
    # A long flush interval: the records must be written by the signal path, not the timer.
    env = app_env({"FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_INTERVAL_S": "60", **settings})
    proc = subprocess.Popen([sys.executable, str(APPS / "signal_child.py"), workflow_id, str(N), ready, mode],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(ready) or proc.poll() is not None, 30, "the child's ready file")
        assert proc.poll() is None, proc.communicate()[1].decode()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, err.decode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_loses_no_task(flowcept_tmp, signum):
    workflow_id = f"sig{int(signum)}"
    code, err = _run_and_signal(flowcept_tmp, signum, "plain", workflow_id)
    if signum == signal.SIGTERM:
        assert code == -signal.SIGTERM, err  # behaves as the signal would
    else:
        assert code != 0, err  # KeyboardInterrupt ends the program
    records = Flowcept.read_buffer_file(consolidate=True, workflow_id=workflow_id)
    tasks = tasks_of(records, workflow_id)
    assert sorted(r["used"]["i"] for r in tasks) == list(range(N))
    assert any(r["type"] == "workflow" for r in records)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_application_handler_is_chained(flowcept_tmp, signum):
    workflow_id = f"own{int(signum)}"
    code, err = _run_and_signal(flowcept_tmp, signum, "own", workflow_id)
    assert code == 7, err  # the application's handler ran and chose the exit code
    with open(str(flowcept_tmp / "ready.handler")) as handle:
        assert handle.read() == str(int(signum))
    tasks = tasks_of(Flowcept.read_buffer_file(consolidate=True, workflow_id=workflow_id), workflow_id)
    assert len(tasks) == N


def test_sigkill_loses_at_most_the_last_interval(flowcept_tmp):
    """With the default interval, records captured before the last flush survive even SIGKILL."""
    ready = str(flowcept_tmp / "ready")
    env = app_env({"FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_INTERVAL_S": "0.05"})
    proc = subprocess.Popen([sys.executable, str(APPS / "signal_child.py"), "killed", str(N), ready, "plain"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(ready), 30, "ready file")

        def all_on_disk():
            files = [p for p in os.listdir(flowcept_tmp) if p.startswith("flowcept_buffer_killed_")]
            return files and sum(open(flowcept_tmp / f, "rb").read().count(b"\n") for f in files) >= N + 1

        wait_for(all_on_disk, 20, "the periodic flush")
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    tasks = tasks_of(Flowcept.read_buffer_file(consolidate=True, workflow_id="killed"))
    assert len(tasks) == N


_LOOP_CHILD = """
import os, signal, sys
from flowcept import Flowcept
from flowcept.instrumentation.flowcept_loop import FlowceptLoop
workflow_id, n, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
signal.alarm(60)
Flowcept(workflow_id=workflow_id, workflow_name="loop_signals").start()
for i in FlowceptLoop(range(n), loop_name="sigloop"):
    if i == n - 1:  # finished iterations are still tuples in the loop's batch
        with open(ready + ".tmp", "w") as out:
            out.write(str(os.getpid()))
        os.replace(ready + ".tmp", ready)
        while True:
            signal.pause()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_loop_loses_no_finished_iteration(flowcept_tmp, signum):
    workflow_id = f"sigloop{int(signum)}"
    ready = str(flowcept_tmp / "ready_loop")
    env = app_env({"FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_INTERVAL_S": "60"})
    proc = subprocess.Popen([sys.executable, "-c", _LOOP_CHILD, workflow_id, str(N), ready], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(ready) or proc.poll() is not None, 30, "the child's ready file")
        assert proc.poll() is None, proc.communicate()[1].decode()
        proc.send_signal(signum)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    tasks = tasks_of(Flowcept.read_buffer_file(consolidate=True, workflow_id=workflow_id), workflow_id)
    indices = sorted(r["used"]["i"] for r in tasks if r.get("activity_id") == "sigloop_iteration")
    if signum == signal.SIGTERM:  # killed as the signal would: the iteration in progress never ended
        assert indices == list(range(N - 1))
    else:  # KeyboardInterrupt leaves the loop body: that iteration is recorded as interrupted
        assert indices == list(range(N))


@pytest.mark.parametrize("mode", ["busy-task", "busy-loop"])
def test_signal_in_the_middle_of_a_flush_loses_nothing(flowcept_tmp, mode):
    """SIGTERM while the capturing thread flushes a batch itself: every record before it is kept.

    A batch of 7 keeps the capturing thread flushing (Pipeline.ready) a good part of the time, so
    over a few runs the signal lands inside a flush; a flush it interrupted must still reach the
    file (the handler waits for it), so the captured indices have no gap.
    """
    for run in range(4):
        workflow_id = f"mid{mode}{run}"
        code, err = _run_and_signal(flowcept_tmp, signal.SIGTERM, mode, workflow_id,
                                    FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_SIZE="7")
        assert code == -signal.SIGTERM, err
        records = Flowcept.read_buffer_file(consolidate=True, workflow_id=workflow_id)
        if mode == "busy-task":
            indices = sorted(r["used"]["i"] for r in tasks_of(records, workflow_id))
            assert len(indices) > N  # it went on capturing before the signal came
        else:
            indices = sorted(r["used"]["i"] for r in records if r.get("activity_id") == "busy_iteration")
            assert indices, "no loop iteration recorded"
        assert indices == list(range(len(indices))), (run, len(indices), _gaps(indices))
        os.unlink(str(flowcept_tmp / "ready"))


def _gaps(indices):
    return [(a, b) for a, b in zip(indices, indices[1:]) if b != a + 1][:5]


@pytest.mark.parametrize("point", ["loop-end-take", "loop-build", "exit-shutdown", "blocked-main", "survives"])
def test_signal_at_an_exact_point_of_a_flush(flowcept_tmp, point):
    """SIGTERM while a finishing loop hands over its last iterations (its batch lock held),
    SIGINT while a loop builds a chunk, SIGTERM while the exit hook closes the pipeline: no
    hang, every recorded task once, none lost."""
    proc = subprocess.run([sys.executable, str(APPS / "signal_points.py"), point, str(flowcept_tmp)],
                          env=app_env(), capture_output=True, timeout=60)
    if point == "survives":  # one signal, one run of the application's handler
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode().split() == ["SIGTERM", "1", "SIGINT", "1"], proc.stdout.decode()
        return
    if point in ("exit-shutdown", "blocked-main"):
        assert proc.returncode == -signal.SIGTERM, proc.stderr.decode()  # not SIGALRM: no hang
        records = Flowcept.read_buffer_file(consolidate=True, workflow_id=f"pt-{point}")
        activity = "before_exit" if point == "exit-shutdown" else "before_block"
        assert sorted(r["used"]["i"] for r in records if r.get("activity_id") == activity) == list(range(100))
        return
    records = Flowcept.read_buffer_file(consolidate=True, workflow_id=f"pt-{point}")
    iterations = [r for r in records if r.get("subtype") == "iteration"]
    ids = [r["task_id"] for r in iterations]
    assert len(ids) == len(set(ids)), "an iteration recorded twice"
    indices = sorted(r["used"]["i"] for r in iterations)
    if point == "loop-end-take":
        assert proc.returncode == -signal.SIGTERM, proc.stderr.decode()  # not SIGALRM: no hang
        assert indices == list(range(10))  # the handed-over iterations reached the file
    else:
        assert proc.returncode == 0 and b"interrupted" in proc.stdout, proc.stderr.decode()
        assert indices == list(range(len(indices))) and len(indices) >= 512
        assert all(r["status"] == "FINISHED" for r in iterations)
