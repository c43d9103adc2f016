"""The HDF5 layout: full records plus filterable columns, telemetry series per node and GPU."""

from __future__ import annotations

import math
import os
from pathlib import Path

import orjson
import pytest

h5py = pytest.importorskip("h5py")

from flowcept.consolidation import consolidate, read_records  # noqa: E402
from flowcept.hdf5_store import CHUNK_ROWS, read_hdf5, tasks_dataframe, write_hdf5  # noqa: E402


def _lines(records):
    return [(orjson.dumps(r), None) for r in records]


def test_tasks_columns_and_round_trip(tmp_path: Path) -> None:
    count = CHUNK_ROWS + 10  # more than one chunk: datasets grow
    records = [{"type": "task", "task_id": f"00000000000000ab.{i}", "workflow_id": "w", "activity_id": "step",
                "status": "FINISHED", "started_at": float(i), "rank": i % 4, "hostname": f"n{i % 2}",
                "used": {"x": i, "nested": {"y": [1, 2]}}} for i in range(count)]
    records[3].pop("rank")
    records[4]["started_at"] = None
    records.append({"type": "workflow", "workflow_id": "w", "name": "wf", "hosts": ["n0", "n1"]})
    records.append({"type": "object", "object_id": "o1", "workflow_id": "w"})
    path = str(tmp_path / "out.h5")
    assert write_hdf5(path, _lines(records), workflow_id="w") == len(records)
    assert read_hdf5(path) == records
    with h5py.File(path, "r") as handle:
        assert handle.attrs["format"] == "flowcept" and handle.attrs["workflow_id"] == "w"
        tasks = handle["tasks"]
        assert tasks["offset"].shape == tasks["seq"].shape == (count,)
        text = tasks["jsonl"][:].tobytes()  # the tasks as JSONL text: plain h5py reads them
        assert [orjson.loads(line) for line in text.splitlines()] == records[:count]
        start, end = tasks["offset"][7], tasks["offset"][8]
        assert orjson.loads(text[start:end]) == records[7]  # a row read alone, by its offset
        assert tasks["task_id"].asstr()[5] == "00000000000000ab.5"
        assert tasks["rank"][3] == -1 and tasks["rank"][5] == 1
        assert math.isnan(tasks["started_at"][4]) and math.isnan(tasks["ended_at"][0])
        assert orjson.loads(handle["workflows"]["jsonl"][:].tobytes())["name"] == "wf"
        assert handle["other"]["offset"].shape == (1,)
    frame = tasks_dataframe(path)
    assert len(frame) == count and set(frame["hostname"]) == {"n0", "n1"}
    assert frame.loc[frame["rank"] == 2, "task_id"].iloc[0] == "00000000000000ab.2"


def test_telemetry_series_per_node_and_gpu(tmp_path: Path) -> None:
    records = []
    for i in range(6):
        node = f"node{i % 2}"
        sample = {"type": "telemetry", "telemetry_id": f"00000000000000cd.{i}", "workflow_id": "w",
                  "node_name": node, "timestamp": 10.0 + i, "cpu": {"percent": 10.0 * i},
                  "memory": {"used": 1000 + i}, "gpu": {"0": {"used": i, "temperature": 40 + i}}}
        if i >= 4:
            sample["disk"] = {"read_bytes": 5 * i}  # a column that appears later
        records.append(sample)
    path = str(tmp_path / "t.h5")
    write_hdf5(path, _lines(records))
    assert read_hdf5(path) == records
    with h5py.File(path, "r") as handle:
        node0 = handle["telemetry/nodes/node0"]
        assert list(node0["timestamp"][:]) == [10.0, 12.0, 14.0]
        assert list(node0["cpu.percent"][:]) == [0.0, 20.0, 40.0]
        assert node0["cpu.percent"].compression == "gzip"
        disk = node0["disk.read_bytes"][:]
        assert math.isnan(disk[0]) and math.isnan(disk[1]) and disk[2] == 20.0
        assert list(handle["telemetry/nodes/node1/gpus/0/temperature"][:]) == [41.0, 43.0, 45.0]
        assert "gpu.0.used" not in node0


