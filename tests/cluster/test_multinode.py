"""Multi-node runs on a real 4-node Slurm cluster in network namespaces (tests/cluster/rig.py).

Each node has its own address and hostname; the filesystem, /tmp and the pid space are shared, as
on a cluster with a shared filesystem. Every job is submitted from the rig's login host; every wait
is bounded.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import List

import orjson
import pytest
from cluster.jobs import INSTRUMENTED, LAUNCH, PY, REPO, paused_launch
from conftest import read_lines, wait_for

MPI_APP = str(REPO / "tests" / "mpi_apps" / "mpi_app.py")
NODES = ["node1", "node2", "node3", "node4"]
PER_NODE = 2

pytestmark = pytest.mark.cluster


def consolidated(out: Path) -> List[dict]:
    """The records of the one consolidated workflow file in ``out``."""
    files = [f for f in glob.glob(str(out / "flowcept_buffer_*.jsonl"))
             if re.fullmatch(r"flowcept_buffer_[0-9a-f-]{36}\.jsonl", os.path.basename(f))]
    assert len(files) == 1, f"expected one consolidated file in {out}, found {files}"
    return read_lines(files[0])


def check_placement(records: List[dict]) -> None:
    """Ranks 2k and 2k+1 run on node k+1 (--ntasks-per-node=2), and every record says so."""
    for r in records:
        assert r["node_name"] == NODES[r["rank"] // PER_NODE], r
        assert r["hostname"] == r["node_name"], r


def srun_launch(cluster, out: Path, *app: str, extra: List[str] = (),
                timeout: float = 120) -> subprocess.CompletedProcess:
    args = ["srun", "-N", str(len(NODES)), f"--ntasks-per-node={PER_NODE}", *LAUNCH, "--output-dir", str(out),
            *extra, "--", *app]
    return cluster.run(args, timeout=timeout, check=False)


@pytest.mark.parametrize("instrumented", [False, True], ids=["plain-app", "instrumented-app"])
def test_launch_on_four_nodes(ns_cluster, tmp_path: Path, instrumented: bool) -> None:
    out = tmp_path / "out"
    out.mkdir()
    plain = [PY, "-c", "import socket; print(socket.gethostname())"]
    app = [PY, INSTRUMENTED, "--tasks", "4"] if instrumented else plain
    proc = srun_launch(ns_cluster, out, *app, extra=["--keep-files", "--telemetry-interval", "0.2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if not instrumented:
        assert sorted(proc.stdout.split()[:8]) == sorted(NODES * PER_NODE)

    # one daemon per node: each wrote its own node file on the shared filesystem
    node_files = sorted(glob.glob(str(out / "flowcept_buffer_*_node-*.jsonl")))
    assert [Path(f).stem.rsplit("_node-", 1)[1] for f in node_files] == NODES

    records = consolidated(out)
    assert len({r["workflow_id"] for r in records}) == 1
    assert len([r for r in records if r["type"] == "workflow"]) == 1
    tasks = [r for r in records if r["type"] == "task"]
    ids = [r["task_id"] for r in tasks]
    assert len(ids) == len(set(ids)), "a task appears twice"
    process = [r for r in tasks if r.get("subtype") == "rank_process"]
    assert sorted(r["rank"] for r in process) == list(range(8))
    assert all(r["status"] == "FINISHED" for r in process)
    check_placement(tasks)
    steps = [r for r in tasks if r.get("activity_id") == "app_step"]
    if instrumented:
        per_rank = collections.Counter(r["rank"] for r in steps)
        assert per_rank == {rank: 4 for rank in range(8)}
    else:
        assert steps == []
    telemetry_hosts = {r["hostname"] for r in records if r["type"] == "telemetry"}
    assert telemetry_hosts == set(NODES)


def test_mpi4py_app_across_four_nodes(ns_cluster, tmp_path: Path) -> None:
    """`with Flowcept(...)` on every rank of an mpi4py job spanning 4 nodes: one workflow, rank 0 merges."""
    results = tmp_path / "results"
    results.mkdir()
    env = {**os.environ, "FLOWCEPT_PROJECT_DUMP_BUFFER_PATH": str(tmp_path / "flowcept_buffer.jsonl")}
    proc = ns_cluster.run(["srun", "-N", "4", f"--ntasks-per-node={PER_NODE}", "--mpi=pmix", PY, MPI_APP,
                           str(results), "ok", "5"], env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [orjson.loads((results / f"rank{r}.json").read_bytes()) for r in range(8)]
    assert len({(r["workflow_id"], r["bundle_exec_id"], r["campaign_id"]) for r in ranks}) == 1
    assert {r["size"] for r in ranks} == {8}
    records = read_lines(ranks[0]["output_path"])
    tasks = [r for r in records if r["type"] == "task"]
    expected = sorted(t for r in ranks for t in r["task_ids"])
    assert sorted(r["task_id"] for r in tasks) == expected  # every task, once
    check_placement(tasks)
    assert {r["hostname"] for r in tasks} == set(NODES)
    assert len([r for r in records if r["type"] == "workflow"]) == 1


def test_multi_node_example_with_sbatch(ns_cluster, tmp_path: Path) -> None:
    """slurm_examples/multi_node/job.sbatch, submitted as a user would, on 2 nodes x 4 ranks."""
    out = tmp_path / "flowcept_out"
    env = {**os.environ, "FLOWCEPT_EXAMPLE_PYTHON": PY, "FLOWCEPT_EXAMPLES_DIR": str(REPO / "slurm_examples"),
           "FLOWCEPT_OUT": str(out)}
    log = tmp_path / "job-%j.out"
    script = REPO / "slurm_examples" / "multi_node" / "job.sbatch"
    job = ns_cluster.run(["sbatch", "--parsable", "-o", str(log), str(script)],
                         env=env, cwd=str(tmp_path)).stdout.strip().split(";")[0]
    ns_cluster.wait_job_done(job, timeout=120)
    text = (tmp_path / f"job-{job}.out").read_text()
    state = ns_cluster.run(["scontrol", "show", "job", job], check=False).stdout
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, state + text
    records = consolidated(out)
    process = [r for r in records if r.get("subtype") == "rank_process"]
    assert sorted(r["rank"] for r in process) == list(range(8))
    assert {r["node_name"] for r in process} == {"node1", "node2"}
    assert len([r for r in records if r["type"] == "workflow"]) == 1
    assert {r["hostname"] for r in records if r["type"] == "telemetry"} == {"node1", "node2"}
    assert "flowcept: workflow" in text


def _daemon_pid(address: str) -> int:
    """The pid of the daemon serving ``ipc://<runtime dir>/...``, from its ready file."""
    runtime_dir = os.path.dirname(address.removeprefix("ipc://"))
    return json.loads(Path(runtime_dir, "ready.json").read_text())["pid"]


