"""Consolidation's two passes: what is copied as it is, what is deduplicated, and HDF5 parity."""

from __future__ import annotations

from pathlib import Path
from typing import List

import orjson
import pytest

from flowcept.consolidation import consolidate, read_records


def _task(prefix: str, counter: int, workflow_id: str = "wf", **extra: object) -> dict:
    record = {"type": "task", "task_id": f"{prefix}.{counter}", "workflow_id": workflow_id, "campaign_id": "c",
              "activity_id": "step", "started_at": float(counter), "parent_task_id": None, "hostname": "h",
              "node_name": "h", "pid": 7, "used": {"i": counter, "nested": {"workflow_id": "other"}},
              "ended_at": counter + 0.5, "status": "FINISHED"}
    record.update(extra)
    return record


def _lines(records: List[dict]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def _prefix(n: int) -> str:
    return f"{n:016x}"


def test_exclusive_sources_are_copied_as_they_are(flowcept_tmp: Path) -> None:
    """Per-process files of distinct processes: the output is their bytes, workflow record last."""
    workflow = {"type": "workflow", "workflow_id": "wf", "name": "w", "started_at": 1.0}
    bodies = []
    for n in range(1, 4):
        body = _lines([_task(_prefix(n), i) for i in range(1, 301)])
        records = ([workflow] if n == 1 else [])
        (flowcept_tmp / f"flowcept_buffer_wf_h_{n}.jsonl").write_bytes(_lines(records) + body)
        bodies.append(body)
    seen: List[int] = []
    total = sum(p.stat().st_size for p in flowcept_tmp.glob("flowcept_buffer_wf_*.jsonl"))
    report = consolidate(str(flowcept_tmp / "flowcept_buffer.jsonl"), "wf", progress=seen.append,
                         workflow_update={"type": "workflow", "workflow_id": "wf", "status": "FINISHED",
                                          "ended_at": 2.0, "utc_timestamp": 2.0})
    data = Path(report.output_path).read_bytes()
    assert data.startswith(b"".join(bodies))
    last = orjson.loads(data.splitlines()[-1])
    assert last["type"] == "workflow" and last["name"] == "w" and last["status"] == "FINISHED"
    assert report.records_out == 901 and report.duplicates == 0 and not report.bad_lines
    assert sum(seen) == total


def test_spilled_batches_replayed_lines_and_foreign_records(flowcept_tmp: Path) -> None:
    """A daemon file and a process file share a prefix (spill): those records once, the rest copied."""
    a, b, c = _prefix(0xA), _prefix(0xB), _prefix(0xC)
    node = [_task(p, i) for i in range(1, 201) for p in (a, b)]  # two ranks interleaved
    node.append(_task(_prefix(0xD), 1, workflow_id="wf_2"))  # another workflow: never merged
    (flowcept_tmp / "flowcept_buffer_wf_node-h.jsonl").write_bytes(_lines(node))
    # Rank b spilled its last batch to its own file (after the daemon wrote it), one line of it
    # in another key order (not our canonical shape: parsed, still deduplicated).
    spilled = [_task(b, i) for i in range(150, 211)]
    odd = orjson.dumps({"workflow_id": "wf", "type": "task", "task_id": f"{b}.160", "activity_id": "step"})
    body = _lines(spilled[:10]) + odd + b"\n" + _lines(spilled[11:])
    (flowcept_tmp / "flowcept_buffer_wf_h_2.jsonl").write_bytes(body + b'{"type":"task","task_id":"' + b.encode())
    (flowcept_tmp / "flowcept_buffer_wf_h_3.jsonl").write_bytes(_lines([_task(c, i) for i in range(1, 51)]))
    report = consolidate(str(flowcept_tmp / "flowcept_buffer.jsonl"), "wf")
    ids = [r["task_id"] for r in read_records(report.output_path) if r["type"] == "task"]
    assert len(ids) == len(set(ids))
    expected = {f"{a}.{i}" for i in range(1, 201)} | {f"{b}.{i}" for i in range(1, 211)} | \
        {f"{c}.{i}" for i in range(1, 51)}
    assert set(ids) == expected
    assert report.duplicates == 51  # b.150 .. b.200 were in both files
    assert report.bad_lines == [(str(flowcept_tmp / "flowcept_buffer_wf_h_2.jsonl"), 62)]


def test_lines_that_only_look_like_ours(flowcept_tmp: Path) -> None:
    """Exact workflow ids, escaped strings, ids of other shapes, many prefixes, many alternations."""
    records = []
    for n in range(70):  # more prefixes than one pattern holds
        records.append(_task(_prefix(0x100 + n), 1))
    records.append(_task(_prefix(0x100), 2, workflow_id="wf_b"))  # a workflow id sharing the prefix
    records.append(_task(_prefix(0x100), 3, activity_id='say "hi"\n'))  # escapes: still canonical
    for i in range(5000):  # clean and other lines alternating
        records.append(_task(_prefix(0x200), i + 1))
        records.append({"type": "task", "task_id": f"user-{i}", "workflow_id": "wf"})
    (flowcept_tmp / "flowcept_buffer_wf_node-a.jsonl").write_bytes(_lines(records))
    (flowcept_tmp / "flowcept_buffer_wf_node-b.jsonl").write_bytes(
        _lines([{"type": "task", "task_id": "user-7", "workflow_id": "wf"}, _task(_prefix(0x200), 9)]))
    report = consolidate(str(flowcept_tmp / "flowcept_buffer.jsonl"), "wf")
    out = read_records(report.output_path)
    ids = [r["task_id"] for r in out]
    assert len(ids) == len(set(ids)) == 70 + 1 + 5000 + 5000
    assert f"{_prefix(0x100)}.2" not in ids
    assert report.duplicates == 2
    assert next(r for r in out if r["task_id"] == f"{_prefix(0x100)}.3")["activity_id"] == 'say "hi"\n'


def test_hdf5_equals_jsonl_and_columns(flowcept_tmp: Path) -> None:
    pytest.importorskip("h5py")
    from flowcept.hdf5_store import CHUNK_ROWS, tasks_dataframe

    p, q = _prefix(1), _prefix(2)
    first = [_task(p, i, parent_task_id=(f"{p}.1" if i % 2 else None)) for i in range(1, CHUNK_ROWS + 5)]
    # A later block with longer and non-ASCII text (the string columns widen), and a missing rank.
    later = [_task(q, i, activity_id="é" * 40 + str(i), hostname="node-ü") for i in range(1, 100)]
    later[3].pop("hostname")
    later[4]["started_at"] = None
    later[5]["pid"] = "not a number"
    (flowcept_tmp / "flowcept_buffer_wf_h_1.jsonl").write_bytes(_lines(first))
    (flowcept_tmp / "flowcept_buffer_wf_h_2.jsonl").write_bytes(_lines(later))
    base = str(flowcept_tmp / "flowcept_buffer.jsonl")
    jsonl = read_records(consolidate(base, "wf", cleanup_files=False).output_path)
    report = consolidate(base, "wf", output_format="hdf5", cleanup_files=False)
    assert read_records(report.output_path) == [r for r in jsonl]
    frame = tasks_dataframe(report.output_path)
    assert len(frame) == len(first) + len(later)
    row = frame[frame.task_id == f"{q}.10"].iloc[0]
    assert row.activity_id == "é" * 40 + "10" and row.hostname == "node-ü" and row.pid == 7
    assert frame[frame.task_id == f"{q}.4"].iloc[0].hostname == ""
    assert frame[frame.task_id == f"{q}.6"].iloc[0].pid == -1
    assert frame[frame.task_id == f"{p}.2"].iloc[0].parent_task_id == ""
    assert frame[frame.task_id == f"{p}.3"].iloc[0].parent_task_id == f"{p}.1"
    assert set(frame.workflow_id) == {"wf"}


def test_hdf5_sink_writes_blocks_as_they_come(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    from flowcept.hdf5_store import CHUNK_ROWS, WRITE_ROWS, read_hdf5
    from flowcept.sinks.hdf5 import Hdf5Sink

    path = tmp_path / "node.h5"
    sink = Hdf5Sink(str(path))
    records = [_task(_prefix(5), i) for i in range(1, 3 * CHUNK_ROWS + 2)]
    for start in range(0, len(records), 1000):
        batch = records[start:start + 1000]
        sink.write_lines(_lines(batch), len(batch))
        assert sink._writer.writers["tasks"].rows < WRITE_ROWS  # bounded: written as it goes
    sink.write([{"type": "telemetry", "telemetry_id": "t1", "node_name": "n", "timestamp": 1.0,
                 "cpu": {"percent": 5.0}}])
    assert not path.exists()  # complete only at close
    sink.close()
    sink.close()
    assert read_hdf5(str(path))[:-1] == records and not list(tmp_path.glob("*.tmp"))
