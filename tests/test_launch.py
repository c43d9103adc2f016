"""flowcept-launch without Slurm: options, ids, one rank alone, and mpirun -np 4 (real processes)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import read_lines
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