def _dead(pid: int) -> bool:
    """Gone, or a zombie its parent (the node's launcher) has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_killed_node_daemon_loses_nothing(ns_cluster, tmp_path: Path) -> None:
    """node2's daemon is SIGKILLed mid-job: its ranks fall back to files and every task survives."""
    out, handshake = tmp_path / "out", tmp_path / "handshake"
    out.mkdir()
    handshake.mkdir()
    with paused_launch(ns_cluster, out, handshake, tasks=20, per_node=PER_NODE) as job:
        addresses = job.ready()
        victim = _daemon_pid(addresses[2])  # rank 2 runs on node2
        assert {addresses[2], addresses[3]} == {addresses[2]} and addresses[2] != addresses[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: _dead(victim), 10, "the daemon to die")
    assert job.returncode == 0, job.stdout + job.stderr
    tasks = [r for r in consolidated(out) if r["type"] == "task"]
    ids = [r["task_id"] for r in tasks]
    assert len(ids) == len(set(ids))
    for activity in ("app_step", "app_step_after"):
        per_rank = collections.Counter(r["rank"] for r in tasks if r.get("activity_id") == activity)
        assert per_rank == {rank: 20 for rank in range(8)}, activity
    check_placement(tasks)
    jobs = Path(os.environ["FLOWCEPT_DAEMON_JOBS_DIR"])  # the killed daemon never unregistered
    assert not jobs.exists() or not list(jobs.iterdir()), list(jobs.rglob("*"))


