"""The HDF5 layout: full records plus filterable columns, telemetry series per node and GPU."""

from __future__ import annotations

import math
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
        assert tasks["record"].shape == (count,)
        assert tasks["task_id"].asstr()[5] == "00000000000000ab.5"
        assert tasks["rank"][3] == -1 and tasks["rank"][5] == 1
        assert math.isnan(tasks["started_at"][4]) and math.isnan(tasks["ended_at"][0])
        assert orjson.loads(handle["workflows"]["record"][0])["name"] == "wf"
        assert handle["other"]["record"].shape == (1,)
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
