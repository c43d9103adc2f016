"""The node daemon with real sockets, processes and signals: clients, kills, fuzzing, metrics, CLI."""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import orjson
import pytest
from conftest import app_env, read_lines, wait_for

from flowcept import protocol

zmq = pytest.importorskip("zmq")

APPS = Path(__file__).parent / "daemon_apps"
CLIENT = str(APPS / "client.py")


class Daemon:
    """A daemon process started by a test; the fixture kills it if the test did not."""

    def __init__(self, directory: str, process: subprocess.Popen):
        self.directory = directory
        self.process = process
        self.ready: Dict = {}

    @property
    def address(self) -> str:
        return self.ready["address"]

    @property
    def pid(self) -> int:
        return self.process.pid

    def status(self) -> Dict:
        from flowcept.daemon_link import daemon_status

        status = daemon_status(self.address, timeout_s=5.0)
        assert status is not None, "daemon did not answer status"
        return status

    def counters(self) -> Dict:
        return self.status()["counters"]

    def wait_counter(self, name: str, value: int, timeout: float = 20.0) -> None:
        wait_for(lambda: self.counters()[name] >= value, timeout, f"daemon counter {name} >= {value}")

    def stderr(self) -> str:
        path = os.path.join(self.directory, "test-daemon.log")
        return open(path).read() if os.path.exists(path) else ""


@pytest.fixture
def start_daemon(tmp_path: Path):
    started: List[Daemon] = []

    def start(*extra: str, name: str = "rt", env: Optional[Dict[str, str]] = None, gpu: bool = False) -> Daemon:
        directory = str(tmp_path / name)
        os.makedirs(directory, exist_ok=True)
        log = open(os.path.join(directory, "test-daemon.log"), "wb")
        process = subprocess.Popen([sys.executable, "-m", "flowcept.daemon", "--runtime-dir", directory,
                                    *([] if gpu else ["--no-gpu"]), "--telemetry-interval", "0.2",
                                    "--log-level", "info", *extra],
                                   stdout=log, stderr=log, env=app_env(env))
        log.close()
        daemon = Daemon(directory, process)
        started.append(daemon)

        def ready() -> bool:
            record = protocol.read_ready(directory)
            if record and record.get("pid") == process.pid:
                daemon.ready = record
                return True
            assert process.poll() is None, f"daemon exited early:\n{daemon.stderr()}"
            return False

        wait_for(ready, 30, "the daemon's ready file")
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
        daemon.process.wait(timeout=10)


