"""The ``flowcept`` command as a user runs it: a real process, a scratch HOME, real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import orjson

from flowcept.version import __version__

APP = """
import sys
from flowcept import Flowcept, FlowceptTask
with Flowcept(workflow_id=sys.argv[1], workflow_name="cli"):
    for i in range(int(sys.argv[2])):
        FlowceptTask(activity_id=sys.argv[3], used={"i": i}, generated={"ok": True})
    FlowceptTask(activity_id="broken", status="ERROR", stderr="boom")
"""


def user_env(tmp_path: Path, **extra: str) -> Dict[str, str]:
    """A user's shell: no FLOWCEPT_* of the test run, a scratch HOME, the buffer in ``tmp_path``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCEPT_")}
    environ.update({"HOME": str(tmp_path / "home"), "FLOWCEPT_PROJECT_DUMP_BUFFER_PATH":
                    str(tmp_path / "flowcept_buffer.jsonl"), "FLOWCEPT_DAEMON_JOBS_DIR": str(tmp_path / "jobs")})
    environ.update(extra)
    return environ


def cli(tmp_path: Path, *args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowcept.cli", *args], cwd=tmp_path,
                          env=user_env(tmp_path, **(env or {})), capture_output=True, text=True, timeout=120)


def run_app(tmp_path: Path, workflow_id: str, n: int, activity: str, **env: str) -> None:
    subprocess.run([sys.executable, "-c", APP, workflow_id, str(n), activity], cwd=tmp_path,
                   env=user_env(tmp_path, **env), check=True, timeout=120)


def test_version(tmp_path):
    out = cli(tmp_path, "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"flowcept, version {__version__}"


def test_settings_init_writes_every_key_once_and_show_reports_what_is_in_effect(tmp_path):
    from flowcept.settings import KEYS, load_settings

    first = cli(tmp_path, "settings", "init")
    written = tmp_path / "home" / ".flowcept" / "settings.yaml"
    assert first.returncode == 0 and str(written) in first.stdout and written.exists()
    settings = load_settings(env={"FLOWCEPT_SETTINGS_PATH": str(written)})
    assert all(settings[key.name] == key.default for key in KEYS)
    again = cli(tmp_path, "settings", "init")
    assert again.returncode != 0 and "--force" in again.stderr
    assert cli(tmp_path, "settings", "init", "--force").returncode == 0

    shown = cli(tmp_path, "settings", "show", "--json", env={"FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_SIZE": "123"})
    assert shown.returncode == 0
    assert orjson.loads(shown.stdout)["project"]["dump_buffer"]["flush_size"] == 123
    text = cli(tmp_path, "settings", "show")
    assert text.returncode == 0 and str(written) in text.stdout and "flush_size: 2000" in text.stdout
    bad = cli(tmp_path, "settings", "show", env={"FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_SIZE": "many"})
    assert bad.returncode != 0 and "project.dump_buffer.flush_size" in bad.stderr


def test_consolidate_merges_a_workflows_files_and_read_summarises_them(tmp_path):
    for _ in range(2):  # two processes of one workflow, each leaving its own file
        run_app(tmp_path, "cliwf", 30, "step", FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP="false")
    run_app(tmp_path, "cliwf_2", 5, "other", FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP="false")
    merged = cli(tmp_path, "consolidate", "--workflow-id", "cliwf")
    assert merged.returncode == 0, merged.stderr
    assert "from 2 file(s)" in merged.stdout
    output = tmp_path / "flowcept_buffer_cliwf.jsonl"
    records = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    assert sum(r["type"] == "task" and r["activity_id"] == "step" for r in records) == 60
    assert all(r["workflow_id"] == "cliwf" for r in records)
    assert any(p.name.startswith("flowcept_buffer_cliwf_2_") for p in tmp_path.iterdir())  # not merged
    assert cli(tmp_path, "consolidate", "-q", "--workflow-id", "cliwf").returncode == 0  # again: same file
    assert [orjson.loads(line) for line in output.read_bytes().splitlines()] == records

    summary = cli(tmp_path, "read", str(output))
    assert summary.returncode == 0, summary.stderr
    assert "cliwf" in summary.stdout and "step" in summary.stdout and "60" in summary.stdout
    lines = cli(tmp_path, "read", str(output), "--records", "--type", "task", "--limit", "5")
    parsed = [orjson.loads(line) for line in lines.stdout.splitlines()]
    assert len(parsed) == 5 and all(r["type"] == "task" for r in parsed)
    missing = cli(tmp_path, "read", str(tmp_path / "nope.jsonl"))
    assert missing.returncode != 0 and "no such file" in missing.stderr
    none = cli(tmp_path, "consolidate", "--workflow-id", "absent")
    assert none.returncode != 0 and "absent" in none.stderr


def test_consolidate_shows_progress_on_a_long_merge(tmp_path):
    """Past 64 MiB of sources the merge shows a progress bar, even when stderr is not a terminal."""
    line = (b'{"type":"task","task_id":"%016x.%d","workflow_id":"big","activity_id":"a","status":"FINISHED",'
            b'"used":{"pad":"' + b"x" * 900 + b'"}}\n')
    for process in range(2):
        with open(tmp_path / f"flowcept_buffer_big_host_{process}.jsonl", "wb") as handle:
            handle.write(b"".join(line % (process + 1, i) for i in range(34_000)))
    out = cli(tmp_path, "consolidate", "--workflow-id", "big", "--keep-files")
    assert out.returncode == 0, out.stderr
    assert "consolidating" in out.stderr and "68000 records" in out.stdout
