"""@flowcept_task: sync and async, arguments bound by name, defaults, results, errors, nesting."""

from __future__ import annotations

import asyncio

import pytest
from conftest import tasks_of

import flowcept
from flowcept import Flowcept, flowcept_task
from flowcept.instrumentation.flowcept_task import flowcept_task as flowcept_task_direct


def by_activity(records, activity_id):
    return [r for r in tasks_of(records) if r["activity_id"] == activity_id]


def test_importable_from_both_paths():
    assert flowcept.flowcept_task is flowcept_task_direct


def test_sync_binding_defaults_and_result():
    @flowcept_task
    def solve(a, b=2, *, scale=1.0):
        return a * b * scale

    with Flowcept() as fc:
        assert solve(3) == 6.0
        assert solve(3, 4, scale=0.5) == 6.0
        assert solve(a=1, b=1) == 1.0
        records = fc.get_buffer()
    recs = by_activity(records, "solve")
    assert [r["used"] for r in recs] == [{"a": 3, "b": 2, "scale": 1.0}, {"a": 3, "b": 4, "scale": 0.5},
                                         {"a": 1, "b": 1, "scale": 1.0}]
    assert [r["generated"] for r in recs] == [{"arg_0": 6.0}, {"arg_0": 6.0}, {"arg_0": 1.0}]
    assert all(r["status"] == "FINISHED" and r["ended_at"] >= r["started_at"] for r in recs)
    assert solve.__name__ == "solve"


def test_dict_result_and_output_names():
    @flowcept_task
    def as_dict(x):
        return {"y": x + 1}

    @flowcept_task(output_names=["q", "r"])
    def divmod_(a, b):
        return divmod(a, b)

    @flowcept_task(activity_id="custom_name", output_names="only")
    def single(x):
        return x

    with Flowcept() as fc:
        as_dict(1)
        divmod_(7, 2)
        single(5)
        records = fc.get_buffer()
    assert by_activity(records, "as_dict")[0]["generated"] == {"y": 2}
    assert by_activity(records, "divmod_")[0]["generated"] == {"q": 3, "r": 1}
    assert by_activity(records, "custom_name")[0]["generated"] == {"only": 5}


def test_var_args_and_kwargs():
    @flowcept_task
    def varied(a, *rest, key=0, **extra):
        return len(rest)

    with Flowcept() as fc:
        varied(1, 2, 3, key=4, other=5)
        records = fc.get_buffer()
    used = by_activity(records, "varied")[0]["used"]
    assert used["a"] == 1 and list(used["rest"]) == [2, 3]
    assert used["key"] == 4 and used["other"] == 5


def test_exception_recorded_and_reraised():
    @flowcept_task
    def fails(x):
        raise ValueError(f"bad {x}")

    with Flowcept() as fc:
        with pytest.raises(ValueError, match="bad 3"):
            fails(3)
        records = fc.get_buffer()
    rec = by_activity(records, "fails")[0]
    assert rec["status"] == "ERROR" and "ValueError" in rec["stderr"] and "bad 3" in rec["stderr"]
    assert rec["used"] == {"x": 3}


def test_wrong_call_still_raises_type_error():
    @flowcept_task
    def two(a, b):
        return a + b

    with Flowcept():
        with pytest.raises(TypeError):
            two(1, 2, 3)
        with pytest.raises(TypeError):
            two(1)


def test_nested_calls_get_parent_task_id():
    @flowcept_task
    def leaf(x):
        return x

    @flowcept_task
    def middle(x):
        return leaf(x) + leaf(x + 1)

    @flowcept_task
    def top(x):
        return middle(x)

    with Flowcept() as fc:
        top(1)
        leaf(9)
        records = fc.get_buffer()
    top_rec = by_activity(records, "top")[0]
    mid_rec = by_activity(records, "middle")[0]
    leaves = by_activity(records, "leaf")
    assert top_rec.get("parent_task_id") is None
    assert mid_rec["parent_task_id"] == top_rec["task_id"]
    assert [r.get("parent_task_id") for r in leaves] == [mid_rec["task_id"]] * 2 + [None]


