"""Cross-node status on loopback: daemons of one job share its CURVE keys and register their TCP
address in the job directory; `flowcept daemon status --job` and `flowcept top --job` ask them all.

The same over real node namespaces is in tests/cluster/test_cluster_status.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import app_env, wait_for
from test_daemon import start_daemon  # noqa: F401  (fixture)

pytest.importorskip("zmq")


def _start_job_daemons(start_daemon, jobs: Path, job: str, nodes=("nodeA", "nodeB")):  # noqa: F811
    return [start_daemon("--node", node, "--tcp-port", "-1", "--tcp-host", "127.0.0.1",
                         "--job-dir", str(jobs / job), "--job-step", "0", name=node) for node in nodes]


def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowcept.cli", *args], capture_output=True, text=True,
                          timeout=60, env=app_env(env))


def test_status_of_every_node_of_a_job(start_daemon, tmp_path: Path) -> None:  # noqa: F811
    jobs = tmp_path / "jobs"
    daemons = _start_job_daemons(start_daemon, jobs, "4242")
    job_dir = jobs / "4242"
    assert stat.S_IMODE(os.stat(job_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(job_dir / "curve" / "client.key_secret").st_mode) == 0o600
    entries = sorted(p.name for p in (job_dir / "nodes").iterdir())
    assert entries == ["nodeA.0.json", "nodeB.0.json"]

    proc = _cli("daemon", "status", "--job", "4242", "--jobs-dir", str(jobs), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert sorted(n["node"] for n in report["nodes"]) == ["nodeA", "nodeB"]
    assert sorted(n["pid"] for n in report["nodes"]) == sorted(d.pid for d in daemons)
    assert all(n["tcp_address"].startswith("tcp://127.0.0.1:") for n in report["nodes"])

    text = _cli("daemon", "status", "--job", "4242", "--jobs-dir", str(jobs))
    assert text.returncode == 0 and "nodeA (step 0): pid" in text.stdout and "nodeB (step 0): pid" in text.stdout

    top = _cli("top", "--job", "4242", "--jobs-dir", str(jobs), "--once")
    assert top.returncode == 0, top.stderr
    assert "nodeA" in top.stdout and "nodeB" in top.stdout

    # a daemon that exits removes its entry; the job's other node is still listed
    daemons[0].process.terminate()
    daemons[0].process.wait(timeout=20)
    wait_for(lambda: not (job_dir / "nodes" / "nodeA.0.json").exists(), 10, "nodeA's entry to go")
    after = json.loads(_cli("daemon", "status", "--job", "4242", "--jobs-dir", str(jobs), "--json").stdout)
    assert [n["node"] for n in after["nodes"]] == ["nodeB"]


def test_a_client_without_the_job_key_is_refused(start_daemon, tmp_path: Path) -> None:  # noqa: F811
    import zmq

    from flowcept import job_registry

    jobs = tmp_path / "jobs"
    _start_job_daemons(start_daemon, jobs, "77", nodes=("nodeA",))
    keys = job_registry.client_keys(str(jobs / "77" / "curve"))
    [entry] = job_registry.list_nodes(str(jobs / "77"))
    good = job_registry.remote_status(entry["address"], keys, timeout_s=5)
    assert good.get("node") == "nodeA" and "error" not in good

    stranger_public, stranger_secret = zmq.curve_keypair()  # a valid key pair, but not the job's
    refused = job_registry.remote_status(entry["address"], (keys[0], stranger_public, stranger_secret), 5)
    assert refused["error"].startswith("refused"), refused
    assert "counters" not in refused

    # another job's keys are refused too, end to end through the CLI
    other = tmp_path / "other"
    (other / "77").mkdir(parents=True)
    job_registry.ensure_keys(str(other / "77"))
    (other / "77" / "nodes").mkdir()
    (other / "77" / "nodes" / "nodeA.0.json").write_text(json.dumps(entry))
    proc = _cli("daemon", "status", "--job", "77", "--jobs-dir", str(other))
    assert proc.returncode == 1
    assert "refused" in proc.stdout


@pytest.fixture
def request_cleanup():
    paths: list = []
    yield paths
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_cannot_read_the_job_keys(start_daemon, request_cleanup: list) -> None:  # noqa: F811
    """A forked child that becomes `nobody` (the code is already loaded) is denied the keys."""
    import zmq.auth  # noqa: F401  (loaded before the fork: the child cannot read root's files)

    from flowcept import job_registry

    # a jobs directory the other user can reach (pytest's own tmp is 0700); the job dir stays 0700
    jobs = Path(tempfile.mkdtemp(prefix="flowcept-jobs-", dir="/tmp"))
    os.chmod(jobs, 0o755)
    request_cleanup.append(jobs)
    _start_job_daemons(start_daemon, jobs, "99", nodes=("nodeA",))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                job_registry.job_statuses("99", str(jobs), timeout_s=2)
                message = "read the keys"
            except Exception as error:  # reported to the parent, which asserts on it
                message = f"{type(error).__name__}: {error}"
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    assert "permission denied" in said.lower(), said
    assert said.startswith("JobKeysError"), said
    assert said != "read the keys"


def test_unknown_job_is_a_clear_error(tmp_path: Path) -> None:
    proc = _cli("daemon", "status", "--job", "nosuchjob", "--jobs-dir", str(tmp_path / "jobs"))
    assert proc.returncode != 0
    assert "no job directory" in proc.stderr or "cannot read the job's key" in proc.stderr
