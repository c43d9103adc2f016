"""Consolidation: virtual nodes, srun-style ranks without MPI, duplicates, torn lines, exact ids."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import orjson
import pytest

from flowcept.consolidation import SeenIds, consolidate, consolidated_path, read_records

APP = Path(__file__).parent / "mpi_apps" / "plain_app.py"


def _task(task_id: str, workflow_id: str, **extra: object) -> dict:
    record = {"type": "task", "task_id": task_id, "workflow_id": workflow_id, "activity_id": "a",
              "started_at": extra.pop("started_at", 1.0), "rank": 0}
    record.update(extra)
    return record


def _write(path: Path, records: List[dict], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + tail)


def _run_ranks(tmp: Path, nodes: int, per_node: int) -> List[dict]:
    """Start nodes*per_node plain processes as one Slurm step (no MPI), on virtual nodes."""
    size = nodes * per_node
    procs = []
    for rank in range(size):
        node = f"vnode{rank // per_node}"
        env: Dict[str, str] = dict(os.environ)
        env.update({"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
                    "SLURM_NTASKS": str(size), "SLURM_LOCALID": str(rank % per_node),
                    "FLOWCEPT_HOSTNAME": node, "FLOWCEPT_NODE_NAME": node, "FLOWCEPT_MPI": "0",
                    "FLOWCEPT_PROJECT_DUMP_BUFFER_PATH": str(tmp / "flowcept_buffer.jsonl")})
        procs.append(subprocess.Popen([sys.executable, str(APP), str(tmp), "4"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return [orjson.loads((tmp / f"rank{r}.json").read_bytes()) for r in range(size)]


@pytest.mark.parametrize("nodes,per_node", [(1, 4), (4, 4)], ids=["srun-4-ranks", "4-nodes-x-4-ranks"])
def test_ranks_without_mpi_agree_and_merge(flowcept_tmp: Path, nodes: int, per_node: int) -> None:
    results = _run_ranks(flowcept_tmp, nodes, per_node)
    workflow_ids = {r["workflow_id"] for r in results}
    assert len(workflow_ids) == 1, "ranks of one job step must agree on the workflow id"
    assert len({r["campaign_id"] for r in results}) == 1
    assert all(r["output_path"] is None for r in results)  # no MPI: nobody can wait for all ranks
    workflow_id = workflow_ids.pop()
    sources = list(flowcept_tmp.glob(f"flowcept_buffer_{workflow_id}_*.jsonl"))
    assert {p.name.split("_")[3] for p in sources} == {f"vnode{n}" for n in range(nodes)}
    report = consolidate(str(flowcept_tmp / "flowcept_buffer.jsonl"), workflow_id)
    records = read_records(report.output_path)
    tasks = [r for r in records if r["type"] == "task"]
    assert sorted(t["task_id"] for t in tasks) == sorted(i for r in results for i in r["task_ids"])
    assert {t["hostname"] for t in tasks} == {f"vnode{n}" for n in range(nodes)}
    assert {(t["node_name"], t["rank"]) for t in tasks} == {(f"vnode{r // per_node}", r)
                                                            for r in range(nodes * per_node)}
    assert [r["type"] for r in records].count("workflow") == 1
    assert report.removed and not report.kept_live


def test_duplicates_torn_lines_and_prefix_sharing_ids(flowcept_tmp: Path) -> None:
    base = flowcept_tmp / "flowcept_buffer.jsonl"
    wf, other = "wf1", "wf1_b"  # `other` shares wf1's prefix: its files must stay out
    _write(flowcept_tmp / "flowcept_buffer_wf1_h1_1.jsonl",
           [_task(f"00000000000000aa.{i}", wf) for i in range(1, 101)]
           + [{"type": "workflow", "workflow_id": wf, "name": "x", "started_at": 1.0, "utc_timestamp": 1.0}],
           tail=b'{"type":"task","task_id":"00000000000000aa.999","workf')  # torn by a kill
    # The daemon file of the node holds half of them again (spilled batches) and a user id twice.
    _write(flowcept_tmp / "flowcept_buffer_wf1_node-h1.jsonl",
           [_task(f"00000000000000aa.{i}", wf) for i in range(50, 151)]
           + [_task("user-task", wf), _task("user-task", wf), {"type": "telemetry", "workflow_id": wf,
                                                               "node_name": "h1", "timestamp": 2.0}]
           + [{"type": "workflow", "workflow_id": wf, "status": "FINISHED", "ended_at": 9.0,
               "utc_timestamp": 9.0}])
    (flowcept_tmp / "flowcept_buffer_wf1_node-h2.jsonl").write_bytes(
        orjson.dumps(_task("00000000000000bb.1", wf)) + b"\nnot json at all\n"
        + orjson.dumps(_task("00000000000000bb.2", wf)) + b"\n")
    _write(flowcept_tmp / "flowcept_buffer_wf1_b_h1_2.jsonl", [_task("00000000000000cc.1", other)])

    report = consolidate(str(base), wf)
    records = read_records(report.output_path)
    ids = [r.get("task_id") for r in records if r["type"] == "task"]
    assert len(ids) == len(set(ids)) == 150 + 1 + 2
    assert "00000000000000cc.1" not in ids
    assert report.duplicates == 51 + 1
    assert sorted(n for _, n in report.bad_lines) == [2, 102]
    assert any(p.endswith("node-h2.jsonl") for p, _ in report.bad_lines)
    workflow = records[-1]
    assert workflow["type"] == "workflow" and workflow["name"] == "x" and workflow["status"] == "FINISHED"
    assert (flowcept_tmp / "flowcept_buffer_wf1_b_h1_2.jsonl").exists()
    assert [p.name for p in flowcept_tmp.glob("flowcept_buffer_wf1_*")] == ["flowcept_buffer_wf1_b_h1_2.jsonl"]
    assert not list(flowcept_tmp.glob("*.tmp"))

    # Idempotent: a second run (its output is now the only source) gives the same file.
    first = Path(report.output_path).read_bytes()
    again = consolidate(str(base), wf)
    assert Path(again.output_path).read_bytes() == first
    assert again.duplicates == 0


@pytest.mark.parametrize("fmt", ["jsonl", "hdf5"])
def test_idempotent_and_ordered_by_time(flowcept_tmp: Path, fmt: str) -> None:
    if fmt == "hdf5":
        pytest.importorskip("h5py")
    base = str(flowcept_tmp / "flowcept_buffer.jsonl")
    _write(flowcept_tmp / "flowcept_buffer_w_h_1.jsonl",
           [_task(f"0000000000000001.{i}", "w", started_at=100.0 - i) for i in range(1, 6)])
    _write(flowcept_tmp / "flowcept_buffer_w_h_2.jsonl",
           [_task(f"0000000000000002.{i}", "w", started_at=50.0 + i) for i in range(1, 6)]
           + [{"type": "workflow", "workflow_id": "w", "started_at": 0.5}])
    seen: List[int] = []
    total = sum(p.stat().st_size for p in flowcept_tmp.glob("flowcept_buffer_w_*.jsonl"))
    report = consolidate(base, "w", output_format=fmt, order_by_time=True, progress=seen.append)
    assert sum(seen) == total
    records = read_records(report.output_path)
    starts = [r["started_at"] for r in records if r["type"] == "task"]
    assert starts == sorted(starts) and len(starts) == 10
    assert records[-1]["type"] == "workflow"
    again = consolidate(base, "w", output_format=fmt, order_by_time=True)
    assert read_records(again.output_path) == records
    assert again.output_path == consolidated_path(base, "w", fmt)


def test_seen_ids_cost_about_one_byte_per_record() -> None:
    seen = SeenIds()
    prefixes = tuple(f"{p:016x}".encode() for p in range(4))
    for prefix in prefixes:
        counters = tuple(str(i).encode() for i in range(1, 50001))
        assert seen.add_block((b"task",) * len(counters), (prefix,) * len(counters), counters) is None
    assert seen.memory_bytes() < 4 * 50000 * 2.1  # arrays grow by doubling
    keep = seen.add_block((b"task",) * 3, (prefixes[0],) * 3, (b"7", b"60000", b"60000"))
    assert keep == [False, True, False]
    assert seen.add_key(b"t" + prefixes[1] + b".8") is False
    assert seen.add_key(b"tuser-id") is True and seen.add_key(b"tuser-id") is False


def _own_file(directory: Path, tasks: int) -> Path:
    """A per-process file as one process writes it: the padded start line, then its tasks."""
    from flowcept.consolidation import workflow_start_line

    path = directory / "flowcept_buffer_wfk_h_1.jsonl"
    lines = [workflow_start_line({"type": "workflow", "workflow_id": "wfk", "name": "k"})]
    lines += [orjson.dumps({"type": "task", "task_id": f"00000000000000aa.{i}", "workflow_id": "wfk"}) + b"\n"
              for i in range(tasks)]
    path.write_bytes(b"".join(lines))
    return path


def test_a_file_its_writer_vouches_for_is_not_read_back(flowcept_tmp: Path) -> None:
    path = _own_file(flowcept_tmp, 5)
    report = consolidate(str(flowcept_tmp / "flowcept_buffer.jsonl"), "wfk", known_files={
        str(path): (path.stat().st_size, 6)}, workflow_update={"type": "workflow", "workflow_id": "wfk",
                                                               "status": "FINISHED"})
    assert report.records_in == report.records_out == 6 and not path.exists()
    records = read_records(report.output_path)
    assert records[0]["status"] == "FINISHED" and len(records) == 6


def test_a_vouched_file_that_changed_since_is_read_back(flowcept_tmp: Path) -> None:
    """Someone appended a torn line after the writer's count: the size differs, the scan runs."""
    path = _own_file(flowcept_tmp, 5)
    size = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(b'{"type":"task","task_id":"00000000000000aa.9","workf')
    report = consolidate(str(flowcept_tmp / "flowcept_buffer.jsonl"), "wfk", known_files={str(path): (size, 6)})
    records = read_records(report.output_path)
    assert [r["task_id"] for r in records if r["type"] == "task"] == [f"00000000000000aa.{i}" for i in range(5)]
    assert len(report.bad_lines) == 1  # the torn line, found because the file was read


