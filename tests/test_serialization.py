"""Values JSON cannot hold never lose their record nor any other."""

from __future__ import annotations

import datetime
import enum
import math
import pathlib

import orjson
import pytest
from conftest import tasks_of

from flowcept import Flowcept, FlowceptTask, serialization


class Opaque:
    def __repr__(self):
        return "<Opaque thing>"


class BadRepr:
    def __repr__(self):
        raise RuntimeError("repr exploded")


class Color(enum.Enum):
    RED = 1


def poison_values():
    np = pytest.importorskip("numpy")
    return {
        "object": Opaque(),
        "bad_repr": BadRepr(),
        "np_scalar": np.float32(1.5),
        "np_int": np.int64(7),
        "np_array": np.arange(6).reshape(2, 3),
        "np_noncontig": np.arange(10)[::2],
        "np_object": np.array([Opaque(), 1], dtype=object),
        "set": {1, 2},
        "frozenset": frozenset({"a"}),
        "bytes": b"\x00\xffraw",
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": -math.inf,
        "non_str_keys": {1: "a", 2.5: "b", None: "c"},
        "tuple_keys": {(1, 2): "t"},
        "huge_int": 2**70,
        "neg_huge_int": -(2**80),
        "complex": 1 + 2j,
        "datetime": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "enum": Color.RED,
        "path": pathlib.Path("/tmp/x"),
        "nested": {"deep": [{(3, 4): {5, 6}}, b"zz", Opaque()]},
        "generator": (i for i in range(3)),
    }


@pytest.mark.parametrize("name", list(poison_values()))
def test_each_poison_value_alone(name):
    value = poison_values()[name]
    line = serialization.dumps_line({"type": "task", "task_id": "t", "used": {name: value}})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = orjson.loads(line)
    assert record["task_id"] == "t" and name in record["used"]


def test_all_poison_values_in_one_record():
    line = serialization.dumps_line({"type": "task", "task_id": "all", "used": poison_values(),
                                     (1, 2): "top-level tuple key"})
    record = orjson.loads(line)
    assert record["task_id"] == "all"
    used = record["used"]
    assert used["np_array"] == [[0, 1, 2], [3, 4, 5]]
    assert used["set"] in ([1, 2], [2, 1])
    assert used["huge_int"] == str(2**70)
    assert used["object"]["__flowcept_unserializable__"].endswith("Opaque")


def test_large_values_are_summarised(monkeypatch):
    monkeypatch.setattr(serialization, "max_value_bytes", 1000)
    big = "x" * 5000
    line = serialization.dumps_line({"type": "task", "task_id": "big", "used": {"small": 1, "big": big},
                                     "generated": {"blob": b"y" * 5000}, "data": big})
    record = orjson.loads(line)
    assert record["task_id"] == "big" and record["used"]["small"] == 1
    assert record["used"]["big"]["__flowcept_truncated__"] is True
    assert record["used"]["big"]["size_bytes"] > 1000
    assert len(line) < 10000


def test_large_and_poison_together(monkeypatch):
    monkeypatch.setattr(serialization, "max_value_bytes", 1000)
    record = {"type": "task", "task_id": "mix",
              "used": {(1, 2): "tuple key", "big": "z" * 5000, "n": 2**70,
                       "deep": {"deeper": {(3,): "x" * 3000}}}}
    out = orjson.loads(serialization.dumps_line(record))
    assert out["task_id"] == "mix"


def test_poison_through_the_pipeline(monkeypatch):
    monkeypatch.setenv("FLOWCEPT_PROJECT_MAX_VALUE_BYTES", "100000")
    values = poison_values()
    with Flowcept(workflow_id="poison") as fc:
        FlowceptTask(activity_id="before", used={"i": 0}, generated={"ok": True})
        for name, value in values.items():
            FlowceptTask(activity_id=f"p_{name}", used={name: value}, generated={name: value})
        FlowceptTask(activity_id="huge", used={"blob": "q" * 300000}, generated={"ok": 1})
        FlowceptTask(activity_id="after", used={"i": 1}, generated={"ok": True})
    records = Flowcept.read_buffer_file(fc.output_path)
    names = {r["activity_id"] for r in tasks_of(records)}
    assert names == {"before", "after", "huge"} | {f"p_{n}" for n in values}
    huge = next(r for r in records if r.get("activity_id") == "huge")
    assert huge["used"]["blob"]["__flowcept_truncated__"] is True


def test_dumps_never_raises_on_self_reference():
    a: dict = {"type": "task", "task_id": "cyc"}
    a["self"] = a
    out = orjson.loads(serialization.dumps_line(a))
    assert out["task_id"] == "cyc"


def _needs_sanitize(record: dict) -> bool:
    try:
        orjson.dumps(record, default=serialization._fallback, option=serialization._OPTIONS)
        return False
    except TypeError:
        return True


def test_nan_and_inf_are_null_on_the_sanitize_path_as_on_the_fast_path():
    np = pytest.importorskip("numpy")
    values = {"nan": float("nan"), "inf": math.inf, "ninf": -math.inf, "list": [1.0, float("nan")],
              "np_nan": np.float64("nan"), "np32_inf": np.float32("inf"), "arr": np.array([np.nan, 2.0]),
              "complex": complex(math.inf, 1.0), "keys": {None: 1, True: 2, 2.5: 3,
                                                          datetime.date(2024, 1, 2): 4, Color.RED: 5}}
    fast = {"type": "task", "task_id": "f", "used": dict(values, obj=Opaque())}
    slow = {"type": "task", "task_id": "f", "used": dict(values, obj=Opaque(), bad={(1, 2): "tuple key"})}
    assert not _needs_sanitize(fast) and _needs_sanitize(slow)
    fast_out = orjson.loads(serialization.dumps_line(fast))["used"]
    slow_out = orjson.loads(serialization.dumps_line(slow))["used"]
    assert slow_out.pop("bad") == {"(1, 2)": "tuple key"}
    assert slow_out == fast_out
    assert slow_out["nan"] is None and slow_out["inf"] is None and slow_out["ninf"] is None
    assert slow_out["list"] == [1.0, None] and slow_out["arr"] == [None, 2.0]
    assert slow_out["np_nan"] is None and slow_out["np32_inf"] is None
    assert slow_out["complex"] == {"real": None, "imag": 1.0}
    assert slow_out["keys"] == {"null": 1, "true": 2, "2.5": 3, "2024-01-02": 4, "1": 5}
    assert slow_out["obj"]["__flowcept_unserializable__"].endswith("Opaque")


def test_written_lines_are_strict_json():
    """No NaN/Infinity tokens on either path: a strict reader (json with parse_constant) accepts both."""
    import json

    def strict(text: str) -> dict:
        def refuse(token: str) -> None:
            raise ValueError(token)
        return json.loads(text, parse_constant=refuse)

    line = serialization.dumps_line({"type": "task", "task_id": "all", "used": poison_values(), (1, 2): "t"})
    assert strict(line.decode())["used"]["nan"] is None
