"""Shared fixtures: every test gets its own directory and buffer path, and leaves no run active."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import orjson
import pytest

APPS = Path(__file__).parent / "apps"
# pytest runs with --import-mode=importlib: make `from conftest import wait_for` work in test files.
if str(APPS.parent) not in sys.path:
    sys.path.insert(0, str(APPS.parent))


@pytest.fixture(autouse=True)
def flowcept_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp dir per test; the buffer files go to <tmp>/flowcept_buffer.jsonl."""
    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_PATH", str(tmp_path / "flowcept_buffer.jsonl"))
    monkeypatch.delenv("FLOWCEPT_SETTINGS_PATH", raising=False)
    monkeypatch.setenv("FLOWCEPT_DAEMON_JOBS_DIR", str(tmp_path / "jobs"))  # job keys stay out of $HOME
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    # A test that failed inside a `with Flowcept()` must not leak its run into the next test.
    from flowcept.flowcept_api.flowcept_controller import Flowcept

    while Flowcept._active:
        try:
            Flowcept._active[-1].stop()
        except Exception:
            Flowcept._active.pop()


@pytest.fixture
def buffer_base(flowcept_tmp: Path) -> str:
    return str(flowcept_tmp / "flowcept_buffer.jsonl")


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # polling interval with a deadline, not synchronisation by sleep
        delay = min(delay * 2, 0.05)


def app_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for a child script: this one (with the test's buffer path) plus ``extra``."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def start_app(name: str, *args: str, env: Optional[Dict[str, str]] = None, **popen: object) -> subprocess.Popen:
    """Start tests/apps/<name> with this interpreter."""
    return subprocess.Popen([sys.executable, str(APPS / name), *map(str, args)], env=app_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def run_app(name: str, *args: str, env: Optional[Dict[str, str]] = None, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run tests/apps/<name> to completion; fail with its output when it fails."""
    proc = subprocess.run([sys.executable, str(APPS / name), *map(str, args)], env=app_env(env),
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout.decode()}\n"
                             f"stderr:\n{proc.stderr.decode()}")
    return proc


def read_lines(path: str) -> List[dict]:
    """Parse a JSONL file strictly (every line must parse)."""
    with open(path, "rb") as handle:
        return [orjson.loads(line) for line in handle if line.strip()]


def tasks_of(records: List[dict], workflow_id: Optional[str] = None) -> List[dict]:
    return [r for r in records if r.get("type") == "task"
            and (workflow_id is None or r.get("workflow_id") == workflow_id)]


@pytest.fixture(scope="session")
def ns_cluster():
    """A 4-node Slurm cluster in network namespaces (tests/cluster/rig.py), up for the whole session.

    Skipped where the machine cannot build one (not root, no Slurm or iproute2); torn down at the
    end of the session, also when a test failed.
    """
    from cluster.rig import NamespaceCluster, missing_requirements

    missing = missing_requirements()
    if missing:
        pytest.skip(f"the namespace cluster needs: {', '.join(missing)}")
    # FLOWCEPT_RIG_TAG: a second rig beside a running one (own names, subnet 10.79.<tag>.0/24)
    tag = int(os.environ.get("FLOWCEPT_RIG_TAG", "0"))
    base = Path("/tmp/flowcept-nscluster" + (f"-{tag}" if tag else ""))
    cluster = NamespaceCluster(nodes=int(os.environ.get("FLOWCEPT_RIG_NODES", "4")), base=base, tag=tag)
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


@functools.lru_cache(maxsize=1)
def real_nvidia_gpus() -> int:
    """How many NVIDIA devices the real nvidia-ml-py sees here (0 on the usual, GPU-less runners)."""
    from flowcept.telemetry.nvidia import NvmlState

    state = NvmlState()
    return len(state.devices) if state.ensure() else 0


def no_real_gpu(test):
    """Skip a test of the GPU-less behaviour where a real GPU is visible (a GPU machine)."""
    return pytest.mark.skipif(real_nvidia_gpus() > 0, reason="checks behaviour without a GPU; one is present")(test)


@pytest.fixture
def telemetry_logs():
    """Records logged by flowcept.telemetry (the flowcept logger may not propagate to caplog)."""
    import logging

    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("flowcept.telemetry")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)