def test_transport_vouches_only_for_what_it_wrote(tmp_path: Path) -> None:
    from flowcept.transport import FileTransport

    transport = FileTransport(str(tmp_path / "flowcept_buffer.jsonl"), "h")
    transport.send("w1", b'{"a":1}\n{"a":2}\n', 2)
    path, size, lines = transport.written("w1")
    assert (size, lines) == (os.path.getsize(path), 2)
    Path(transport.path_for("w2")).write_bytes(b'{"old":1}\n')  # there before this writer
    transport.send("w2", b'{"a":3}\n', 1)
    assert transport.written("w2") is None
    transport.close()


def test_a_file_its_content_does_not_attribute_is_neither_merged_nor_removed(flowcept_tmp: Path) -> None:
    """``exp_3_vm_3`` reads as a process of ``exp`` (host ``3_vm``) or of ``exp_3`` (host ``vm``).

    Its only line is torn, so nothing in it says whose it is: consolidating ``exp`` must leave it
    (and ``exp_2``'s file) alone and say so in the report.
    """
    base = str(flowcept_tmp / "flowcept_buffer.jsonl")
    _write(flowcept_tmp / "flowcept_buffer_exp_vm_1.jsonl", [_task("a1", "exp"), _task("a2", "exp")])
    _write(flowcept_tmp / "flowcept_buffer_exp_2_vm_2.jsonl",
           [{"type": "telemetry", "timestamp": 1.0}, _task("b1", "exp_2")])
    ambiguous = flowcept_tmp / "flowcept_buffer_exp_3_vm_3.jsonl"
    _write(ambiguous, [], tail=b'{"type":"task","task_id":"c1","workflow_id":"exp_3"')
    _write(flowcept_tmp / "flowcept_buffer_exp_vm_4.jsonl", [_task("a1", "exp"), _task("a3", "exp")])
    # exp's own process killed during its first write: the name is exp's alone, the content is nothing.
    own_torn = flowcept_tmp / "flowcept_buffer_exp_vm_5.jsonl"
    _write(own_torn, [], tail=b'{"type":"task","task_id":"a9","wor')
    empty = flowcept_tmp / "flowcept_buffer_exp_node-n1.jsonl"
    empty.write_bytes(b"")

    report = consolidate(base, "exp")
    records = read_records(report.output_path)
    assert sorted(r["task_id"] for r in records) == ["a1", "a2", "a3"]
    assert all(r["workflow_id"] == "exp" for r in records)
    assert sorted(Path(p).name for p in report.sources) == ["flowcept_buffer_exp_vm_1.jsonl",
                                                           "flowcept_buffer_exp_vm_4.jsonl"]
    reasons = dict(report.skipped)
    assert set(reasons) == {str(ambiguous), str(own_torn), str(empty)}
    assert "'exp_3'" in reasons[str(ambiguous)] and "left in place" in reasons[str(ambiguous)]
    assert "only this workflow's" in reasons[str(own_torn)]
    assert reasons[str(empty)].startswith("empty")
    assert not report.bad_lines  # the torn lines belong to files that were not merged
    assert sorted(p.name for p in flowcept_tmp.glob("flowcept_buffer_*")) == [
        "flowcept_buffer_exp.jsonl", "flowcept_buffer_exp_2_vm_2.jsonl", "flowcept_buffer_exp_3_vm_3.jsonl",
        "flowcept_buffer_exp_node-n1.jsonl", "flowcept_buffer_exp_vm_5.jsonl"]
    assert ambiguous.read_bytes().endswith(b'"workflow_id":"exp_3"')

    # Once a complete record of exp_3 precedes the torn line, the file is exp_3's: exp leaves it
    # out without a word, and exp_3 merges it (the torn line reported) and removes it.
    _write(ambiguous, [_task("c2", "exp_3")], tail=b'{"type":"task","task_id":"c1","workflow_id":"exp_3"')
    again = consolidate(base, "exp")
    assert {p for p, _ in again.skipped} == {str(own_torn), str(empty)} and ambiguous.exists()
    other = consolidate(base, "exp_3")
    assert [r["task_id"] for r in read_records(other.output_path)] == ["c2"]
    assert other.bad_lines == [(str(ambiguous), 2)] and not ambiguous.exists()


