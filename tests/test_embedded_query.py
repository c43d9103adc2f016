"""The embedded query engine alone: MongoDB's meaning for the supported subset, clear refusals."""

from __future__ import annotations

import pytest

from flowcept.embedded_query import UnsupportedQueryError, matches, project, run_query, validate_filter

DOCS = [
    {"task_id": "t1", "n": 1, "s": "a", "tags": ["x", "y"], "sub": {"v": 1.5}},
    {"task_id": "t2", "n": 2, "s": "b", "tags": ["y"], "sub": {"v": None}},
    {"task_id": "t3", "n": "3", "s": None},
    {"task_id": "t4", "n": True},
]


def ids(docs):
    return [d["task_id"] for d in docs]


@pytest.mark.parametrize("query, expected", [
    ({"n": 1}, ["t1"]),
    ({"n": {"$gt": 1}}, ["t2"]),  # the string "3" and True are other types
    ({"n": {"$gte": "3"}}, ["t3"]),
    ({"n": True}, ["t4"]),
    ({"n": {"$in": [1, "3"]}}, ["t1", "t3"]),
    ({"n": {"$nin": [1, "3"]}}, ["t2", "t4"]),
    ({"s": None}, ["t3", "t4"]),  # null or missing
    ({"s": {"$exists": False}}, ["t4"]),
    ({"sub.v": {"$exists": True}}, ["t1", "t2"]),
    ({"sub.v": {"$lt": 2}}, ["t1"]),
    ({"tags": "y"}, ["t1", "t2"]),
    ({"tags": ["y"]}, ["t2"]),
    ({"tags.0": "x"}, ["t1"]),
    ({"n": {"$not": {"$gt": 1}}}, ["t1", "t3", "t4"]),
    ({"$or": [{"n": 2}, {"s": "a"}]}, ["t1", "t2"]),
    ({"$and": [{"tags": "y"}, {"n": {"$ne": 1}}]}, ["t2"]),
    ({"$nor": [{"n": 1}, {"n": 2}]}, ["t3", "t4"]),
])
def test_filters(query, expected):
    assert ids(d for d in DOCS if matches(d, validate_filter(query))) == expected


@pytest.mark.parametrize("query, named", [
    ({"n": {"$regex": "a"}}, "$regex"),
    ({"$text": {"$search": "a"}}, "$text"),
    ({"n": {"$elemMatch": {"a": 1}}}, "$elemMatch"),
    ({"$and": []}, "$and"),
    ({"n": {"$not": 3}}, "$not"),
])
def test_unsupported_operators_are_named(query, named):
    with pytest.raises(UnsupportedQueryError, match=named.replace("$", r"\$")):
        validate_filter(query)
    assert issubclass(UnsupportedQueryError, ValueError)


def test_projection_sort_limit():
    assert project(DOCS[0], {"sub.v": 1, "task_id": 1}) == {"task_id": "t1", "sub": {"v": 1.5}}
    assert project(DOCS[0], {"tags": 0, "sub": 0, "_id": 0}) == {"task_id": "t1", "n": 1, "s": "a"}
    ordered = run_query(DOCS, {}, ["task_id"], sort=[("n", -1)])
    assert ids(ordered) == ["t4", "t3", "t2", "t1"]  # bool > string > number, as in BSON order
    assert ids(run_query(DOCS, {}, sort="s", limit=2)) == ["t3", "t4"]  # missing/null first
    with pytest.raises(ValueError, match="projection"):
        run_query(DOCS, {}, {"a": 1, "b": 0})
    with pytest.raises(ValueError, match="limit"):
        run_query(DOCS, {}, limit=-1)


def test_aggregation():
    rows = run_query(DOCS, {}, aggregation=[("sum", "n"), ("count", "s"), ("max", "sub.v")])
    assert rows == [{"sum_n": 3, "count_s": 2, "max_sub_v": 1.5}]
    grouped = run_query(DOCS[:2], {}, projection=["s"], aggregation=[("avg", "n")])
    assert grouped == [{"s": "a", "avg_n": 1.0}, {"s": "b", "avg_n": 2.0}]