def test_async_functions():
    @flowcept_task
    async def fetch(i, delay=0):
        await asyncio.sleep(delay)
        return {"i": i}

    @flowcept_task
    async def gather_all(n):
        return len(await asyncio.gather(*(fetch(i) for i in range(n))))

    @flowcept_task
    async def broken():
        raise KeyError("k")

    async def main():
        total = await gather_all(5)
        with pytest.raises(KeyError):
            await broken()
        return total

    with Flowcept() as fc:
        assert asyncio.run(main()) == 5
        records = fc.get_buffer()
    parent = by_activity(records, "gather_all")[0]
    children = by_activity(records, "fetch")
    assert len(children) == 5 and {r["generated"]["i"] for r in children} == set(range(5))
    assert all(r["parent_task_id"] == parent["task_id"] for r in children)
    assert parent["generated"] == {"arg_0": 5}
    err = by_activity(records, "broken")[0]
    assert err["status"] == "ERROR" and "KeyError" in err["stderr"]


def test_workflow_id_argument_and_outside_run():
    @flowcept_task
    def tagged(x, workflow_id=None):
        return x

    assert tagged(1) == 1  # outside a run: plain call
    with Flowcept() as fc:
        tagged(2, workflow_id="elsewhere")
        tagged(3)
        from flowcept.buffer import get_pipeline

        get_pipeline().drain()
        mine = fc.get_buffer()
    assert [r["used"]["x"] for r in by_activity(mine, "tagged")] == [3]


def test_decorated_recursion_and_methods():
    class Model:
        @flowcept_task
        def step(self, k):
            return k if k <= 0 else self.step(k - 1)

    with Flowcept() as fc:
        Model().step(3)
        records = fc.get_buffer()
    recs = by_activity(records, "step")
    assert len(recs) == 4
    by_id = {r["task_id"]: r for r in recs}
    depth = [r for r in recs if r.get("parent_task_id") is None]
    assert len(depth) == 1
    assert all(r.get("parent_task_id") in by_id or r.get("parent_task_id") is None for r in recs)


def test_compiled_wrapper_keeps_the_call_semantics():
    """The per-signature wrapper: same errors, defaults by identity, records across a run change."""
    shared = []

    @flowcept_task
    def keep(item, bucket=shared, *, tag="t"):
        bucket.append(item)
        return None

    with pytest.raises(TypeError, match="keep"):
        keep()  # outside a run too, the message names the function
    with Flowcept() as fc:
        keep(1)
        keep(item=2, tag="u")
        with pytest.raises(TypeError, match="keep"):
            keep(1, shared, "positional tag")
        records = fc.get_buffer()
    assert shared == [1, 2]
    recs = by_activity(records, "keep")
    assert [(r["used"]["item"], r["used"]["tag"]) for r in recs] == [(1, "t"), (2, "u")]
    assert all("generated" not in r and r["status"] == "FINISHED" for r in recs)

    outer = Flowcept(workflow_id="outer_run").start()
    inner = Flowcept(workflow_id="inner_run").start()

    @flowcept_task
    def stops_the_run():
        inner.stop()  # the run changes while the call is in flight
        return {"done": True}

    stops_the_run()
    outer.stop()
    recs = by_activity(inner.get_buffer(), "stops_the_run") + by_activity(outer.get_buffer(), "stops_the_run")
    assert len(recs) == 1 and recs[0]["generated"] == {"done": True}


def test_parameters_named_like_builtins():
    """Parameters may shadow any builtin the wrapper itself uses (type, str, next, len, ...)."""

    @flowcept_task
    def make(type, n=1):  # noqa: A002 - the point of the test
        return {"made": f"{type}x{n}"}

    @flowcept_task
    def shadow_all(str, next, len, dict, BaseException, ValueError):  # noqa: A002, N803
        return [str, next, len, dict, BaseException, ValueError]

    with Flowcept() as fc:
        assert make("x", 2) == {"made": "xx2"}
        assert shadow_all(1, 2, 3, 4, 5, 6) == [1, 2, 3, 4, 5, 6]
        with pytest.raises(TypeError, match="make"):
            make()
        records = fc.get_buffer()
    made = by_activity(records, "make")
    assert len(made) == 1 and made[0]["used"] == {"type": "x", "n": 2} and made[0]["generated"] == {"made": "xx2"}
    shadow = by_activity(records, "shadow_all")
    assert len(shadow) == 1 and shadow[0]["generated"] == {"arg_0": [1, 2, 3, 4, 5, 6]}