def test_content_decides_even_after_records_without_a_workflow_id(flowcept_tmp: Path) -> None:
    """A node file that starts with untagged telemetry is still a source once a record names W."""
    from flowcept.consolidation import find_sources

    path = flowcept_tmp / "flowcept_buffer_w_node-n1.jsonl"
    _write(path, [{"type": "telemetry", "timestamp": 1.0}, _task("t1", "w")])
    untagged = flowcept_tmp / "flowcept_buffer_w_node-n2.jsonl"
    _write(untagged, [{"type": "telemetry", "timestamp": 1.0}])
    skipped: List[tuple] = []
    assert find_sources(str(flowcept_tmp / "flowcept_buffer.jsonl"), "w", skipped=skipped) == [str(path)]
    assert [p for p, _ in skipped] == [str(untagged)]
    # Without a record of W anywhere, the error says files were left unattributed.
    path.unlink()
    with pytest.raises(FileNotFoundError, match="hold no record of it"):
        consolidate(str(flowcept_tmp / "flowcept_buffer.jsonl"), "w")
    assert untagged.exists()


@pytest.mark.parametrize("tail,readings", [
    ("vm_1", [""]), ("node-h1", [""]), ("node-a_1", [""]), ("3_vm_3", ["", "_3"]),
    ("vm_12_1", ["", "_vm"]), ("a_node-h1", ["_a"]), ("x", []), ("a_b_c_1", ["", "_a", "_a_b"])])
