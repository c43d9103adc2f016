"""flowcept-launch on a real one-node Slurm (scripts/slurm-up.sh): srun steps, failures, signals, sbatch.

Skipped when srun is absent or the cluster does not answer (sinfo fails). Every wait has a
deadline; jobs a test started are cancelled by its fixture.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import read_lines, wait_for

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "tests" / "launch_apps" / "instrumented.py")
LAUNCH = [sys.executable, "-m", "flowcept.launch"]


def _cluster_up() -> bool:
    if shutil.which("srun") is None or shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and b"idle" in out.stdout or b"mix" in out.stdout or b"alloc" in out.stdout


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(not _cluster_up(), reason="needs a running Slurm")]


def slurm_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMIX_", "OMPI_", "PMI_"))}
    env.pop("FLOWCEPT_WORKFLOW_ID", None)
    env.update(extra)
    return env


def srun(*args: str, daemon: bool = False, timeout: float = 90) -> subprocess.CompletedProcess:
    flag = [] if daemon else ["--no-daemon"]
    return subprocess.run(["srun", "-n", "4", *LAUNCH, *flag, *args], env=slurm_env(), capture_output=True,
                          timeout=timeout)


def outputs(directory: Path) -> List[str]:
    return sorted(glob.glob(str(directory / "flowcept_buffer_*.jsonl")))


def process_tasks(records: List[dict]) -> List[dict]:
    return [r for r in records if r.get("subtype") == "rank_process"]


@pytest.fixture
def jobs():
    """Job ids a test submitted; cancelled at the end whatever happened."""
    started: List[str] = []
    yield started
    for job in started:
        subprocess.run(["scancel", job], capture_output=True, timeout=10)


@pytest.mark.parametrize("instrumented", [False, True])
def test_srun_four_ranks_one_workflow(tmp_path: Path, instrumented: bool) -> None:
    command = [sys.executable, APP, "--tasks", "2"] if instrumented else ["true"]
    proc = srun(*command)
    assert proc.returncode == 0, proc.stderr.decode()
    [output] = outputs(tmp_path)
    records = read_lines(output)
    process = process_tasks(records)
    assert sorted(r["rank"] for r in process) == [0, 1, 2, 3]
    assert all(r["status"] == "FINISHED" and r["job_id"] and r["generated"]["exit_code"] == 0 for r in process)
    assert len({r["workflow_id"] for r in records}) == 1
    assert len([r for r in records if r.get("activity_id") == "app_step"]) == (8 if instrumented else 0)
    assert [r["workflow_id"] for r in records if r["type"] == "workflow"] == [process[0]["workflow_id"]]
    assert process[0]["workflow_id"] in proc.stdout.decode() and output in proc.stdout.decode()
    assert not glob.glob(str(tmp_path / ".flowcept_launch_*"))  # markers removed after consolidation


def test_failing_rank_is_an_error_and_the_others_finish(tmp_path: Path) -> None:
    proc = srun(sys.executable, APP, "--exit-rank", "2", "--code", "7")
    assert proc.returncode == 7
    records = read_lines(outputs(tmp_path)[0])
    status = {r["rank"]: (r["status"], r["generated"]["exit_code"]) for r in process_tasks(records)}
    assert status == {0: ("FINISHED", 0), 1: ("FINISHED", 0), 2: ("ERROR", 7), 3: ("FINISHED", 0)}
    assert len([r for r in records if r.get("activity_id") == "app_step"]) == 12


def test_sigterm_to_the_job_step_keeps_what_was_captured(tmp_path: Path, jobs: List[str]) -> None:
    hang = tmp_path / "hang"
    hang.mkdir()
    name = f"flowcept-term-{os.getpid()}-{tmp_path.name}"
    step = subprocess.Popen(["srun", "-n", "4", f"--job-name={name}", *LAUNCH, "--no-daemon", "--no-consolidate",
                             sys.executable, APP, "--hang", str(hang)], env=slurm_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(list(hang.glob("ready-*"))) == 4, 60, "4 ranks to capture their tasks")
        job = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=10)
        mine = job.stdout.split()
        assert mine, job.stdout
        jobs.extend(mine)
        subprocess.run(["scancel", "--signal=TERM", mine[0]], check=True, timeout=10)
        step.wait(timeout=60)
    finally:
        if step.poll() is None:
            step.kill()
            step.wait()
    workflow_id = (hang / "ready-0").read_text()
    assert workflow_id
    merged = subprocess.run([sys.executable, "-m", "flowcept.cli", "consolidate", "-q", "--workflow-id", workflow_id,
                             "--path", str(tmp_path / "flowcept_buffer.jsonl")], capture_output=True, timeout=60)
    assert merged.returncode == 0, merged.stderr.decode()
    records = read_lines(str(tmp_path / f"flowcept_buffer_{workflow_id}.jsonl"))
    assert len([r for r in records if r.get("activity_id") == "app_step"]) == 12
    process = process_tasks(records)
    assert len(process) == 4 and all(r["status"] == "ERROR" and r["generated"]["signal"] == 15 for r in process)


def test_two_steps_at_once_do_not_mix(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    procs = []
    for directory in dirs:
        directory.mkdir()
        procs.append(subprocess.Popen(["srun", "-n", "2", *LAUNCH, "-o", str(directory), sys.executable, APP,
                                       "--tasks", "2"], env=slurm_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    for proc in procs:
        proc.wait(timeout=90)
        assert proc.returncode == 0, proc.stderr.read().decode()
    workflows = []
    for directory in dirs:
        [output] = outputs(directory)
        records = read_lines(output)
        ids = {r["workflow_id"] for r in records}
        assert len(ids) == 1 and len(process_tasks(records)) == 2
        assert len([r for r in records if r.get("activity_id") == "app_step"]) == 4
        workflows.append(ids.pop())
    assert workflows[0] != workflows[1]


def test_sbatch_single_node_example(tmp_path: Path, jobs: List[str]) -> None:
    script = REPO / "slurm_examples" / "single_node" / "job.sbatch"
    submit = subprocess.run(["sbatch", "--parsable", f"--chdir={tmp_path}", f"--output={tmp_path}/job.out",
                             str(script)], env=slurm_env(FLOWCEPT_EXAMPLE_PYTHON=sys.executable,
                                           FLOWCEPT_EXAMPLES_DIR=str(REPO / "slurm_examples")),
                            capture_output=True, text=True, timeout=30)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    jobs.append(job)

    def finished() -> bool:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=10)
        return out.returncode == 0 and not out.stdout.strip() or "Invalid job id" in out.stderr

    wait_for(finished, 90, f"job {job} to finish")
    log = (tmp_path / "job.out").read_text()
    [output] = outputs(tmp_path / "flowcept_out")
    records = read_lines(output)
    assert len(process_tasks(records)) == 4, log
    assert len([r for r in records if r.get("activity_id") == "app_step"]) > 0, log
    assert output in log


def test_srun_with_node_daemon_has_node_telemetry(tmp_path: Path) -> None:
    proc = srun("--telemetry-interval", "0.05", sys.executable, APP, "--tasks", "2", daemon=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"each rank writes its own file" not in proc.stderr, proc.stderr.decode()
    records = read_lines(outputs(tmp_path)[0])
    assert sorted(r["rank"] for r in process_tasks(records)) == [0, 1, 2, 3]
    assert len([r for r in records if r.get("activity_id") == "app_step"]) == 8
    assert [r for r in records if r["type"] == "telemetry"], "no node telemetry from the daemon"
    assert len({r["workflow_id"] for r in records}) == 1


def test_daemon_killed_mid_job_loses_nothing(tmp_path: Path) -> None:
    import signal

    import orjson

    from flowcept import protocol

    pause = tmp_path / "pause"
    pause.mkdir()
    step = subprocess.Popen(["srun", "-n", "4", *LAUNCH, sys.executable, APP, "--tasks", "3", "--pause", str(pause)],
                            env=slurm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(list(pause.glob("ready-*"))) == 4, 60, "4 ranks to reach the pause")
        address = (pause / "ready-0").read_text()
        assert address.startswith("ipc://"), address
        directory = os.path.dirname(address[len("ipc://"):])
        ready = orjson.loads(Path(protocol.ready_path(directory)).read_bytes())
        os.kill(ready["pid"], signal.SIGKILL)
        (pause / "go").touch()
        out, err = step.communicate(timeout=90)
    finally:
        if step.poll() is None:
            step.kill()
            step.wait()
    assert step.returncode == 0, err.decode()
    records = read_lines(outputs(tmp_path)[0])
    assert len(process_tasks(records)) == 4
    assert len([r for r in records if r.get("activity_id") == "app_step"]) == 12
    assert len([r for r in records if r.get("activity_id") == "app_step_after"]) == 12


def test_srun_with_node_daemon_writes_files_per_node_not_per_rank(tmp_path: Path) -> None:
    """With the daemon, the 4 ranks' records reach the shared output directory as one file of the node."""
    proc = srun("--keep-files", "true", daemon=True)
    assert proc.returncode == 0, proc.stderr.decode()
    [output] = [f for f in outputs(tmp_path) if Path(f).name.count("_") == 2]
    wf = Path(output).stem[len("flowcept_buffer_"):]
    names = sorted(n for n in os.listdir(tmp_path) if n.startswith(("flowcept", ".flowcept")))
    assert [n for n in names if n != Path(output).name] == [f"flowcept_buffer_{wf}_node-localhost.jsonl",
                                                            f"flowcept_buffer_{wf}_ranks-localhost.jsonl"], names
    assert sorted(r["rank"] for r in process_tasks(read_lines(output))) == [0, 1, 2, 3]
