"""flowcept-launch without Slurm: options, ids, one rank alone, and mpirun -np 4 (real processes)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import read_lines, wait_for
from flowcept.launch.__main__ import parse_args
from flowcept.launch.ids import agree_ids
from flowcept.launch.node_daemon import local_size

from flowcept.placement import detect

APP = str(Path(__file__).parent / "launch_apps" / "instrumented.py")
LAUNCH = [sys.executable, "-m", "flowcept.launch"]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_oob_tcp_if_include": "lo",
           "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_btl": "self,vader"}


def consolidated(directory: Path) -> List[dict]:
    files = [f for f in glob.glob(str(directory / "flowcept_buffer_*.jsonl"))]
    assert len(files) == 1, files
    return read_lines(files[0])


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMIX_", "OMPI_", "PMI_"))}
    env.pop("FLOWCEPT_WORKFLOW_ID", None)
    env.update(extra)
    return env


def test_options_and_optional_double_dash() -> None:
    opts = parse_args(["--workflow-name", "w", "--no-daemon", "--format", "hdf5", "python", "app.py", "-x"])
    assert opts.command == ["python", "app.py", "-x"] and not opts.daemon and opts.output_format == "hdf5"
    opts = parse_args(["-o", "out", "--no-consolidate", "--", "./solver", "--workflow-name", "inner"])
    assert opts.command == ["./solver", "--workflow-name", "inner"] and not opts.consolidate
    with pytest.raises(SystemExit):
        parse_args(["--no-daemon"])


def test_ranks_agree_on_ids_from_job_and_step() -> None:
    ranks = [detect({"SLURM_PROCID": str(r), "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "1"})
             for r in range(4)]
    ids = [agree_ids(p, {}, "sim") for p in ranks]
    assert all(i == ids[0] for i in ids)
    other_step = agree_ids(detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77",
                                   "SLURM_STEP_ID": "2"}), {}, "sim")
    assert other_step["workflow_id"] != ids[0]["workflow_id"]
    mpi = [agree_ids(detect({"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2"}),
                     {"PMIX_NAMESPACE": "123"}, None) for r in range(2)]
    assert mpi[0] == mpi[1]
    alone = [agree_ids(detect({}), {}, None) for _ in range(2)]
    assert alone[0]["workflow_id"] != alone[1]["workflow_id"]
    assert agree_ids(detect({}), {"FLOWCEPT_WORKFLOW_ID": "given"}, None)["workflow_id"] == "given"


def test_local_size_from_slurm_task_layout() -> None:
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "5", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1"}
    assert local_size(env, detect(env)) == 2
    env["SLURM_NODEID"] = "2"
    assert local_size(env, detect(env)) == 1


def test_alone_records_the_process_and_returns_its_code(tmp_path: Path) -> None:
    proc = subprocess.run([*LAUNCH, "--no-daemon", "-n", "solo", "--", sys.executable, APP,
                           "--exit-rank", "0", "--code", "5"], env=clean_env(), capture_output=True,
                          timeout=60)
    assert proc.returncode == 5, proc.stderr.decode()
    records = consolidated(tmp_path)
    process = [r for r in records if r.get("subtype") == "rank_process"]
    assert len(process) == 1 and process[0]["status"] == "ERROR"
    assert process[0]["generated"]["exit_code"] == 5 and process[0]["used"]["command"][1] == APP
    assert len([r for r in records if r.get("activity_id") == "app_step"]) == 3
    assert {r["workflow_id"] for r in records} == {process[0]["workflow_id"]}
    assert process[0]["workflow_id"] in proc.stdout.decode()


def test_signal_to_the_launcher_reaches_the_child(tmp_path: Path) -> None:
    hang = tmp_path / "hang"
    hang.mkdir()
    proc = subprocess.Popen([*LAUNCH, "--no-daemon", sys.executable, APP, "--hang", str(hang)],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        from conftest import wait_for

        wait_for(lambda: (hang / "ready-0").exists(), 30, "the app to be ready")
        proc.send_signal(15)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + 15
    records = consolidated(tmp_path)
    process = [r for r in records if r.get("subtype") == "rank_process"][0]
    assert process["status"] == "ERROR" and process["generated"]["signal"] == 15
    assert len([r for r in records if r.get("activity_id") == "app_step"]) == 3


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")
@pytest.mark.parametrize("instrumented", [False, True])
def test_mpirun_four_ranks(tmp_path: Path, instrumented: bool) -> None:
    command = [sys.executable, APP, "--tasks", "2"] if instrumented else ["true"]
    proc = subprocess.run(["mpirun", "-np", "4", *LAUNCH, "--no-daemon", *command],
                          env=clean_env(**MPI_ENV), capture_output=True, timeout=90)
    assert proc.returncode == 0, proc.stderr.decode()
    records = consolidated(tmp_path)
    process = [r for r in records if r.get("subtype") == "rank_process"]
    assert sorted(r["rank"] for r in process) == [0, 1, 2, 3]
    assert all(r["status"] == "FINISHED" for r in process)
    assert len({r["workflow_id"] for r in records}) == 1
    assert len([r for r in records if r.get("type") == "workflow"]) == 1
    assert len([r for r in records if r.get("activity_id") == "app_step"]) == (8 if instrumented else 0)


@pytest.mark.parametrize("argv", [
    ["true"],
    ["-q", "--no-daemon", "python", "app.py", "-q"],
    ["--workflow-name", "w", "-o", "out", "--format", "hdf5", "--telemetry-interval", "0.5", "--", "./a", "--x"],
    ["--workflow-name=w", "--output-dir=out", "--no-consolidate", "--keep-files", "--settings", "s.yaml", "cmd"],
    ["--daemon", "--consolidate", "-n", "name", "cmd", "--no-daemon"],
])
def test_fast_parser_agrees_with_argparse(argv: List[str]) -> None:
    from flowcept.launch.__main__ import _fast_parse, build_parser

    fast = _fast_parse(argv)
    assert fast is not None
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    assert fast.command == command
    assert (fast.workflow_name, fast.output_dir, fast.output_format, fast.telemetry_interval_s, fast.daemon,
            fast.consolidate, fast.settings_file, fast.keep_files, fast.quiet) == (
        args.workflow_name, args.output_dir, args.output_format, args.telemetry_interval, args.daemon,
        args.consolidate, args.settings_file, args.keep_files, args.quiet)


@pytest.mark.parametrize("argv", [["--work", "w", "true"], ["--daemon", "--no-daemon", "true"], ["-h"],
                                  ["--format", "csv", "true"], ["-n"], ["--no-daemon"]])
def test_unusual_command_lines_go_to_argparse(argv: List[str]) -> None:
    from flowcept.launch.__main__ import _fast_parse

    assert _fast_parse(argv) is None


def test_rank_hands_over_to_the_waiter_which_forwards_signals(tmp_path: Path) -> None:
    """Rank 1 of 2 replaces its launcher by the bare waiter (same pid) while `sleep` runs;
    SIGTERM to that pid still reaches the command, and the task records it."""
    from conftest import wait_for

    job = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": f"wait{os.getpid()}", "SLURM_STEP_ID": "0"}
    procs = []
    for rank in (0, 1):
        env = clean_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), **job)
        procs.append(subprocess.Popen([*LAUNCH, "--no-daemon", "sleep", "60"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    try:
        def cmdline(pid: int) -> bytes:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                return handle.read()

        wait_for(lambda: b"waiter.py" in cmdline(procs[1].pid), 30, "rank 1 to hand over to the waiter")
        children = Path(f"/proc/{procs[0].pid}/task/{procs[0].pid}/children")
        wait_for(lambda: children.read_text().strip() != "", 30, "rank 0's command to start")
        for proc in procs:
            proc.send_signal(15)
        for proc in procs:
            proc.wait(timeout=30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [143, 143]
    records = consolidated(tmp_path)
    process = {r["rank"]: r for r in records if r.get("subtype") == "rank_process"}
    assert sorted(process) == [0, 1]
    assert all(r["status"] == "ERROR" and r["generated"]["signal"] == 15 for r in process.values())
    assert process[1]["pid"] == procs[1].pid and process[1]["ended_at"] - process[1]["started_at"] < 30


# -- end of the job at scale: files per node on the shared filesystem, not per rank -------------------

WAIT_GO = str(Path(__file__).parent / "launch_apps" / "wait_go.py")


def start_ranks(tmp_path: Path, nodes: List[str], per_node: int, command: List[str], flags: List[str] = (),
                **extra: str) -> List[subprocess.Popen]:
    """One launcher per rank, as srun starts them (Slurm's variables faked): ``nodes`` share this host,
    each with its own node name (so its own runtime directory and daemon, as on the cluster rig)."""
    size = len(nodes) * per_node
    job = {"SLURM_NTASKS": str(size), "SLURM_JOB_ID": f"t{os.getpid()}{tmp_path.name[-12:]}", "SLURM_STEP_ID": "0",
           "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{len(nodes)})", "SLURM_JOB_NUM_NODES": str(len(nodes)),
           "FLOWCEPT_DAEMON_RUNTIME_DIR": str(tmp_path / "rt"), **extra}
    procs = []
    for rank in range(size):
        env = clean_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
                        SLURM_NODEID=str(rank // per_node), SLURMD_NODENAME=nodes[rank // per_node], **job)
        procs.append(subprocess.Popen([*LAUNCH, "-o", str(tmp_path / "out"), *flags, *command], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(procs: List[subprocess.Popen]) -> List[tuple]:
    """(returncode, stdout, stderr) of every launcher; any still running after the deadline is killed."""
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            results.append((proc.returncode, out.decode(), err.decode()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def daemon_and_starter(tmp_path: Path) -> tuple:
    """(daemon pid, starter launcher pid) of the one node daemon under the test's runtime directory."""
    import orjson
    from conftest import wait_for

    wait_for(lambda: len(glob.glob(str(tmp_path / "rt" / "*" / "*" / "ready.json"))) == 1, 60, "the node daemon")
    [ready] = glob.glob(str(tmp_path / "rt" / "*" / "*" / "ready.json"))
    pid = orjson.loads(Path(ready).read_bytes())["pid"]
    with open(f"/proc/{pid}/stat", "rb") as handle:
        ppid = int(handle.read().rpartition(b")")[2].split()[1])
    return pid, ppid


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


def consolidate_later(out: Path, workflow_id: str) -> List[dict]:
    """What `flowcept consolidate` (after the job, as the launcher's hint says) finds."""
    merged = subprocess.run([sys.executable, "-m", "flowcept.cli", "consolidate", "-q", "--workflow-id", workflow_id,
                             "--path", str(out / "flowcept_buffer.jsonl")], capture_output=True, timeout=60)
    assert merged.returncode == 0, merged.stderr.decode()
    return read_lines(str(out / f"flowcept_buffer_{workflow_id}.jsonl"))


def rank_tasks(records: List[dict]) -> Dict[int, dict]:
    process = [r for r in records if r.get("subtype") == "rank_process"]
    by_rank = {r["rank"]: r for r in process}
    assert len(by_rank) == len(process), "a rank's process task appears twice"
    return by_rank


def per_process_files(out: Path) -> List[str]:
    """Files named like a process's own (``_<host>_<pid>.jsonl``): what the ranks no longer write."""
    return [n for n in os.listdir(out) if re.search(r"_[0-9]+\.jsonl$", n) and "_ranks-" not in n]


def test_node_daemon_shared_fs_sees_files_per_node_not_per_rank(tmp_path: Path) -> None:
    """2 nodes x 3 ranks: on the shared filesystem, per node the daemon's file and one file of rank
    records (plus the consolidated output); no per-rank file, no marker left; every rank once."""
    (tmp_path / "out").mkdir()
    procs = start_ranks(tmp_path, ["na", "nb"], 3, ["true"], ["--keep-files", "--telemetry-interval", "0.05"])
    results = finish(procs)
    assert [r[0] for r in results] == [0] * 6, [r[2] for r in results]
    out = tmp_path / "out"
    [output] = [n for n in os.listdir(out) if re.fullmatch(r"flowcept_buffer_[0-9a-f-]{36}\.jsonl", n)]
    wf = output[len("flowcept_buffer_"):-len(".jsonl")]
    assert sorted(os.listdir(out)) == sorted([output] + [f"flowcept_buffer_{wf}_{kind}-{node}.jsonl"
                                                         for node in ("na", "nb") for kind in ("node", "ranks")])
    process = rank_tasks(read_lines(str(out / output)))
    assert sorted(process) == list(range(6))
    assert all(r["node_name"] == ("na" if r["rank"] < 3 else "nb") and r["status"] == "FINISHED"
               for r in process.values())
    assert wf in results[0][1]
    for node in ("na", "nb"):  # the node's rank records, all of them, in one file
        ranks_file = read_lines(str(out / f"flowcept_buffer_{wf}_ranks-{node}.jsonl"))
        assert len([r for r in ranks_file if r.get("subtype") == "rank_process"]) == 3
    assert not glob.glob(str(tmp_path / "rt" / "*" / "*" / "bye-*"))  # node-local state cleaned up


def ranks_waiting_to_go(tmp_path: Path, flags: List[str] = (), **env: str) -> tuple:
    """Three ranks on node "na" running wait_go.py, all started: (go directory, processes)."""
    go = tmp_path / "go"
    go.mkdir()
    (tmp_path / "out").mkdir()
    procs = start_ranks(tmp_path, ["na"], 3, [sys.executable, WAIT_GO, str(go)], flags, **env)
    try:
        wait_for(lambda: len(list(go.glob("ready-*"))) == 3, 60, "3 ranks to start their command")
    except BaseException:
        finish(procs)
        raise
    return go, procs


def test_rank_killed_before_writing_its_state(tmp_path: Path) -> None:
    """A rank (neither rank 0 nor its node's starter) SIGKILLed mid-job: the others' records reach
    the node's file; rank 0 gives up after launch.finish_timeout_s and `flowcept consolidate` finds
    everything that was written."""
    go, procs = ranks_waiting_to_go(tmp_path, FLOWCEPT_LAUNCH_FINISH_TIMEOUT_S="2")
    try:
        _, starter = daemon_and_starter(tmp_path)
        victim = next(r for r in (1, 2) if procs[r].pid != starter)
        kill_pid(procs[victim].pid)
        kill_pid(int((go / f"ready-{victim}").read_text()))
        for rank in range(3):
            (go / f"go-{rank}").touch()
    finally:
        results = finish(procs)
    assert [r[0] for i, r in enumerate(results) if i != victim] == [0, 0]
    assert "1 of 3 rank(s) did not finish" in results[0][2] and "flowcept consolidate" in results[0][2]
    out = tmp_path / "out"
    assert per_process_files(out) == []
    wf = results[0][2].split("workflow ")[1].split(":")[0]
    process = rank_tasks(consolidate_later(out, wf))
    assert sorted(process) == sorted({0, 1, 2} - {victim})


def test_node_starter_killed_the_other_ranks_collect(tmp_path: Path) -> None:
    """The node's starter SIGKILLed mid-job: the ranks that end after it find its lock free, move
    their records to the shared filesystem themselves and stop the orphaned daemon; nothing that
    was written is lost."""
    go, procs = ranks_waiting_to_go(tmp_path, FLOWCEPT_LAUNCH_FINISH_TIMEOUT_S="2")
    try:
        daemon, starter = daemon_and_starter(tmp_path)
        victim = next(r for r in range(3) if procs[r].pid == starter)
        kill_pid(starter)
        kill_pid(int((go / f"ready-{victim}").read_text()))
        for rank in range(3):
            (go / f"go-{rank}").touch()
    finally:
        results = finish(procs)
    assert [r[0] for i, r in enumerate(results) if i != victim] == [0, 0]
    wait_for(lambda: not running(daemon), 30, "the orphaned daemon to be stopped")
    out = tmp_path / "out"
    assert per_process_files(out) == []
    assert glob.glob(str(out / "flowcept_buffer_*_ranks-na-*.jsonl")), os.listdir(out)
    wf = Path(glob.glob(str(out / "flowcept_buffer_*_ranks-na-*.jsonl"))[0]).name.split("_")[2]
    process = rank_tasks(consolidate_later(out, wf))
    assert sorted(process) == sorted({0, 1, 2} - {victim})


def test_rank_waiting_too_long_for_its_starter_writes_its_own_file(tmp_path: Path) -> None:
    """The starter's command runs on: after launch.collect_wait_s the other ranks write their own
    files (their records are safe on the shared filesystem) and the starter still counts them."""
    go, procs = ranks_waiting_to_go(tmp_path, ["--keep-files"], FLOWCEPT_LAUNCH_COLLECT_WAIT_S="0.2")
    out = tmp_path / "out"
    try:
        _, starter = daemon_and_starter(tmp_path)
        others = [r for r in range(3) if procs[r].pid != starter]
        for rank in others:
            (go / f"go-{rank}").touch()
        wait_for(lambda: len(per_process_files(out)) == 2, 60, "the other ranks' own files")
        (go / f"go-{next(r for r in range(3) if r not in others)}").touch()
    finally:
        results = finish(procs)
    assert [r[0] for r in results] == [0, 0, 0], [r[2] for r in results]
    wf = results[0][1].split("workflow ")[1].split(":")[0]
    process = rank_tasks(read_lines(str(out / f"flowcept_buffer_{wf}.jsonl")))
    assert sorted(process) == [0, 1, 2]
    assert sorted(int(n.rsplit("_", 1)[1][:-6]) for n in per_process_files(out)) == sorted(procs[r].pid
                                                                                          for r in others)


def test_done_ranks_from_rank_and_node_markers(tmp_path: Path) -> None:
    """Rank 0 counts ranks, not files: a node marker names many; a rank two markers name counts once."""
    from flowcept.launch.launcher import DoneRanks, node_marker_path
    from flowcept.launch.waiter import write_marker, write_node_marker

    done = DoneRanks(str(tmp_path / "m"))
    assert done.count() == 0
    write_node_marker(node_marker_path(str(tmp_path / "m"), "n/1"), "n/1", {0: 0, 1: 7})
    write_marker(str(tmp_path / "m"), 2, 0)
    assert done.count() == 3
    write_node_marker(node_marker_path(str(tmp_path / "m"), "n/1", 99), "n/1", {1: 7, 3: None})
    assert done.count() == 4 and done.exit_codes == {0: 0, 1: 7, 2: 0, 3: None}


def test_long_marker_waits_poll_less_often() -> None:
    """Rank 0's wait on a shared directory slows down as it grows (sleeps up to 0.2 s, a tenth of the
    time waited), where a short wait looks every 20 ms at most. Sleeps never end early, so the
    bounds hold on a loaded machine too."""
    import time

    from flowcept.launch.launcher import poll_until

    calls: List[float] = []

    def ready() -> bool:
        calls.append(time.monotonic())
        return False

    assert not poll_until(ready, 1.5, slow=True)
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert len(calls) <= 40 and max(gaps) >= 0.1, gaps