def test_name_readings(tail: str, readings: List[str]) -> None:
    from flowcept.consolidation import name_readings

    assert name_readings(tail) == readings


@pytest.mark.parametrize("output_format", ["jsonl", "hdf5"])
def test_a_source_that_grew_after_it_was_read_is_kept(tmp_path, output_format):
    """Cleanup removes a source only if it still holds exactly what was merged: a writer may append
    after the read and close (releasing its lock) before cleanup runs."""
    if output_format == "hdf5":
        pytest.importorskip("h5py")
    base = str(tmp_path / "flowcept_buffer.jsonl")
    first = tmp_path / "flowcept_buffer_grow_h_1.jsonl"
    second = tmp_path / "flowcept_buffer_grow_h_2.jsonl"
    _write(first, [_task(f"{'1' * 16}.{i}", "grow") for i in range(1, 51)])
    _write(second, [_task(f"{'2' * 16}.{i}", "grow") for i in range(1, 51)])
    late = [_task(f"{'2' * 16}.{i}", "grow") for i in range(51, 61)]
    appended = []

    def append_mid_merge(_consumed: int) -> None:  # called while the merge reads: after the scan
        if not appended:
            appended.append(True)
            with open(second, "ab") as handle:  # a writer that finishes and closes meanwhile
                handle.write(b"".join(orjson.dumps(r) + b"\n" for r in late))

    report = consolidate(base, "grow", output_format=output_format, progress=append_mid_merge)
    assert appended and str(second) in report.kept_live and str(first) in report.removed
    assert not first.exists() and second.exists()
    again = consolidate(base, "grow", output_format=output_format)  # the late records come in now
    ids = sorted(r["task_id"] for r in read_records(again.output_path) if r["type"] == "task")
    assert len(ids) == 110 and len(set(ids)) == 110
    assert not second.exists()
