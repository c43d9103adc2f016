"""Real ``mpirun -np 4`` jobs of an instrumented mpi4py application (tests/mpi_apps/mpi_app.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import orjson
import pytest

from flowcept.consolidation import consolidate, consolidated_path, read_records

APP = Path(__file__).parent / "mpi_apps" / "mpi_app.py"
RANKS = 4


def _mpi_available() -> bool:
    if shutil.which("mpirun") is None:
        return False
    probe = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"], capture_output=True, timeout=60)
    return probe.returncode == 0


pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(not _mpi_available(), reason="needs Open MPI's mpirun and mpi4py")]

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_oob_tcp_if_include": "lo",
    "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_btl": "self,vader",
}


def run_mpi(tmp: Path, mode: str = "ok", env: Optional[Dict[str, str]] = None,
            timeout: float = 90.0) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.update(MPI_ENV)
    full["FLOWCEPT_PROJECT_DUMP_BUFFER_PATH"] = str(tmp / "flowcept_buffer.jsonl")
    full.update(env or {})
    return subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(RANKS),
                           sys.executable, str(APP), str(tmp), mode], env=full, capture_output=True,
                          timeout=timeout)


def rank_results(tmp: Path) -> List[dict]:
    return [orjson.loads((tmp / f"rank{r}.json").read_bytes()) for r in range(RANKS)]


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout.decode()[-3000:]}\nstderr:\n{proc.stderr.decode()[-3000:]}"


def check_every_task_once(records: List[dict], results: List[dict]) -> None:
    tasks = [r for r in records if r.get("type") == "task"]
    ids = [t["task_id"] for t in tasks]
    assert len(ids) == len(set(ids)), "a task appears twice"
    by_id = {t["task_id"]: t for t in tasks}
    expected = {tid: res["rank"] for res in results for tid in res["task_ids"]}
    assert set(by_id) == set(expected)
    for tid, rank in expected.items():
        assert by_id[tid]["rank"] == rank


def test_one_workflow_every_task_once_jsonl(flowcept_tmp: Path) -> None:
    proc = run_mpi(flowcept_tmp)
    assert proc.returncode == 0, _explain(proc)
    results = rank_results(flowcept_tmp)
    for key in ("workflow_id", "campaign_id", "bundle_exec_id"):
        assert len({r[key] for r in results}) == 1, key
    assert all(r["size"] == RANKS for r in results)
    workflow_id = results[0]["workflow_id"]
    output = consolidated_path(str(flowcept_tmp / "flowcept_buffer.jsonl"), workflow_id)
    assert results[0]["output_path"] == output
    assert all(r["output_path"] is None for r in results[1:])
    # Only the consolidated file is left: every per-process file was merged and removed.
    assert sorted(p.name for p in flowcept_tmp.glob("*.jsonl")) == [os.path.basename(output)]
    records = read_records(output)
    check_every_task_once(records, results)
    assert sum(len(r["task_ids"]) for r in results) == RANKS * 10
    workflows = [r for r in records if r["type"] == "workflow"]
    assert len(workflows) == 1
    assert workflows[0]["world_size"] == RANKS
    assert workflows[0]["hosts"]
    assert workflows[0]["status"] == "FINISHED"


def test_hdf5_output_equals_jsonl(flowcept_tmp: Path) -> None:
    proc = run_mpi(flowcept_tmp, env={"FLOWCEPT_PROJECT_OUTPUT_FORMAT": "hdf5",
                                      "FLOWCEPT_PROJECT_CLEANUP_FILES": "false"})
    assert proc.returncode == 0, _explain(proc)
    results = rank_results(flowcept_tmp)
    workflow_id = results[0]["workflow_id"]
    base = str(flowcept_tmp / "flowcept_buffer.jsonl")
    h5_path = consolidated_path(base, workflow_id, "hdf5")
    assert results[0]["output_path"] == h5_path
    from_h5 = read_records(h5_path)
    check_every_task_once(from_h5, results)
    report = consolidate(base, workflow_id, output_format="jsonl", cleanup_files=False)
    assert read_records(report.output_path) == from_h5

    from flowcept import Flowcept

    frame = Flowcept.read_buffer_file(h5_path, return_df=True)
    assert len(frame) == len(from_h5)
    assert set(frame.loc[frame["type"] == "task", "rank"]) == set(range(RANKS))


def test_rank_that_raises_inside_with(flowcept_tmp: Path) -> None:
    proc = run_mpi(flowcept_tmp, mode="raise")
    assert proc.returncode != 0  # mpirun reports the failed rank
    results = rank_results(flowcept_tmp)
    assert results[2]["error"] == "rank 2 failed on purpose"
    records = read_records(results[0]["output_path"])
    check_every_task_once(records, results)


def test_rank_that_never_stops_costs_a_bounded_wait(flowcept_tmp: Path) -> None:
    began = time.monotonic()
    proc = run_mpi(flowcept_tmp, mode="die", env={"FLOWCEPT_LAUNCH_FINISH_TIMEOUT_S": "2"}, timeout=60)
    elapsed = time.monotonic() - began
    assert proc.returncode != 0
    assert elapsed < 45, "the finished ranks waited far beyond the finish timeout"
    results = rank_results(flowcept_tmp)
    root = results[0]
    assert root["output_path"], _explain(proc)
    assert 1.5 < root["stop_s"] < 30
    records = read_records(root["output_path"])
    tasks = {r["task_id"] for r in records if r.get("type") == "task"}
    for result in results[:3]:
        assert set(result["task_ids"]) <= tasks
    # What the failed rank captured is kept: a later consolidation merges it.
    base = str(flowcept_tmp / "flowcept_buffer.jsonl")
    report = consolidate(base, root["workflow_id"])
    check_every_task_once(read_records(report.output_path), results)
