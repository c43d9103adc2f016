"""A full disk under a running application: nothing raised into it, nothing lost, nothing doubled.

The output directory is a real 4 MiB tmpfs filled up to a few KiB before the run, so the
process file's writes fail part-way (ENOSPC) while the application keeps capturing; the test
then frees space and every task ends up in the consolidated file exactly once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import app_env, read_lines, wait_for
from test_daemon import CLIENT, consolidated_numbers, start_daemon  # noqa: F401  (fixture)

APP = str(Path(__file__).parent / "apps" / "disk_full_app.py")


@pytest.fixture
def small_disk(tmp_path: Path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "flowcept-test", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(directory: Path, leave: int) -> Path:
    """Fill ``directory``'s filesystem until ``leave`` bytes are free; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                free = shutil.disk_usage(directory).free
                if free <= leave:
                    break
                handle.write(b"\0" * min(65536, free - leave))
                handle.flush()
        except OSError:
            pass
    return filler


def test_disk_full_mid_run_loses_and_doubles_nothing(small_disk: Path, tmp_path: Path) -> None:
    handshake = tmp_path / "handshake"
    handshake.mkdir()
    filler = _fill(small_disk, leave=8192)
    env = app_env({"FLOWCEPT_PROJECT_DUMP_BUFFER_PATH": str(small_disk / "flowcept_buffer.jsonl"),
                   "FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_SIZE": "100"})
    app = subprocess.Popen([sys.executable, APP, str(handshake), "300"], env=env, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (handshake / "ready").exists() or app.poll() is not None, 60, "the app's first tasks")
        assert app.poll() is None, app.communicate()
        # ~100 KB of tasks did not fit in 8 KiB: the process file holds whole lines only
        [process_file] = [p for p in small_disk.iterdir() if p.name.startswith("flowcept_buffer_")]
        data = process_file.read_bytes()
        assert not data or data.endswith(b"\n")
        filler.unlink()  # space again: the kept batches go out on the next write
        stdout, stderr = app.communicate("go\n", timeout=60)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait(timeout=10)
    assert app.returncode == 0, stderr
    assert "disk full" in stderr
    workflow_id = stdout.strip().splitlines()[-1]
    records = read_lines(str(small_disk / f"flowcept_buffer_{workflow_id}.jsonl"))
    tasks = [r for r in records if r["type"] == "task"]
    assert len({r["task_id"] for r in tasks}) == len(tasks) == 600
    for activity in ("before", "after"):
        assert sorted(r["used"]["i"] for r in tasks if r["activity_id"] == activity) == list(range(300))


def test_daemon_on_a_full_disk_nacks_and_the_rank_keeps_every_record(small_disk: Path, tmp_path: Path,
                                                                     start_daemon) -> None:  # noqa: F811
    """The node daemon's file fills up mid-batch: the batch is taken back and nacked, the rank keeps
    it (its own file is on the same full disk), and after space returns every task is there once."""
    pytest.importorskip("zmq")
    handshake = tmp_path / "handshake"
    handshake.mkdir()
    daemon = start_daemon("--base-path", str(small_disk / "flowcept_buffer.jsonl"), "--no-telemetry")
    filler = _fill(small_disk, leave=16384)
    env = app_env({"FLOWCEPT_PROJECT_DUMP_BUFFER_PATH": str(small_disk / "flowcept_buffer.jsonl"),
                   "FLOWCEPT_DAEMON_ADDRESS": daemon.address, "FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_SIZE": "100"})
    client = subprocess.Popen([sys.executable, CLIENT, "wf-disk-full", "2000", "1000", str(handshake / "paused"),
                               str(handshake / "resume")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (handshake / "paused").exists() or client.poll() is not None, 60, "the rank to pause")
        assert client.poll() is None, client.communicate()
        assert daemon.counters()["spilled"] > 0  # the daemon could not write: it nacked
        filler.unlink()
        (handshake / "resume").write_text("")
        stdout, stderr = client.communicate(timeout=90)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=10)
    assert client.returncode == 0, stderr
    daemon.process.terminate()  # drains, flushes, closes its node file
    daemon.process.wait(timeout=30)
    assert consolidated_numbers(str(small_disk / "flowcept_buffer.jsonl"), "wf-disk-full") == list(range(2000))
