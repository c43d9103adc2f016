"""``flowcept top`` driven against a real node daemon, output captured; q and Ctrl-C exit cleanly."""

from __future__ import annotations

import io
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import wait_for

pytest.importorskip("zmq")
pytest.importorskip("rich")

DAEMON = r'''
import sys
from flowcept.daemon.server import DaemonConfig, DaemonServer
sys.exit(DaemonServer(DaemonConfig(runtime_dir=sys.argv[1], base_path=sys.argv[2],
                                   telemetry_interval_s=0.2, gpu=False)).serve())
'''

APP = r'''
from flowcept import Flowcept, FlowceptTask
with Flowcept(workflow_name="through-daemon"):
    for i in range(50):
        FlowceptTask(activity_id="work", used={"i": i}).end(generated={"o": i})
'''


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def daemon(flowcept_tmp: Path):
    from flowcept import protocol

    runtime = tempfile.mkdtemp(prefix="fctop", dir="/tmp")  # short: ipc:// paths are limited to 107 bytes
    directory = os.path.join(runtime, "d")
    script = flowcept_tmp / "daemon.py"
    script.write_text(DAEMON)
    proc = subprocess.Popen([sys.executable, str(script), directory, str(flowcept_tmp / "flowcept_buffer.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: protocol.read_ready(directory) is not None or proc.poll() is not None, 30, "daemon ready")
        if proc.poll() is not None:
            pytest.fail(f"daemon exited: {proc.stderr.read().decode()}")
        yield {"dir": directory, "address": protocol.read_ready(directory)["address"], "proc": proc}
    finally:
        _stop(proc)
        shutil.rmtree(runtime, ignore_errors=True)


def run_top_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="160", TERM="dumb")
    return subprocess.run([sys.executable, "-m", "flowcept.cli", "top", *args], env=env, capture_output=True,
                          timeout=timeout)


def test_top_shows_a_real_daemon_with_the_records_it_received(daemon, flowcept_tmp):
    from flowcept.daemon_link import daemon_status

    script = flowcept_tmp / "app.py"
    script.write_text(APP)
    env = dict(os.environ, FLOWCEPT_DAEMON_ADDRESS=daemon["address"])
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    wait_for(lambda: (daemon_status(daemon["address"]) or {}).get("counters", {}).get("received", 0) >= 51,
             20, "daemon received the run's records")
    out = run_top_cli("--runtime-dir", daemon["dir"], "--iterations", "2", "--interval", "0.2")
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert text.count("flowcept top") == 2  # two refreshes printed
    assert "Records/s" in text and "Drops" in text
    node = (daemon_status(daemon["address"]) or {}).get("node")
    assert node and node in text
    row = next(line for line in text.splitlines() if line.strip("│ ").startswith(node))
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert int(cells[5]) >= 51  # records received
    assert cells[1] != "–" or cells[3] != "–"  # CPU or memory from the daemon's node telemetry


def test_top_once_by_address_and_an_unreachable_daemon(daemon, flowcept_tmp):
    missing = f"ipc://{flowcept_tmp}/none.sock"
    out = run_top_cli("--address", daemon["address"], "--address", missing, "--once", "--timeout", "0.3")
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert text.count("flowcept top") == 1 and "2 node daemon(s)" in text
    assert "no answer" in text


def test_model_rates_and_gpu_rows_from_real_status_and_samplers(daemon):
    from fakes.fake_pynvml import FakeGpu, make_nvml
    from rich.console import Console

    from flowcept.daemon_link import daemon_status
    from flowcept.report.top import TopModel, daemon_status_provider, render, run_top
    from flowcept.telemetry.node import NodeSampler

    status = daemon_status(daemon["address"])
    assert status is not None
    nvml = make_nvml([FakeGpu("GPU-33333333-aaaa-bbbb-cccc-000000000000"),
                      FakeGpu("GPU-33333333-aaaa-bbbb-cccc-000000000001")])
    sampler = NodeSampler(gpu=True, nvml=nvml)
    try:
        samples = sampler.sample()
    finally:
        sampler.close()
    first = dict(status, telemetry={"latest": samples}, counters=dict(status["counters"], received=100))
    second = dict(first, counters=dict(status["counters"], received=400, dropped=3))
    model = TopModel()
    rows1 = model.rows([first], now=10.0)
    rows2 = model.rows([second], now=12.0)
    assert rows1["nodes"][0]["rate"] is None and rows2["nodes"][0]["rate"] == pytest.approx(150.0)
    assert rows2["nodes"][0]["dropped"] == 3
    assert [g["gpu"] for g in rows2["gpus"]] == [0, 1]
    console = Console(file=io.StringIO(), width=160, record=True)
    console.print(render(rows2))
    text = console.export_text()
    assert "GPUs" in text and "NVIDIA Fake A100" in text and "150.0" in text
    assert "37.0" in text  # the fake GPU's utilisation
    # run_top with a real provider, printed (not live), bounded by iterations
    out = io.StringIO()
    assert run_top(daemon_status_provider([daemon["address"]]), interval_s=0.05, iterations=3,
                   console=Console(file=out, width=160), live=False) == 0
    assert out.getvalue().count("flowcept top") == 3


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    seen = b""
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {seen[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen


@pytest.mark.parametrize("how", ["q", "sigint"])
def test_interactive_top_exits_cleanly_on_q_and_ctrl_c(daemon, how):
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="120", LINES="40", TERM="xterm")
    proc = subprocess.Popen([sys.executable, "-m", "flowcept.cli", "top", "--runtime-dir", daemon["dir"],
                             "--interval", "0.2"], stdin=slave, stdout=slave, stderr=slave, env=env,
                            close_fds=True)
    os.close(slave)
    try:
        _read_until(master, b"Records/s", 30)
        if how == "q":
            os.write(master, b"q")
        else:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        os.close(master)
