"""Fork safety: a forked child writes its own file, never duplicates the parent's queued records."""

from __future__ import annotations

import os
from collections import Counter

from conftest import run_app, tasks_of

from flowcept import Flowcept


def test_os_fork_child_has_its_own_file(flowcept_tmp):
    out = flowcept_tmp / "pids"
    run_app("fork_child.py", "forkwf", str(out),
            env={"FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_INTERVAL_S": "60",
                 "FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP": "false"})
    parent_pid, child_pid, status = (int(x) for x in out.read_text().split())
    assert status == 0
    files = sorted(p for p in os.listdir(flowcept_tmp) if p.startswith("flowcept_buffer_forkwf_"))
    assert any(f.endswith(f"_{child_pid}.jsonl") for f in files), files
    assert any(f.endswith(f"_{parent_pid}.jsonl") for f in files), files
    child_file = next(f for f in files if f.endswith(f"_{child_pid}.jsonl"))
    child_records = Flowcept.read_buffer_file(str(flowcept_tmp / child_file))
    assert {r["activity_id"] for r in tasks_of(child_records)} == {"child"}
    assert all(r["pid"] == child_pid for r in tasks_of(child_records))

    records = Flowcept.read_buffer_file(consolidate=True, workflow_id="forkwf")
    counts = Counter(r["activity_id"] for r in tasks_of(records))
    assert counts == {"parent_before": 5, "child": 3, "parent_after": 2}
    pids = {r["activity_id"]: r["pid"] for r in tasks_of(records)}
    assert pids["child"] == child_pid and pids["parent_before"] == parent_pid


def test_multiprocessing_fork_children_lose_nothing(flowcept_tmp):
    run_app("mp_fork_child.py", "mpwf", "4", "30")
    records = Flowcept.read_buffer_file(consolidate=True, workflow_id="mpwf")
    tasks = tasks_of(records)
    counts = Counter(r["activity_id"] for r in tasks)
    assert counts == {"parent": 1, "mp_child": 4 * 30}, counts
    assert len({r["task_id"] for r in tasks}) == len(tasks)
    assert len({r["pid"] for r in tasks}) == 5


def test_multiprocessing_pool_terminated_at_exit_loses_nothing(flowcept_tmp):
    """Leaving ``with Pool()`` terminates the workers: SIGTERM may reach one while its exit hook
    closes its pipeline; it must still write what it captured."""
    run_app("mp_fork_child.py", "mppool", "2", "100", "pool", "5")
    records = Flowcept.read_buffer_file(consolidate=True, workflow_id="mppool")
    done = Counter((r["used"]["round_index"], r["used"]["i"]) for r in tasks_of(records)
                   if r["activity_id"] == "work")
    assert len(done) == 5 * 100 and set(done.values()) == {1}, (len(done), 5 * 100)
