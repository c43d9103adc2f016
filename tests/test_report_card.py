"""Provenance card: real runs of the library (single workflow, campaign, failures, loops), telemetry,
input modes, errors and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

import flowcept
from flowcept.report import generate_report

RUN = r'''
import sys
from flowcept import Flowcept, FlowceptTask, flowcept_task, FlowceptLoop

name, campaign = sys.argv[1], sys.argv[2]

@flowcept_task
def solve(a, b=2):
    return a * b

with Flowcept(workflow_name=name, campaign_id=campaign, workflow_args={"seed": 7}) as f:
    with FlowceptTask(activity_id="prepare", used={"path": "/data/in.h5", "n": 10}) as outer:
        with FlowceptTask(activity_id="read_chunk", used={"chunk": 0}) as inner:
            inner.end(generated={"rows": 100})
        outer.end(generated={"energy": -1.25})
    solve(3)
    for x in FlowceptLoop(range(4), loop_name="epochs", item_name="epoch"):
        solve(x)
    try:
        with FlowceptTask(activity_id="diverge", used={"dt": 0.5}):
            raise FloatingPointError("step size too large")
    except FloatingPointError:
        pass
print(f.current_workflow_id)
'''


def run_workflow(tmp: Path, name: str = "sim", campaign: str = "camp-1") -> tuple:
    """Run the real library in a child process; returns (workflow_id, consolidated JSONL path)."""
    script = tmp / "run_workflow.py"
    script.write_text(RUN)
    env = dict(os.environ, FLOWCEPT_PROJECT_DUMP_BUFFER_PATH=str(tmp / "flowcept_buffer.jsonl"))
    env.pop("FLOWCEPT_DAEMON_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(script), name, campaign], env=env, capture_output=True,
                          timeout=60, cwd=tmp)
    assert proc.returncode == 0, proc.stderr.decode()
    wid = proc.stdout.decode().strip().splitlines()[-1]
    path = tmp / f"flowcept_buffer_{wid}.jsonl"
    assert path.exists(), list(tmp.iterdir())
    return wid, path


@pytest.fixture
def one_run(flowcept_tmp: Path) -> tuple:
    return run_workflow(flowcept_tmp)


def read(path: Path) -> list:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def test_card_of_a_real_workflow(one_run, flowcept_tmp):
    wid, path = one_run
    result = generate_report(input_jsonl_path=str(path), output_path=str(flowcept_tmp / "card.md"))
    assert result["input_mode"] == "jsonl"
    assert result["report_type"] == "provenance_card" and result["format"] == "markdown"
    assert result["output_path"] == str(flowcept_tmp / "card.md")
    assert result["tasks"] == 13 and result["workflows"] == 1 and result["failed_tasks"] == 1
    card = Path(result["output_path"]).read_text()
    assert card.startswith("# Provenance Card: sim")
    assert wid in card and "camp-1" in card
    # identity, placement, activities, loops, failures, inputs/outputs
    for heading in ("## Workflow", "## Where it ran", "## Tasks", "## Activities", "## Loops",
                    "## Slowest tasks", "## Failed tasks", "## Inputs and outputs"):
        assert heading in card, heading
    assert "| solve | – | 5 | 0 |" in card  # 1 direct call + 4 inside the loop
    assert "| epochs | loop | 1 |" in card and "| epochs_iteration | iteration | 4 |" in card
    assert "FloatingPointError: step size too large" in card
    assert "Nested tasks (with a parent) | 1" in card  # read_chunk inside prepare
    assert "Intel" in card or "RAM" in card  # machine facts
    assert 'path=/data/in.h5' in card and "energy=-1.25" in card
    assert "FINISHED with 1 failed task(s)" in card
    assert "seed" in card  # workflow arguments


def test_card_of_a_campaign_of_two_workflows(flowcept_tmp):
    wid1, path1 = run_workflow(flowcept_tmp, "first", "camp-9")
    wid2, path2 = run_workflow(flowcept_tmp, "second", "camp-9")
    records = read(path1) + read(path2)
    result = generate_report(records=records, output_path="campaign.md")
    assert result["input_mode"] == "records" and result["workflows"] == 2
    card = Path(result["output_path"]).read_text()
    assert card.startswith("# Provenance Card: campaign camp-9")
    assert "## Campaign: 2 workflows" in card
    assert f"| first | {wid1} | FINISHED | 13 | 1 |" in card
    assert f"| second | {wid2} | FINISHED | 13 | 1 |" in card
    assert "| solve | – | 10 | 0 |" in card


def test_db_mode_by_workflow_id_and_campaign_id(flowcept_tmp):
    wid1, _ = run_workflow(flowcept_tmp, "first", "camp-db")
    wid2, _ = run_workflow(flowcept_tmp, "second", "camp-db")
    by_wf = generate_report(workflow_id=wid1, output_path="wf.md")
    assert by_wf["input_mode"] == "db" and by_wf["tasks"] == 13 and by_wf["workflows"] == 1
    assert wid1 in Path("wf.md").read_text() and wid2 not in Path("wf.md").read_text()
    by_campaign = generate_report(campaign_id="camp-db", output_path="camp.md")
    assert by_campaign["input_mode"] == "db" and by_campaign["workflows"] == 2 and by_campaign["tasks"] == 26
    text = Path("camp.md").read_text()
    assert wid1 in text and wid2 in text


def test_default_output_path_alias_and_public_entry_points(one_run, flowcept_tmp):
    _, path = one_run
    result = flowcept.Flowcept.generate_report(report_type="workflow_card", input_jsonl_path=str(path))
    assert result["output_path"] == str(flowcept_tmp / "PROVENANCE_CARD.md")
    assert result["report_type"] == "provenance_card"
    assert (flowcept_tmp / "PROVENANCE_CARD.md").read_text().startswith("# Provenance Card")
    again = flowcept.generate_report(records=read(path), output_path=str(flowcept_tmp / "sub" / "c.md"))
    assert Path(again["output_path"]).exists()


def test_print_markdown_renders_with_rich(one_run, capsys):
    _, path = one_run
    generate_report(input_jsonl_path=str(path), print_markdown=True, output_path="c.md")
    out = capsys.readouterr().out
    assert "Provenance Card: sim" in out and "FloatingPointError" in out


def test_print_markdown_without_rich_is_module_not_found(one_run, monkeypatch):
    _, path = one_run
    monkeypatch.setitem(sys.modules, "rich.console", None)  # what an environment without rich gives
    with pytest.raises(ModuleNotFoundError, match="rich"):
        generate_report(input_jsonl_path=str(path), print_markdown=True, output_path="c.md")
    assert not Path("c.md").exists()


@pytest.mark.parametrize("kwargs", [
    {},
    {"records": [], "input_jsonl_path": "x.jsonl"},
    {"records": [], "workflow_id": "w"},
    {"input_jsonl_path": "x.jsonl", "campaign_id": "c"},
])
def test_input_selection_errors(kwargs):
    with pytest.raises(ValueError, match="exactly one"):
        generate_report(**kwargs)


@pytest.mark.parametrize("report_type,fmt", [
    ("provenance_card", "pdf"), ("provenance_report", "markdown"), ("workflow_card", "pdf"),
    ("nonsense", "markdown"), ("provenance_card", "html"),
])
def test_type_format_errors(report_type, fmt):
    with pytest.raises(ValueError):
        generate_report(report_type=report_type, format=fmt, records=[])


def test_missing_input_file(flowcept_tmp):
    with pytest.raises(FileNotFoundError):
        generate_report(input_jsonl_path=str(flowcept_tmp / "nope.jsonl"))


def test_card_with_node_gpu_and_process_telemetry_from_the_samplers(flowcept_tmp):
    from fakes.fake_pynvml import FakeGpu, make_nvml

    from flowcept.telemetry.node import NodeSampler

    nvml = make_nvml([FakeGpu("GPU-11111111-aaaa-bbbb-cccc-000000000000"),
                      FakeGpu("GPU-11111111-aaaa-bbbb-cccc-000000000001")])
    sampler = NodeSampler(gpu=True, pids_provider=lambda: {os.getpid(): 0}, nvml=nvml)
    try:
        samples = [r for _ in range(3) for r in sampler.sample()]
    finally:
        sampler.close()
    kinds = {r["kind"] for r in samples}
    assert kinds == {"node", "process", "gpu"}
    tasks = [{"type": "task", "task_id": f"t{i}", "workflow_id": "w", "activity_id": "a", "status": "FINISHED",
              "started_at": samples[0]["timestamp"] + i, "ended_at": samples[0]["timestamp"] + i + 0.5,
              "hostname": samples[0]["hostname"], "rank": 0} for i in range(3)]
    result = generate_report(records=tasks + samples, output_path="tele.md")
    assert result["telemetry_records"] == len(samples)
    card = Path("tele.md").read_text()
    assert "## Resource usage per node" in card and "## Resource usage per GPU" in card
    assert "## Resource usage per process" in card
    assert "/gpu0" in card and "/gpu1" in card
    assert "| 3 |" in card  # samples per node and per GPU


def test_card_with_task_telemetry_only():
    tasks = [{"type": "task", "task_id": f"t{i}", "workflow_id": "w", "activity_id": "a", "status": "FINISHED",
              "started_at": 1.0 + i, "ended_at": 1.5 + i, "hostname": "n1",
              "telemetry_at_end": {"cpu": {"cpu_percent": 40.0 + i},
                                   "memory": {"memory_used_bytes": 2**30 * (i + 1)},
                                   "process": {"process_rss_bytes": 2**20}}} for i in range(3)]
    generate_report(records=tasks, output_path="tt.md")
    card = Path("tt.md").read_text()
    assert "Resource usage per node (from task telemetry)" in card
    assert "| n1 | 3 | 41.0 % | 3.0 GiB | 1.0 MiB |" in card


def test_torn_last_line_and_foreign_records_are_tolerated(one_run, flowcept_tmp):
    _, path = one_run
    torn = flowcept_tmp / "torn.jsonl"
    torn.write_bytes(path.read_bytes() + b'{"type":"object","object_id":"o1"}\n{"type":"task","task_id":"x", "act')
    result = generate_report(input_jsonl_path=str(torn), output_path="torn.md")
    assert result["tasks"] == 13 and result["records"] == 15


def test_cli_report_card_and_pdf(one_run, flowcept_tmp):
    from flowcept.cli import main

    _, path = one_run
    runner = CliRunner()
    out = runner.invoke(main, ["report", "--input", str(path), "-o", "cli.md"])
    assert out.exit_code == 0, out.output
    assert "provenance_card written to" in out.output and Path("cli.md").exists()
    out = runner.invoke(main, ["report", "--input", str(path), "--format", "pdf"])
    assert out.exit_code == 0, out.output
    assert (flowcept_tmp / "PROVENANCE_REPORT.pdf").read_bytes().startswith(b"%PDF")
    out = runner.invoke(main, ["report", "--type", "provenance_card", "--format", "pdf", "--input", str(path)])
    assert out.exit_code != 0 and "supports only format 'markdown'" in out.output
    out = runner.invoke(main, ["report", "--input", "missing.jsonl"])
    assert out.exit_code != 0 and "not found" in out.output
