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
    job_dir, step_dir = jobs / "4242", jobs / "4242" / "0"
    assert stat.S_IMODE(os.stat(job_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(step_dir).st_mode) == 0o700
    for key in ("client.key_secret", "server.key_secret", "client.key", "server.key"):
        assert stat.S_IMODE(os.stat(step_dir / "curve" / key).st_mode) == 0o600, key
    entries = sorted(p.name for p in (step_dir / "nodes").iterdir())
    assert entries == ["nodeA.json", "nodeB.json"]

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
    wait_for(lambda: not (step_dir / "nodes" / "nodeA.json").exists(), 10, "nodeA's entry to go")
    after = json.loads(_cli("daemon", "status", "--job", "4242", "--jobs-dir", str(jobs), "--json").stdout)
    assert [n["node"] for n in after["nodes"]] == ["nodeB"]


def test_a_client_without_the_job_key_is_refused(start_daemon, tmp_path: Path) -> None:  # noqa: F811
    import zmq

    from flowcept import job_registry

    jobs = tmp_path / "jobs"
    _start_job_daemons(start_daemon, jobs, "77", nodes=("nodeA",))
    keys = job_registry.client_keys(str(jobs / "77" / "0" / "curve"))
    [entry] = job_registry.list_nodes(str(jobs / "77" / "0"))
    good = job_registry.remote_status(entry["address"], keys, timeout_s=5)
    assert good.get("node") == "nodeA" and "error" not in good

    stranger_public, stranger_secret = zmq.curve_keypair()  # a valid key pair, but not the job's
    refused = job_registry.remote_status(entry["address"], (keys[0], stranger_public, stranger_secret), 5)
    assert refused["error"].startswith("refused"), refused
    assert "counters" not in refused

    # another job's keys are refused too, end to end through the CLI
    other = tmp_path / "other"
    job_registry.ensure_keys(str(other / "77" / "0"))
    (other / "77" / "0" / "nodes").mkdir()
    (other / "77" / "0" / "nodes" / "nodeA.json").write_text(json.dumps(entry))
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


def test_the_status_socket_answers_status_and_nothing_else(start_daemon, tmp_path: Path) -> None:  # noqa: F811
    """Whoever holds the job's status key may ask, not inject records: a batch over it is refused."""
    import zmq

    from flowcept import job_registry, protocol

    jobs = tmp_path / "jobs"
    [daemon] = _start_job_daemons(start_daemon, jobs, "55", nodes=("nodeA",))
    [entry] = job_registry.list_nodes(str(jobs / "55" / "0"))
    server_key, public, secret = job_registry.client_keys(str(jobs / "55" / "0" / "curve"))
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
        sock.connect(entry["address"])
        sock.send_multipart(protocol.encode_batch(1, "wf-injected", b'{"type":"task","task_id":"x"}\n', 1))
        assert sock.poll(10_000), "no answer to the batch"
        reply = protocol.decode(sock.recv_multipart(), 1 << 20, kinds=protocol.DAEMON_KINDS)
        assert reply.kind == "nack"
    finally:
        sock.close(linger=0)
        context.term()
    counters = daemon.counters()
    assert counters["received"] == 0
    assert counters["rejected_by_reason"].get("status_only_socket") == 1


def test_an_unusable_job_directory_leaves_the_daemon_serving(start_daemon, tmp_path: Path) -> None:  # noqa: F811
    """Cross-node status is a convenience: a job directory that is a file, or not ours, turns it off."""
    blocker = tmp_path / "jobs-is-a-file"
    blocker.write_text("")
    daemon = start_daemon("--node", "nodeA", "--tcp-port", "-1", "--tcp-host", "127.0.0.1",
                          "--job-dir", str(blocker / "1"), name="rt1")
    assert daemon.status()["tcp_address"] is None
    assert "cross-node status off" in daemon.stderr()
    if os.geteuid() == 0:  # a job directory another user made first is refused, the daemon still runs
        hostile = tmp_path / "jobs" / "2"
        hostile.mkdir(parents=True)
        os.chown(hostile, 65534, 65534)
        other = start_daemon("--node", "nodeB", "--tcp-port", "-1", "--tcp-host", "127.0.0.1",
                             "--job-dir", str(hostile), name="rt2")
        assert other.status()["tcp_address"] is None
        assert "belongs to uid 65534" in other.stderr()
        assert not (hostile / "0").exists()


def test_step_keys_are_made_once_by_racing_nodes_and_removed_at_the_end(tmp_path: Path) -> None:
    """Twelve processes (a step's nodes) make the keys at once: all end with the same key pair."""
    import multiprocessing

    from flowcept import job_registry

    step = str(tmp_path / "jobs" / "9" / "3")
    context = multiprocessing.get_context("spawn")
    with context.Pool(12) as pool:
        directories = pool.map(job_registry.ensure_keys, [step] * 12)
    assert set(directories) == {os.path.join(step, "curve")}
    keys = job_registry.client_keys(os.path.join(step, "curve"))
    assert [name for name in os.listdir(step) if name.startswith(".curve")] == []  # staging dirs gone
    job_registry.register_node(step, "nodeA", "3", "tcp://127.0.0.1:1", 1)
    other_step = job_registry.step_dir(str(tmp_path / "jobs" / "9"), "4")
    job_registry.ensure_keys(other_step)
    assert job_registry.client_keys(os.path.join(other_step, "curve")) != keys  # steps never share keys
    job_registry.remove_step(step)
    assert not os.path.exists(step) and os.path.isdir(other_step)  # the other step is untouched
    job_registry.remove_step(other_step)
    assert not (tmp_path / "jobs" / "9").exists()  # the last step takes the job directory along


def test_status_tries_each_registered_address_in_turn(start_daemon, tmp_path: Path) -> None:  # noqa: F811
    """A node whose first address is unreachable from here is still reached at its next one."""
    import socket

    from flowcept import job_registry

    jobs = tmp_path / "jobs"
    _start_job_daemons(start_daemon, jobs, "31", nodes=("nodeA",))
    step = str(jobs / "31" / "0")
    [entry] = job_registry.list_nodes(step)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    job_registry.register_node(step, "nodeA", "0", dead, entry["pid"], [dead, entry["address"]])
    [status] = job_registry.job_statuses("31", str(jobs), timeout_s=2)
    assert "error" not in status, status
    assert status["tcp_address"] == entry["address"]


def test_advertised_hosts_never_loopback_and_end_with_the_host_name() -> None:
    import socket

    from flowcept import job_registry

    hosts = job_registry.advertised_hosts()
    assert hosts[-1] == socket.gethostname()
    assert not any(h.startswith("127.") for h in hosts[:-1])
    assert len(hosts) == len(set(hosts))


def test_unknown_job_is_a_clear_error(tmp_path: Path) -> None:
    proc = _cli("daemon", "status", "--job", "nosuchjob", "--jobs-dir", str(tmp_path / "jobs"))
    assert proc.returncode != 0
    assert "no job directory" in proc.stderr or "cannot read the job's key" in proc.stderr