def test_shared_filesystem_sees_files_per_node_not_per_rank(ns_cluster, tmp_path: Path) -> None:
    """4 nodes x 2 ranks with daemons: the shared output directory gets, per node, the daemon's file
    and one file of the node's rank records (moved there by its starter), plus the consolidated
    output: nothing per rank, no marker left."""
    out = tmp_path / "out"
    out.mkdir()
    proc = srun_launch(ns_cluster, out, "true", extra=["--keep-files"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = consolidated(out)
    wf = records[0]["workflow_id"]
    expected = {f"flowcept_buffer_{wf}.jsonl"} | {f"flowcept_buffer_{wf}_{kind}-{node}.jsonl"
                                                  for node in NODES for kind in ("node", "ranks")}
    assert {n for n in os.listdir(out) if n.startswith(("flowcept", ".flowcept"))} == expected
    process = [r for r in records if r.get("subtype") == "rank_process"]
    assert sorted(r["rank"] for r in process) == list(range(8))
    check_placement(process)


def test_node_starter_killed_on_one_node_loses_no_other_record(ns_cluster, tmp_path: Path) -> None:
    """node2's starter (the launcher that started its daemon) SIGKILLed mid-job: node2's other rank
    moves its own record to the shared filesystem and stops the orphaned daemon; the other nodes
    finish normally; `flowcept consolidate` then finds every record that was written."""
    out, go = tmp_path / "out", tmp_path / "go"
    out.mkdir()
    go.mkdir()
    wait_go = str(REPO / "tests" / "launch_apps" / "wait_go.py")
    env = {**os.environ, "FLOWCEPT_LAUNCH_FINISH_TIMEOUT_S": "3", "FLOWCEPT_DAEMON_RUNTIME_DIR": str(tmp_path / "rt")}
    args = ["srun", "-N", str(len(NODES)), f"--ntasks-per-node={PER_NODE}", *LAUNCH, "--output-dir", str(out),
            "--", PY, wait_go, str(go)]
    job = ns_cluster.popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(list(go.glob("ready-*"))) == 8 or job.poll() is not None, 60, "all ranks ready")
        assert job.poll() is None, job.communicate()
        # rank 2's command runs on node2; its parent is rank 2's launcher (or waiter, same pid)
        launchers = {r: int(Path(f"/proc/{(go / f'ready-{r}').read_text()}/stat").read_text()
                            .rsplit(")", 1)[1].split()[1]) for r in (2, 3)}
        wait_for(lambda: glob.glob(str(tmp_path / "rt" / "*" / "node2.*" / "ready.json")), 30, "node2's daemon")
        readies = glob.glob(str(tmp_path / "rt" / "*" / "node2.*" / "ready.json"))
        daemons = [json.loads(Path(p).read_text())["pid"] for p in readies]
        starter_of = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                      for pid in daemons if not _dead(pid)}
        [(daemon, starter)] = [(d, s) for d, s in starter_of.items() if s in launchers.values()]
        victim = next(r for r, pid in launchers.items() if pid == starter)
        os.kill(starter, signal.SIGKILL)
        os.kill(int((go / f"ready-{victim}").read_text()), signal.SIGKILL)
        for rank in range(8):
            (go / f"go-{rank}").write_text("")
        stdout, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=10)
    wait_for(lambda: _dead(daemon), 30, "node2's orphaned daemon to be stopped")
    assert "1 of 8 rank(s) did not finish" in stderr, stdout + stderr
    assert not [n for n in os.listdir(out) if re.search(r"_node[0-9]_[0-9]+\.jsonl$", n)]  # no per-rank file
    assert glob.glob(str(out / "flowcept_buffer_*_ranks-node2-*.jsonl")), os.listdir(out)
    wf = re.search(r"workflow ([0-9a-f-]{36})", stderr).group(1)
    merged = ns_cluster.run([PY, "-m", "flowcept.cli", "consolidate", "-q", "--workflow-id", wf, "--path",
                             str(out / "flowcept_buffer.jsonl")], check=False)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    process = [r for r in consolidated(out) if r.get("subtype") == "rank_process"]
    assert sorted(r["rank"] for r in process) == sorted(set(range(8)) - {victim})
    check_placement(process)