def test_read_buffer_file_reads_h5_and_dataframe(tmp_path: Path) -> None:
    base = tmp_path / "flowcept_buffer.jsonl"
    lines = [orjson.dumps({"type": "task", "task_id": f"00000000000000ef.{i}", "workflow_id": "wh",
                           "used": {"a": i}}) for i in range(1, 21)]
    (tmp_path / "flowcept_buffer_wh_h_1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = consolidate(str(base), "wh", output_format="hdf5")
    assert report.output_path.endswith("flowcept_buffer_wh.h5") and report.records_out == 20
    from flowcept import Flowcept

    assert Flowcept.read_buffer_file(report.output_path) == read_records(report.output_path)
    frame = Flowcept.read_buffer_file(report.output_path, return_df=True)
    assert list(frame["used.a"]) == list(range(1, 21))


def _task_block(first: int, count: int, prefix: str = "00000000000000cd") -> bytes:
    """Canonical task lines with varied values: unicode, missing and odd-typed fields."""
    lines = []
    for i in range(first, first + count):
        record = {"type": "task", "task_id": f"{prefix}.{i}", "workflow_id": "w", "activity_id": f"act-é{i % 7}",
                  "status": "FINISHED", "started_at": 1.7e9 + i, "ended_at": 1.7e9 + i + 0.5, "rank": i % 4,
                  "hostname": f"n{i % 3}", "pid": 100 + i % 5, "used": {"i": i, "text": "x" * (i % 50)}}
        if i % 11 == 0:
            record.pop("rank")
        if i % 13 == 0:
            record["pid"] = "not a number"
        if i % 17 == 0:
            record["parent_task_id"] = f"{prefix}.{i - 1}"
        lines.append(orjson.dumps(record))
    return b"\n".join(lines) + b"\n"


def _write_blocks(path: Path, blocks, **writer_args):
    from flowcept.hdf5_store import Hdf5Writer

    writer = Hdf5Writer(str(path), "w", **writer_args)
    for number, block in enumerate(blocks):
        writer.add_block(block)
        if number == 0 and writer.worker is not None:  # the first block started it
            assert writer.worker.wait_ready(30.0)
    return writer


def _columns_of(path: Path) -> dict:
    with h5py.File(path, "r") as handle:
        return {name: handle["tasks"][name][:].tolist() for name in handle["tasks"] if name != "jsonl"}


def test_column_worker_gives_the_same_file(tmp_path: Path) -> None:
    """A real helper process parses blocks; its file equals the one written in one process."""
    blocks = [_task_block(start, 3000) for start in range(0, 30000, 3000)]
    alone = _write_blocks(tmp_path / "alone.h5", blocks)
    assert alone.worker is None
    alone.close()
    helped = _write_blocks(tmp_path / "helped.h5", blocks, parse_worker=True, worker_after=0)
    worker = helped.worker
    assert worker.handed >= 3  # it took blocks (one at a time is parsed here when it is busy)
    pid = worker.proc.pid
    helped.close()
    assert worker.proc is None and not os.path.exists(f"/proc/{pid}")  # ended and reaped
    assert read_hdf5(str(tmp_path / "helped.h5")) == read_hdf5(str(tmp_path / "alone.h5"))
    assert _columns_of(tmp_path / "helped.h5") == _columns_of(tmp_path / "alone.h5")
    frame = tasks_dataframe(str(tmp_path / "helped.h5"))
    assert len(frame) == 30000 and frame.pid[13] == -1 and frame["rank"][11] == -1
    assert frame.activity_id[3] == "act-é3" and frame.parent_task_id[17] == "00000000000000cd.16"


def test_column_worker_killed_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL the helper mid-merge: the blocks it owed are parsed here, the file is complete."""
    import signal

    blocks = [_task_block(start, 2000) for start in range(0, 40000, 2000)]
    writer = _write_blocks(tmp_path / "out.h5", blocks[:6], parse_worker=True, worker_after=0)
    assert writer.worker.handed >= 1
    os.kill(writer.worker.proc.pid, signal.SIGKILL)
    for block in blocks[6:]:
        writer.add_block(block)
    assert not writer.worker  # given up, with a warning
    assert writer.close() == 40000
    ids = [f"00000000000000cd.{i}" for i in range(40000)]
    assert [r["task_id"] for r in read_hdf5(str(tmp_path / "out.h5"))] == ids
    frame = tasks_dataframe(str(tmp_path / "out.h5"))
    assert frame.task_id.tolist() == ids
    assert frame.started_at.tolist() == [1.7e9 + i for i in range(40000)]


def test_consolidation_setting_turns_the_worker_off(flowcept_tmp: Path, monkeypatch) -> None:
    """project.hdf5_parse_worker=false: consolidation writes the same file, in one process."""
    (flowcept_tmp / "flowcept_buffer_w_h_1.jsonl").write_bytes(_task_block(0, 500))
    monkeypatch.setenv("FLOWCEPT_PROJECT_HDF5_PARSE_WORKER", "false")
    report = consolidate(str(flowcept_tmp / "flowcept_buffer.jsonl"), "w", output_format="hdf5", cleanup_files=False)
    assert report.records_out == 500 and len(tasks_dataframe(report.output_path)) == 500
    monkeypatch.setenv("FLOWCEPT_PROJECT_HDF5_PARSE_WORKER", "maybe")
    with pytest.raises(ValueError, match="project.hdf5_parse_worker"):
        consolidate(str(flowcept_tmp / "flowcept_buffer.jsonl"), "w", output_format="hdf5", cleanup_files=False)


def test_node_process_and_gpu_samples_get_their_own_series(tmp_path: Path) -> None:
    """The node sampler's flat records (kind node/process/gpu) land in separate series groups."""
    from fakes.fake_pynvml import FakeGpu, make_nvml

    from flowcept.telemetry.node import NodeSampler

    uuids = ["GPU-11111111-aaaa-bbbb-cccc-000000000000", "GPU-22222222-aaaa-bbbb-cccc-111111111111"]
    sampler = NodeSampler(gpu=True, pids_provider=lambda: {os.getpid(): 3}, hostname="nodeA",
                          nvml=make_nvml([FakeGpu(uuid) for uuid in uuids]))
    try:
        records = [record for _ in range(3) for record in sampler.sample()]
    finally:
        sampler.close()
    assert {r["kind"] for r in records} == {"node", "process", "gpu"}
    path = str(tmp_path / "t.h5")
    write_hdf5(path, _lines(records))
    assert read_hdf5(path) == records
    with h5py.File(path, "r") as handle:
        node = handle["telemetry/nodes/nodeA"]
        assert node["timestamp"].shape == (3,) and not any(name.startswith("gpu_") for name in node)
        assert sorted(node["gpus"]) == uuids
        for uuid in uuids:
            gpu = node["gpus"][uuid]
            assert gpu.attrs["gpu_uuid"] == uuid and gpu.attrs["gpu_name"] == "NVIDIA Fake A100"
            assert list(gpu["gpu_memory_total_bytes"][:]) == [40.0 * 2**30] * 3
            assert gpu["timestamp"].shape == (3,)
        process = node["processes"][str(os.getpid())]
        assert process.attrs["pid"] == os.getpid() and process.attrs["rank"] == 3
        assert process["timestamp"].shape == (3,) and not any(name.startswith("gpu_") for name in process)


def test_a_line_holding_two_objects_does_not_shift_the_columns(tmp_path: Path) -> None:
    """Decoding a block as one JSON array would read '{...},{...}' as two rows: checked, per line then."""
    from flowcept.hdf5_store import Hdf5Writer

    good = [orjson.dumps({"type": "task", "task_id": f"t{i}", "workflow_id": "w"}) for i in range(4)]
    bad = b'{"type":"task","task_id":"junk1","workflow_id":"w"},{"type":"task","task_id":"junk2"}'
    writer = Hdf5Writer(str(tmp_path / "two.h5"), "w")
    writer.add_block(b"\n".join(good[:2] + [bad] + good[2:]) + b"\n")
    assert writer.close() == 5
    frame = tasks_dataframe(str(tmp_path / "two.h5"))
    assert frame.task_id.tolist() == ["t0", "t1", "", "t2", "t3"]


def test_a_stalled_column_worker_is_given_up_and_memory_stays_bounded(tmp_path: Path, monkeypatch) -> None:
    """SIGSTOP the helper: past a few batches the writer waits for it, meets the timeout, parses here."""
    import signal

    import flowcept.hdf5_store as store

    monkeypatch.setattr(store, "WORKER_TIMEOUT_S", 1.0)
    monkeypatch.setattr(store, "WRITE_ROWS", store.CHUNK_ROWS)  # the same logic on a smaller file
    block_rows = 2048
    total = 5 * store.WRITE_ROWS
    blocks = [_task_block(start, block_rows) for start in range(0, total, block_rows)]
    writer = _write_blocks(tmp_path / "stalled.h5", blocks[:3], parse_worker=True, worker_after=0)
    assert writer.worker.handed >= 1
    pid = writer.worker.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        peak = 0
        for block in blocks[3:]:
            writer.add_block(block)
            peak = max(peak, writer.writers["tasks"].rows)
        assert not writer.worker  # given up after its timeout
        assert peak <= 4 * store.WRITE_ROWS + block_rows  # not the whole file held here
        assert writer.close() == len(blocks) * block_rows
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
    frame = tasks_dataframe(str(tmp_path / "stalled.h5"))
    assert frame.task_id.tolist() == [f"00000000000000cd.{i}" for i in range(len(blocks) * block_rows)]