def run_client(daemon: Daemon, workflow_id: str, n: int, *extra: str, env: Optional[Dict] = None,
               timeout: float = 60.0) -> Dict:
    variables = {"FLOWCEPT_DAEMON_ADDRESS": daemon.address, "FLOWCEPT_DAEMON_ACK_TIMEOUT_S": "1"}
    variables.update(env or {})
    proc = subprocess.run([sys.executable, CLIENT, workflow_id, str(n), *extra], env=app_env(variables),
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def start_client(daemon: Daemon, workflow_id: str, n: int, *extra: str,
                 env: Optional[Dict] = None) -> subprocess.Popen:
    variables = {"FLOWCEPT_DAEMON_ADDRESS": daemon.address, "FLOWCEPT_DAEMON_ACK_TIMEOUT_S": "1"}
    variables.update(env or {})
    return subprocess.Popen([sys.executable, CLIENT, workflow_id, str(n), *extra], env=app_env(variables),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def node_files(base: str, workflow_id: str) -> List[str]:
    directory, name = os.path.split(base)
    stem = os.path.splitext(name)[0]
    return glob.glob(os.path.join(directory, f"{stem}_{workflow_id}_node-*.jsonl"))


def process_files(base: str, workflow_id: str) -> List[str]:
    directory, name = os.path.split(base)
    stem = os.path.splitext(name)[0]
    return [p for p in glob.glob(os.path.join(directory, f"{stem}_{workflow_id}_*.jsonl")) if "_node-" not in p]


def consolidated_numbers(base: str, workflow_id: str) -> List[int]:
    from flowcept.consolidation import consolidate

    report = consolidate(base, workflow_id)
    records = read_lines(report.output_path)
    return sorted(r["used"]["i"] for r in records if r.get("type") == "task" and r.get("activity_id") == "numbered")


def line_count(paths: List[str]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            total += handle.read().count(b"\n")
    return total


# -- protocol -----------------------------------------------------------------------------------------

def test_protocol_round_trip_and_rejections() -> None:
    payload = b'{"type":"task","task_id":"a"}\n{"type":"task","task_id":"b"}\n'
    message = protocol.decode(protocol.encode_batch(7, "wf", payload, 2), 1 << 20)
    assert (message.kind, message.header["s"], message.header["w"], message.payload) == ("batch", 7, "wf", payload)
    assert protocol.decode(protocol.encode_hello({"pid": 1}), 1 << 20).header["pid"] == 1
    assert protocol.decode(protocol.encode_ack(3), 1 << 20, kinds=protocol.DAEMON_KINDS).header["s"] == 3
    bad = {
        "malformed": [[b"not json"], [b"[1,2]"], [], [b"{}", b"x", b"y"],
                      [b'{"v":1,"k":"batch","s":"1","n":1}', b"{}\n"]],
        "version": [[b'{"v":2,"k":"ping"}'], [b'{"k":"ping"}']],
        "kind": [[b'{"v":1,"k":"ack"}'], [b'{"v":1,"k":"shutdown"}']],
        "oversize": [protocol.encode_batch(1, "wf", payload * 100, 200)],
        "payload": [protocol.encode_batch(1, "wf", payload, 3), protocol.encode_batch(1, "wf", b"{x}\n{", 1),
                    protocol.encode_batch(1, "wf", payload[:-1], 2)],
    }
    for reason, cases in bad.items():
        for frames in cases:
            with pytest.raises(protocol.ProtocolError) as error:
                protocol.decode(frames, 4096)
            assert error.value.reason == reason, (frames, error.value)
    assert not protocol.check_payload(b'{"a":}\n', 1, strict=True)
    assert protocol.check_payload(b'{"a":1}\n', 1, strict=True)


def test_payload_checks_read_buffers_in_place() -> None:
    """The daemon hands zero-copy frames (buffers) to decode: counted in bulk, never copied."""
    line = orjson.dumps({"type": "task", "task_id": "t", "pad": "x" * 40}) + b"\n"
    for n in (1, 5, 3000):  # below and above the size where the count switches to numpy
        payload = bytearray(line * n)
        view = memoryview(payload)
        assert protocol.count_lines(view) == n
        assert protocol.check_payload(view, n) and protocol.check_payload(view, n, strict=True)
        assert not protocol.check_payload(view, n + 1) and not protocol.check_payload(view, n - 1)
        message = protocol.decode([memoryview(protocol.encode_batch(1, "wf", b"", n)[0]), view], 1 << 26)
        assert message.payload is view
        with pytest.raises(protocol.ProtocolError) as error:
            protocol.decode([protocol.encode_batch(1, "wf", b"", n + 1)[0], view], 1 << 26)
        assert error.value.reason == "payload"
    torn = memoryview(line * 2999 + line[:-1])  # a last line without its end
    assert not protocol.check_payload(torn, 2999) and not protocol.check_payload(torn, 3000)
    bad = memoryview(line * 2999 + b'{"a":}\n')  # framing right, JSON wrong: only strict sees it
    assert protocol.check_payload(bad, 3000) and not protocol.check_payload(bad, 3000, strict=True)


def test_split_payload_cuts_at_line_ends() -> None:
    lines = [orjson.dumps({"i": i, "pad": "x" * (i % 50)}) + b"\n" for i in range(500)]
    payload = b"".join(lines)
    pieces = protocol.split_payload(payload, 1000)
    assert b"".join(pieces) == payload
    assert all(piece.endswith(b"\n") and len(piece) <= 1000 for piece in pieces)


def test_runtime_dir_is_short_private_and_per_job(tmp_path: Path) -> None:
    env = {"FLOWCEPT_NODE_NAME": "n" * 200, "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "3"}
    directory = protocol.runtime_dir(str(tmp_path), env=env)
    assert len(protocol.socket_path(directory)) <= protocol.IPC_PATH_LIMIT
    other = protocol.runtime_dir(str(tmp_path), env={**env, "SLURM_STEP_ID": "4"})
    assert other != directory
    protocol.make_private_dir(directory)
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert os.stat(os.path.dirname(directory)).st_mode & 0o777 == 0o700


# -- the daemon with real clients ---------------------------------------------------------------------------

def test_many_clients_one_daemon_every_record_once(start_daemon, buffer_base: str) -> None:
    daemon = start_daemon()
    procs = [start_client(daemon, "wf-many", 300) for _ in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        result = json.loads(out.decode().strip().splitlines()[-1])
        assert result["transport"] == "DaemonLink"
        assert result["counters"]["spilled"] == 0 and result["counters"]["acked"] == 302
    status = daemon.status()
    assert status["clients"]["finished"] == 4 and status["clients"]["connected"] == 0
    assert status["counters"]["written"] == 4 * 302 and status["counters"]["rejected"] == 0
    assert process_files(buffer_base, "wf-many") == []  # nothing went to per-process files
    assert len(node_files(buffer_base, "wf-many")) == 1
    from flowcept.consolidation import consolidate

    report = consolidate(buffer_base, "wf-many", cleanup_files=False)
    records = read_lines(report.output_path)
    tasks = [r for r in records if r.get("type") == "task"]
    assert len(tasks) == 1200 and len({t["task_id"] for t in tasks}) == 1200
    assert sorted(t["used"]["i"] for t in tasks) == sorted(list(range(300)) * 4)
    assert sum(r.get("type") == "workflow" for r in records) == 1


def test_daemon_writes_telemetry_of_registered_ranks(start_daemon, buffer_base: str, tmp_path: Path) -> None:
    daemon = start_daemon()
    paused, resume = tmp_path / "paused", tmp_path / "resume"
    proc = start_client(daemon, "wf-tel", 20, "10", str(paused), str(resume))
    try:
        wait_for(paused.exists, 30, "the client to pause")
        pid = proc.pid
        [path] = node_files(buffer_base, "wf-tel")

        def has_process_telemetry() -> bool:
            return any(r.get("kind") == "process" and r.get("pid") == pid for r in read_lines(path)
                       if r.get("type") == "telemetry")

        wait_for(has_process_telemetry, 20, "process telemetry of the client")
    finally:
        resume.touch()
        proc.communicate(timeout=60)
    telemetry = [r for r in read_lines(path) if r.get("type") == "telemetry"]
    assert {r["kind"] for r in telemetry} >= {"node", "process"}
    for record in telemetry:
        assert list(record)[:3] == ["type", "telemetry_id", "workflow_id"] and record["workflow_id"] == "wf-tel"
        assert record["hostname"] and record["timestamp"] > 0
    status = daemon.status()
    assert status["counters"]["telemetry_written"] >= len(telemetry)
    assert any(r.get("kind") == "node" for r in status["telemetry"]["latest"])


def test_daemon_sigkilled_mid_stream_then_consolidation_has_every_record_once(
        start_daemon, buffer_base: str, tmp_path: Path) -> None:
    daemon = start_daemon()
    paused, resume = tmp_path / "paused", tmp_path / "resume"
    n, pause_at = 6000, 4000
    proc = start_client(daemon, "wf-kill", n, str(pause_at), str(paused), str(resume),
                        env={"FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_SIZE": "50",
                             "FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_INTERVAL_S": "0.01"})
    try:
        wait_for(lambda: bool(node_files(buffer_base, "wf-kill")) and line_count(
            node_files(buffer_base, "wf-kill")) >= 200 or paused.exists(), 30, "records reaching the daemon")
        os.kill(daemon.pid, signal.SIGKILL)  # mid-stream (or at the pause, on a very fast run)
        daemon.process.wait(timeout=10)
    finally:
        resume.touch()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    counters = json.loads(out.decode().strip().splitlines()[-1])["counters"]
    assert counters["spilled"] > 0
    assert process_files(buffer_base, "wf-kill")
    assert consolidated_numbers(buffer_base, "wf-kill") == list(range(n))


def test_client_sigkilled_daemon_keeps_serving(start_daemon, buffer_base: str, tmp_path: Path) -> None:
    daemon = start_daemon()
    paused = tmp_path / "paused"
    victim = start_client(daemon, "wf-victim", 100, "50", str(paused), str(tmp_path / "never"))
    try:
        wait_for(paused.exists, 30, "the victim to pause")
        victim.kill()
        victim.wait(timeout=10)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.communicate(timeout=10)
    run_client(daemon, "wf-survivor", 200)
    wait_for(lambda: daemon.status()["clients"]["lost"] == 1, 20, "the killed client to count as lost")
    status = daemon.status()
    assert status["clients"]["finished"] == 1
    assert daemon.process.poll() is None
    assert consolidated_numbers(buffer_base, "wf-survivor") == list(range(200))
    # What the victim flushed before the kill is there, once.
    assert consolidated_numbers(buffer_base, "wf-victim") == list(range(50))


def _garbage(rng: random.Random, limit: int) -> List[List[bytes]]:
    """Ten thousand messages the daemon must reject (and that it can never mistake for valid ones)."""
    valid_payload = b'{"type":"task","task_id":"x"}\n'
    makers = [
        lambda: [rng.randbytes(rng.randint(0, 300))],
        lambda: [b"{" + rng.randbytes(rng.randint(0, 50))],
        lambda: [b'{"v":99,"k":"batch","s":1,"w":"wf","n":1}', valid_payload],
        lambda: [b'{"v":1,"k":"launch_missiles"}'],
        lambda: [b'{"v":1,"k":"batch","s":1,"w":"wf","n":1}', rng.randbytes(40)],
        lambda: [b'{"v":1,"k":"batch","s":1,"w":"wf","n":2}', valid_payload],
        lambda: [b'{"v":1,"k":"batch","s":"x","w":"wf","n":1}', valid_payload],
        lambda: [b"[]", b"", b"extra"],
        lambda: [b'{"v":1,"k":"hello"}', b"payload for a hello"],
        # A perfectly formed batch from a client that never registered: refused too.
        lambda: protocol.encode_batch(1, "wf-fuzz", valid_payload, 1),
    ]
    messages = [rng.choice(makers)() for _ in range(9990)]
    messages += [protocol.encode_batch(i, "wf-fuzz", valid_payload * (limit // len(valid_payload) + 1),
                                       limit // len(valid_payload) + 1) for i in range(10)]  # oversize
    return messages


def test_ten_thousand_bad_frames_are_rejected_and_valid_records_survive(
        start_daemon, buffer_base: str) -> None:
    limit = 65536
    daemon = start_daemon("--max-message-bytes", str(limit))
    garbage = _garbage(random.Random(4), limit)
    context = zmq.Context()
    attacker = context.socket(zmq.DEALER)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.setsockopt(zmq.SNDTIMEO, 10000)
    attacker.connect(daemon.address)
    client = start_client(daemon, "wf-fuzz", 500, env={"FLOWCEPT_DAEMON_MAX_MESSAGE_BYTES": str(limit)})
    try:
        for frames in garbage:
            attacker.send_multipart(frames)
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err.decode()
        daemon.wait_counter("rejected", len(garbage))
    finally:
        attacker.close()
        context.term()
    counters = daemon.counters()
    assert counters["rejected"] == len(garbage)
    assert counters["rejected_by_reason"]["oversize"] == 10
    assert counters["written"] == 502
    from flowcept.daemon_link import ping

    assert ping(daemon.address, 2.0)
    assert daemon.process.poll() is None
    [path] = node_files(buffer_base, "wf-fuzz")
    records = read_lines(path)  # every line parses: nothing of the garbage was written
    assert sum(r.get("type") == "task" for r in records) == 500
    assert all(r.get("workflow_id") == "wf-fuzz" for r in records)
    assert consolidated_numbers(buffer_base, "wf-fuzz") == list(range(500))


def test_sigterm_drains_flushes_and_loses_nothing(start_daemon, buffer_base: str, tmp_path: Path) -> None:
    daemon = start_daemon()
    paused, resume = tmp_path / "paused", tmp_path / "resume"
    proc = start_client(daemon, "wf-term", 3000, "2000", str(paused), str(resume))
    try:
        wait_for(paused.exists, 30, "the client to pause")
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=20) == 0
    finally:
        resume.touch()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert protocol.read_ready(daemon.directory) is None
    assert not os.path.exists(protocol.socket_path(daemon.directory))
    [path] = node_files(buffer_base, "wf-term")
    in_node_file = sorted(r["used"]["i"] for r in read_lines(path) if r.get("type") == "task")
    assert in_node_file == list(range(2000))  # everything acknowledged before SIGTERM is on disk
    assert consolidated_numbers(buffer_base, "wf-term") == list(range(3000))


def test_exit_when_idle_after_every_goodbye(start_daemon, buffer_base: str) -> None:
    daemon = start_daemon("--exit-when-idle", "--idle-grace", "0.1")
    run_client(daemon, "wf-idle", 50)
    assert daemon.process.wait(timeout=20) == 0
    assert consolidated_numbers(buffer_base, "wf-idle") == list(range(50))


@pytest.mark.parametrize("strict", [False, True], ids=["framing", "strict"])
def test_batch_with_wrong_line_count_is_refused_and_kept_by_the_client(
        start_daemon, buffer_base: str, strict: bool) -> None:
    """Lines are counted before anything is written: a mismatch is never written, the client spills it."""
    from flowcept.daemon_link import DaemonLink
    from flowcept.transport import FileTransport

    daemon = start_daemon("--no-telemetry", *(["--strict"] if strict else []))

    def lines(start: int, n: int) -> bytes:
        return b"".join(orjson.dumps({"type": "task", "task_id": f"t{i}", "workflow_id": "wf-count",
                                      "activity_id": "numbered", "used": {"i": i}}) + b"\n"
                        for i in range(start, start + n))

    link = DaemonLink(daemon.address, fallback=FileTransport(buffer_base, "host"), ack_timeout_s=10)
    try:
        link.send("wf-count", lines(0, 2), 2)
        link.send("wf-count", lines(2, 400), 401)  # says 401, holds 400 (large: counted in bulk)
        link.send("wf-count", lines(402, 3), 3)
        link.flush(durable=True)
        assert link.batches_nacked == 1 and link.records_acked == 5 and link.records_spilled == 401
    finally:
        link.close()
    counters = daemon.counters()
    assert counters["rejected_by_reason"]["payload"] == 1 and counters["rejected"] == 1
    assert counters["written"] == 5 and counters["received"] == 5
    [path] = node_files(buffer_base, "wf-count")
    assert [r["used"]["i"] for r in read_lines(path)] == [0, 1, 402, 403, 404]
    assert consolidated_numbers(buffer_base, "wf-count") == list(range(405))


def test_link_without_daemon_writes_the_per_process_file(buffer_base: str, tmp_path: Path) -> None:
    from flowcept.daemon_link import DaemonLink, ping
    from flowcept.transport import FileTransport

    address = "ipc://" + str(tmp_path / "nobody.sock")
    assert not ping(address, 0.2)
    link = DaemonLink(address, fallback=FileTransport(buffer_base, "host"), ack_timeout_s=0.2)
    link.send("wf-none", b'{"type":"task","task_id":"1","workflow_id":"wf-none"}\n', 1)
    link.send("wf-none", b'{"type":"task","task_id":"2","workflow_id":"wf-none"}\n', 1)
    link.flush(durable=True)
    link.close()
    link.close()
    assert link.records_spilled == 2 and link.records_written == 2
    [path] = process_files(buffer_base, "wf-none")
    assert [r["task_id"] for r in read_lines(path)] == ["1", "2"]


def test_second_user_cannot_connect(start_daemon) -> None:
    if os.getuid() != 0:
        pytest.skip("creating a second user needs root")
    import pwd

    name = "flowcept-other"
    try:
        pwd.getpwnam(name)
    except KeyError:
        created = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                                 capture_output=True)
        if created.returncode != 0:
            pytest.skip(f"useradd failed: {created.stderr.decode().strip()}")
    other = pwd.getpwnam(name)
    daemon = start_daemon()
    before = daemon.counters()
    socket_file = protocol.socket_path(daemon.directory)
    pid = os.fork()
    if pid == 0:  # the other user: can it reach the socket or inject a record?
        code = 0
        try:
            os.setgroups([])
            os.setgid(other.pw_gid)
            os.setuid(other.pw_uid)
            try:
                os.stat(socket_file)
                code |= 1
            except PermissionError:
                pass
            context = zmq.Context()
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.connect(daemon.address)
            if sock.poll(1000, zmq.POLLOUT):
                code |= 2
            try:
                sock.send_multipart(protocol.encode_ping(), zmq.NOBLOCK)
                code |= 4
            except zmq.Again:
                pass
            sock.close()
            context.term()
        except BaseException:
            code |= 8
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    after = daemon.counters()
    assert (after["received"], after["rejected"]) == (before["received"], before["rejected"])
    assert daemon.process.poll() is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_metrics_endpoint_parses_with_prometheus_parser(start_daemon, tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    daemon = start_daemon("--metrics-port", str(_free_port()))
    port = daemon.ready["metrics_port"]
    assert port
    run_client(daemon, "wf-metrics", 20)
    wait_for(lambda: daemon.status()["telemetry"]["latest"], 20, "a telemetry sample")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["flowcept_daemon_records_written"].type == "counter"
    written = [s for s in families["flowcept_daemon_records_written"].samples if s.name.endswith("_total")]
    assert written[0].value == 22
    assert "flowcept_node_memory_used_bytes" in families
    assert {s.labels["state"] for s in families["flowcept_daemon_clients"].samples} == {"connected", "finished",
                                                                                        "lost"}
    for family in families.values():
        assert family.name.startswith("flowcept_")
        for sample in family.samples:
            assert set(sample.labels) <= {"reason", "state", "gpu"}


def test_cli_start_status_stop(tmp_path: Path) -> None:
    directory = str(tmp_path / "cli-rt")
    env = app_env()
    start = subprocess.run([sys.executable, "-m", "flowcept.cli", "daemon", "start", "--runtime-dir", directory,
                            "--no-gpu", "--telemetry-interval", "0.2"], capture_output=True, env=env, timeout=60)
    ready = protocol.read_ready(directory)
    try:
        assert start.returncode == 0, start.stderr.decode()
        assert ready is not None and start.stdout.decode().strip() == ready["address"]
        status = subprocess.run([sys.executable, "-m", "flowcept.cli", "daemon", "status", "--json", "--runtime-dir",
                                 directory], capture_output=True, env=env, timeout=60)
        assert status.returncode == 0, status.stderr.decode()
        data = json.loads(status.stdout)
        for key in ("pid", "address", "output_files", "uptime_s", "clients", "counters", "telemetry"):
            assert key in data
        for key in ("received", "written", "rejected", "spilled", "dropped", "bytes"):
            assert key in data["counters"]
        assert data["pid"] == ready["pid"]
        stop = subprocess.run([sys.executable, "-m", "flowcept.cli", "daemon", "stop", "--runtime-dir", directory],
                              capture_output=True, env=env, timeout=60)
        assert stop.returncode == 0, stop.stderr.decode()
        assert protocol.read_ready(directory) is None
    finally:
        if ready is not None:
            try:
                os.kill(ready["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    gone = subprocess.run([sys.executable, "-m", "flowcept.cli", "daemon", "status", "--runtime-dir", directory],
                          capture_output=True, env=env, timeout=60)
    assert gone.returncode == 1


def test_hdf5_sink_beside_jsonl(start_daemon, buffer_base: str) -> None:
    pytest.importorskip("h5py")
    from flowcept.hdf5_store import read_hdf5

    daemon = start_daemon("--sinks", "jsonl,hdf5")
    run_client(daemon, "wf-h5", 30)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=20) == 0
    [h5] = glob.glob(os.path.join(os.path.dirname(buffer_base), "*_wf-h5_node-*.h5"))
    tasks = [r for r in read_hdf5(h5) if r.get("type") == "task"]
    assert sorted(t["used"]["i"] for t in tasks) == list(range(30))


def test_tcp_needs_curve_keys(start_daemon, buffer_base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    daemon = start_daemon("--tcp-port", str(port), "--tcp-host", "127.0.0.1")
    tcp = daemon.ready["tcp_address"]
    assert tcp == f"tcp://127.0.0.1:{port}"
    curve_dir = os.path.join(daemon.directory, "curve")
    # Without keys: the link refuses tcp://, and a plain socket gets no answer.
    context = zmq.Context()
    plain = context.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(tcp)
    plain.send_multipart(protocol.encode_ping())
    assert not plain.poll(500)
    plain.close()
    context.term()
    daemon.ready = {**daemon.ready, "address": tcp}
    run_client(daemon, "wf-tcp", 20, env={"FLOWCEPT_DAEMON_CURVE_DIR": curve_dir})
    monkeypatch.setenv("FLOWCEPT_DAEMON_CURVE_DIR", curve_dir)  # status over tcp:// needs the keys too
    assert daemon.counters()["written"] == 22
    assert process_files(buffer_base, "wf-tcp") == []
