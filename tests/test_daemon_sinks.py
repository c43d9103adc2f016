"""The daemon's sinks share one contract: write (dicts or lines), flush, close (idempotent)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from flowcept.sinks import UnknownSinkError, sink_class


def _records(n: int, start: int = 0) -> list:
    return [{"type": "task", "task_id": f"t{i}", "workflow_id": "wf", "used": {"i": i}}
            for i in range(start, start + n)]


def _read(name: str, path: str) -> list:
    if name == "hdf5":
        from flowcept.hdf5_store import read_hdf5

        return read_hdf5(path)
    with open(path, "rb") as handle:
        return [orjson.loads(line) for line in handle]


@pytest.mark.parametrize("name", ["jsonl", "hdf5"])
def test_sink_contract(name: str, tmp_path: Path) -> None:
    if name == "hdf5":
        pytest.importorskip("h5py")
    path = str(tmp_path / ("out.h5" if name == "hdf5" else "out.jsonl"))
    sink = sink_class(name)(path)
    sink.write(_records(3))
    sink.write_lines(b"".join(orjson.dumps(r) + b"\n" for r in _records(2, 3)), 2)
    if hasattr(sink, "write_many"):
        sink.write_many([orjson.dumps(r) + b"\n" for r in _records(2, 5)], 2)
    else:
        sink.write(_records(2, 5))
    sink.flush()
    sink.close()
    sink.close()
    assert sorted(r["used"]["i"] for r in _read(name, path) if r.get("type") == "task") == list(range(7))


def test_unknown_sink_is_a_clear_error() -> None:
    with pytest.raises(UnknownSinkError, match="unknown sink 'nope'"):
        sink_class("nope")
