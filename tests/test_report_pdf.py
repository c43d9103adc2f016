"""PDF provenance report: opened and checked (pages, plots), rendered to PNG where pdftoppm exists."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flowcept.report import generate_report

HOSTS = 8
RANKS = 64


def synthetic_job(n_tasks: int, ranks: int = RANKS, hosts: int = HOSTS, gpus: int = 2, seconds: int = 30) -> list:
    """A 64-rank job over 8 nodes with node and GPU telemetry (shapes of flowcept.telemetry.node)."""
    rnd = random.Random(3)
    t0 = 1.7e9
    records = [{"type": "workflow", "workflow_id": "wf64", "name": "big", "status": "FINISHED",
                "started_at": t0, "ended_at": t0 + seconds, "world_size": ranks, "user": "alice",
                "hosts": [f"node{h}" for h in range(hosts)], "job_id": "777", "step_id": "0"}]
    clock = [t0] * ranks
    activities = ["load", "compute", "exchange", "checkpoint"]
    for i in range(n_tasks):
        rank = i % ranks
        activity = activities[(i // ranks) % 4]
        duration = rnd.expovariate(1 / (seconds * ranks * 0.6 / n_tasks))
        start = clock[rank]
        clock[rank] = start + duration * 1.1
        task = {"type": "task", "task_id": f"t{i}", "workflow_id": "wf64", "activity_id": activity,
                "started_at": start, "ended_at": start + duration, "status": "FINISHED",
                "hostname": f"node{rank % hosts}", "rank": rank, "pid": 100 + rank, "job_id": "777"}
        if i % 997 == 5:
            task.update(status="ERROR", stderr="RuntimeError: NaN in residual")
        records.append(task)
    for k in range(seconds):
        for h in range(hosts):
            records.append({"type": "telemetry", "telemetry_id": f"n{h}.{k}", "kind": "node", "hostname": f"node{h}",
                            "timestamp": t0 + k, "cpu_percent": rnd.uniform(20, 95),
                            "memory_used_bytes": (10 + h) * 2**30, "memory_percent": 40.0})
            for g in range(gpus):
                records.append({"type": "telemetry", "telemetry_id": f"g{h}.{g}.{k}", "kind": "gpu",
                                "hostname": f"node{h}", "gpu_index": g, "timestamp": t0 + k,
                                "gpu_utilization_percent": rnd.uniform(0, 100),
                                "gpu_memory_used_bytes": rnd.uniform(1, 30) * 2**30,
                                "gpu_power_watts": rnd.uniform(80, 400)})
    return records


def pdf_pages(path: Path) -> int:
    return len(re.findall(rb"/Type\s*/Page\b", path.read_bytes()))


def png_ink(png: Path) -> float:
    """Fraction of pixels that are not white."""
    from PIL import Image

    image = Image.open(png).convert("L")
    hist = image.histogram()
    return 1.0 - sum(hist[250:]) / float(sum(hist))


needs_pdftoppm = pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="pdftoppm (poppler-utils) not installed")


def test_pdf_of_a_64_rank_job_has_every_plot(flowcept_tmp):
    result = generate_report("provenance_report", "pdf", records=synthetic_job(20000), output_path="job.pdf")
    path = Path(result["output_path"])
    assert result["input_mode"] == "records" and result["format"] == "pdf"
    assert path.read_bytes().startswith(b"%PDF")
    # card text (1-2 pages) + timeline + durations + node + GPU
    assert result["pages"] == pdf_pages(path) >= 5
    data = path.read_bytes()
    assert b"/Subtype /Image" in data  # the binned timeline (20,000 tasks never become 20,000 bars)
    assert len(data) < 3_000_000


def test_pdf_small_job_draws_bars_and_stays_small(flowcept_tmp):
    result = generate_report("provenance_report", "pdf", records=synthetic_job(300, gpus=0), output_path="s.pdf")
    path = Path(result["output_path"])
    assert result["pages"] == pdf_pages(path) >= 4  # no GPU page
    assert b"/Subtype /Image" not in path.read_bytes()  # a real Gantt of 300 bars


@needs_pdftoppm
def test_pdf_pages_render_to_non_blank_png(flowcept_tmp):
    result = generate_report("provenance_report", "pdf", records=synthetic_job(5000), output_path="r.pdf")
    pages = result["pages"]
    proc = subprocess.run(["pdftoppm", "-r", "40", "-png", "r.pdf", "page"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(flowcept_tmp.glob("page-*.png"))
    assert len(pngs) == pages
    inks = [png_ink(p) for p in pngs]
    assert all(ink > 0.005 for ink in inks), inks
    assert max(inks[-4:]) > 0.05  # plots carry real ink, not just a title


def test_pdf_of_a_real_run(flowcept_tmp):
    script = flowcept_tmp / "app.py"
    script.write_text(
        "from flowcept import Flowcept, FlowceptTask, FlowceptLoop\n"
        "with Flowcept(workflow_name='real') as f:\n"
        "    for i in FlowceptLoop(range(20), loop_name='steps'):\n"
        "        with FlowceptTask(activity_id='work', used={'i': i}) as t:\n"
        "            t.end(generated={'sq': i * i})\n"
        "print(f.current_workflow_id)\n")
    env = dict(os.environ, FLOWCEPT_PROJECT_DUMP_BUFFER_PATH=str(flowcept_tmp / "flowcept_buffer.jsonl"))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    wid = proc.stdout.decode().split()[-1]
    result = generate_report("provenance_report", "pdf", workflow_id=wid)
    assert result["input_mode"] == "db" and result["tasks"] == 41
    assert result["output_path"] == str(flowcept_tmp / "PROVENANCE_REPORT.pdf")
    assert pdf_pages(Path(result["output_path"])) == result["pages"] >= 3  # text, timeline, durations


def test_pdf_with_no_tasks_is_the_card_only(flowcept_tmp):
    result = generate_report("provenance_report", "pdf", records=[{"type": "workflow", "workflow_id": "w"}],
                             output_path="empty.pdf")
    assert result["pages"] == 1 == pdf_pages(Path("empty.pdf"))


def test_failed_pdf_leaves_no_partial_file(flowcept_tmp):
    (flowcept_tmp / "out.pdf").mkdir()  # the final rename cannot replace a directory
    with pytest.raises(OSError):
        generate_report("provenance_report", "pdf", records=synthetic_job(10), output_path="out.pdf")
    assert sorted(p.name for p in flowcept_tmp.iterdir()) == ["out.pdf"]


def test_pdf_of_200_ranks_on_20_nodes_groups_lanes_and_uses_heatmaps(flowcept_tmp):
    records = synthetic_job(4000, ranks=200, hosts=20, gpus=1, seconds=20)
    result = generate_report("provenance_report", "pdf", records=records, output_path="wide.pdf")
    data = Path("wide.pdf").read_bytes()
    assert result["pages"] == pdf_pages(Path("wide.pdf")) >= 5
    # timeline image (200 ranks > 64 rows) plus node and GPU heatmaps (20 > 12 series)
    assert len(re.findall(rb"/Subtype\s*/Image", data)) >= 4
