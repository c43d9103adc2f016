"""Answering ``Flowcept.db`` queries from the workflow files on disk, without MongoDB.

A documented subset of MongoDB's query language, with MongoDB's meaning:

- filters: ``{"field": value}`` (equality; on an array field, any element equal), dotted paths
  (``"used.n"``), ``$eq $ne $gt $gte $lt $lte $in $nin $exists``, and the logical
  ``$and $or $nor`` (lists of filters) and ``$not`` (around an operator document);
- projection: ``{"a": 1, "b.c": 1}`` (inclusion), ``{"a": 0}`` (exclusion) or a list of fields;
  ``_id`` is never returned;
- sort: ``[("field", 1 | -1), ...]``, ``{"field": 1}`` or a field name; documents without the field
  sort first ascending, as in MongoDB;
- limit (0: none);
- aggregation: ``[("avg" | "sum" | "min" | "max" | "count", "field"), ...]``, grouped by the
  projection fields when given (see ``DBAPI.task_query``).

Anything else (``$regex``, ``$elemMatch``, ``$where``...) raises :class:`UnsupportedQueryError`
(a ``ValueError``) naming the operator. Comparisons between different types are false, as in
MongoDB (``{"x": {"$gt": 1}}`` does not match ``"2"``).
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

_MISSING = object()
COMPARISONS = {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$not"}
LOGICAL = {"$and", "$or", "$nor"}
AGGREGATIONS = {"avg", "sum", "min", "max", "count"}

SortSpec = Union[None, str, Dict[str, int], Sequence[Tuple[str, int]]]


class UnsupportedQueryError(ValueError):
    """A filter, projection, sort or aggregation this engine (or Flowcept) does not support."""


# -- validation (shared with the MongoDB path, so both refuse the same things) ------------------------

def validate_filter(query: Any) -> Dict[str, Any]:
    """Return the filter (``None`` -> ``{}``) or raise a ValueError naming the problem."""
    if query is None:
        return {}
    if not isinstance(query, dict):
        raise UnsupportedQueryError(f"a filter must be a dict, got {type(query).__name__}")
    for key, value in query.items():
        if not isinstance(key, str):
            raise UnsupportedQueryError(f"filter keys must be strings, got {key!r}")
        if key.startswith("$"):
            if key not in LOGICAL:
                raise UnsupportedQueryError(f"unsupported top-level filter operator '{key}' "
                                            f"(supported: {', '.join(sorted(LOGICAL))})")
            if not isinstance(value, list) or not value:
                raise UnsupportedQueryError(f"'{key}' needs a non-empty list of filters")
            for sub in value:
                validate_filter(sub)
        else:
            _validate_condition(key, value)
    return query


def _validate_condition(field: str, condition: Any) -> None:
    if not _is_operator_doc(condition):
        return
    for operator, operand in condition.items():
        if operator not in COMPARISONS:
            raise UnsupportedQueryError(f"unsupported operator '{operator}' on field '{field}' "
                                        f"(supported: {', '.join(sorted(COMPARISONS))})")
        if operator in ("$in", "$nin") and not isinstance(operand, (list, tuple)):
            raise UnsupportedQueryError(f"'{operator}' on field '{field}' needs a list")
        if operator == "$not":
            if not _is_operator_doc(operand):
                raise UnsupportedQueryError(f"'$not' on field '{field}' needs an operator document")
            _validate_condition(field, operand)


def _is_operator_doc(value: Any) -> bool:
    if not isinstance(value, dict) or not value:
        return False
    dollar = [k.startswith("$") for k in value if isinstance(k, str)]
    if any(dollar) and not all(dollar):
        raise UnsupportedQueryError(f"a condition mixes operators and fields: {sorted(value)}")
    return all(dollar) and len(dollar) == len(value)


def normalize_sort(sort: SortSpec) -> List[Tuple[str, int]]:
    """Sort spec as a list of (field, 1 | -1)."""
    if not sort:
        return []
    if isinstance(sort, str):
        return [(sort, 1)]
    items = list(sort.items()) if isinstance(sort, dict) else list(sort)
    out = []
    for item in items:
        if isinstance(item, str):
            item = (item, 1)
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and item[1] in (1, -1)):
            raise UnsupportedQueryError(f"sort entries are (field, 1 or -1), got {item!r}")
        out.append((str(item[0]), int(item[1])))
    return out


def normalize_projection(projection: Any) -> Optional[Dict[str, int]]:
    """Projection as {field: 0 | 1} without _id, or None for whole documents."""
    if not projection:
        return None
    if isinstance(projection, (list, tuple)):
        projection = {f: 1 for f in projection}
    if not isinstance(projection, dict):
        raise UnsupportedQueryError(f"a projection is a dict or a list of fields, got {projection!r}")
    spec = {k: int(bool(v)) for k, v in projection.items() if k != "_id"}
    if len(set(spec.values())) > 1:
        raise UnsupportedQueryError("a projection cannot mix inclusion and exclusion")
    return spec or None


def normalize_aggregation(aggregation: Any) -> List[Tuple[str, str]]:
    """Aggregation as a list of (operation, field), operations lower-case without $."""
    if not aggregation:
        return []
    if isinstance(aggregation, tuple) and len(aggregation) == 2 and isinstance(aggregation[0], str):
        aggregation = [aggregation]
    out = []
    for item in aggregation:
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise UnsupportedQueryError(f"aggregation entries are (operation, field), got {item!r}")
        operation = str(item[0]).lower().lstrip("$")
        if operation not in AGGREGATIONS:
            raise UnsupportedQueryError(f"unsupported aggregation '{item[0]}' (supported: "
                                        f"{', '.join(sorted(AGGREGATIONS))})")
        out.append((operation, str(item[1])))
    return out


def aggregation_name(operation: str, field: str) -> str:
    """Result key of one aggregation: ``max_used_n`` for ``("max", "used.n")``."""
    return f"{operation}_{field.replace('.', '_')}"


# -- evaluation ------------------------------------------------------------------------------------

def get_path(doc: Any, path: str) -> Any:
    """The value at a dotted path, or ``_MISSING``; numeric parts index lists."""
    if isinstance(doc, dict) and path in doc:
        return doc[path]
    value = doc
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _rank(value: Any) -> int:
    """MongoDB's BSON type order, for sorting mixed values."""
    if value is _MISSING or value is None:
        return 1
    if isinstance(value, bool):
        return 8
    if isinstance(value, (int, float)):
        return 2
    if isinstance(value, str):
        return 3
    if isinstance(value, dict):
        return 4
    if isinstance(value, list):
        return 5
    return 9


def _comparable(a: Any, b: Any) -> bool:
    return _rank(a) == _rank(b) and _rank(a) in (2, 3)


def _equal(value: Any, target: Any) -> bool:
    if value is _MISSING:
        return target is None
    if target is None:
        return value is None
    if isinstance(value, list) and not isinstance(target, list):
        return any(_equal(v, target) for v in value)
    if isinstance(value, bool) or isinstance(target, bool):
        return type(value) is type(target) and value == target
    return value == target


def _compare(value: Any, operator: str, target: Any) -> bool:
    if isinstance(value, list):
        return any(_compare(v, operator, target) for v in value)
    if not _comparable(value, target):
        return False
    if operator == "$gt":
        return value > target
    if operator == "$gte":
        return value >= target
    if operator == "$lt":
        return value < target
    return value <= target


def _condition(value: Any, condition: Any) -> bool:
    if not _is_operator_doc(condition):
        return _equal(value, condition)
    for operator, operand in condition.items():
        if operator == "$eq":
            ok = _equal(value, operand)
        elif operator == "$ne":
            ok = not _equal(value, operand)
        elif operator in ("$gt", "$gte", "$lt", "$lte"):
            ok = _compare(value, operator, operand)
        elif operator == "$in":
            ok = any(_equal(value, o) for o in operand)
        elif operator == "$nin":
            ok = not any(_equal(value, o) for o in operand)
        elif operator == "$exists":
            ok = (value is not _MISSING) == bool(operand)
        elif operator == "$not":
            ok = not _condition(value, operand)
        else:
            raise UnsupportedQueryError(f"unsupported operator '{operator}'")
        if not ok:
            return False
    return True


def matches(doc: Dict[str, Any], query: Dict[str, Any]) -> bool:
    """True when ``doc`` satisfies the (validated) filter."""
    for key, condition in query.items():
        if key == "$and":
            if not all(matches(doc, sub) for sub in condition):
                return False
        elif key == "$or":
            if not any(matches(doc, sub) for sub in condition):
                return False
        elif key == "$nor":
            if any(matches(doc, sub) for sub in condition):
                return False
        elif not _condition(get_path(doc, key), condition):
            return False
    return True


def project(doc: Dict[str, Any], spec: Optional[Dict[str, int]]) -> Dict[str, Any]:
    """Apply a normalised projection as MongoDB does (nested output for dotted paths)."""
    doc = {k: v for k, v in doc.items() if k != "_id"}
    if not spec:
        return doc
    if next(iter(spec.values())) == 0:
        out = _deep_copy_dicts(doc)
        for path in spec:
            parts = path.split(".")
            node = out
            for part in parts[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(parts[-1], None)
        return out
    out: Dict[str, Any] = {}
    for path in spec:
        value = get_path(doc, path)
        if value is _MISSING:
            continue
        parts = path.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _deep_copy_dicts(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy_dicts(v) for k, v in value.items()}
    return value


def _sort_key(value: Any) -> Tuple[int, Any]:
    rank = _rank(value)
    if rank in (2, 3, 8):
        return rank, value
    return rank, 0


def sort_docs(docs: List[Dict[str, Any]], sort: List[Tuple[str, int]]) -> List[Dict[str, Any]]:
    """Sort in place in MongoDB's order (missing and null first ascending) and return the list."""
    for field, direction in reversed(sort):  # stable sorts, last key first
        docs.sort(key=lambda d: _sort_key(get_path(d, field)), reverse=direction == -1)
    return docs


def aggregate(docs: Iterable[Dict[str, Any]], aggregation: List[Tuple[str, str]],
              group_by: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Group by ``group_by`` fields (one group when none) and compute the aggregations.

    Non-numeric values are ignored by avg/sum; count counts documents having the field.
    Groups are returned sorted by their key values.
    """
    groups: Dict[Tuple, Dict[str, Any]] = {}
    for doc in docs:
        key_values = tuple(_hashable(get_path(doc, f)) for f in group_by or ())
        state = groups.setdefault(key_values, {"_doc": doc, "_acc": {}})
        for operation, field in aggregation:
            value = get_path(doc, field)
            acc = state["_acc"].setdefault((operation, field), [0, 0.0, None, None])
            if value is _MISSING or value is None:
                continue
            if operation == "count":
                acc[0] += 1
                continue
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if operation in ("sum", "avg"):
                if numeric:
                    acc[0] += 1
                    acc[1] += value
            elif operation == "min":
                if acc[2] is None or _sort_key(value) < _sort_key(acc[2]):
                    acc[2] = value
            elif operation == "max":
                if acc[3] is None or _sort_key(value) > _sort_key(acc[3]):
                    acc[3] = value
    out = []
    for key_values, state in sorted(groups.items(), key=lambda item: [_sort_key(v) for v in item[0]]):
        row: Dict[str, Any] = {}
        for field, value in zip(group_by or (), key_values):
            if value is not _MISSING:
                row[field] = get_path(state["_doc"], field)
        for operation, field in aggregation:
            count, total, low, high = state["_acc"].get((operation, field), [0, 0.0, None, None])
            row[aggregation_name(operation, field)] = {
                "count": count, "sum": total, "avg": (total / count) if count else None,
                "min": low, "max": high}[operation]
        out.append(row)
    return out


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def run_query(docs: Iterable[Dict[str, Any]], query: Any = None, projection: Any = None, limit: int = 0,
              sort: SortSpec = None, aggregation: Any = None) -> List[Dict[str, Any]]:
    """Filter, sort, limit and project (or aggregate) documents, as MongoDB would."""
    query = validate_filter(query)
    spec = normalize_projection(projection)
    order = normalize_sort(sort)
    operations = normalize_aggregation(aggregation)
    if limit is None or limit < 0:
        raise UnsupportedQueryError(f"limit must be a non-negative integer, got {limit!r}")
    selected = [d for d in docs if matches(d, query)]
    if operations:
        rows = aggregate(selected, operations, list(spec) if spec else None)
        if order:
            rows = sort_docs(rows, order)
        return rows[:limit] if limit else rows
    if order:
        selected = sort_docs(selected, order)
    if limit:
        selected = selected[:limit]
    return [project(d, spec) for d in selected]


# -- the files ------------------------------------------------------------------------------------

def merge_into(store: Dict[Any, Dict[str, Any]], key: Any, record: Dict[str, Any]) -> None:
    """The same merge as the MongoDB writes: later non-null fields win; terminal status kept."""
    previous = store.get(key)
    fields = {k: v for k, v in record.items() if v is not None}
    if previous is None:
        store[key] = fields
        return
    if previous.get("status") in ("FINISHED", "ERROR") and fields.get("status") not in ("FINISHED", "ERROR"):
        fields.pop("status", None)
    previous.update(fields)


def workflow_files(base_path: str, workflow_id: Optional[str] = None) -> List[str]:
    """Files holding workflow records under the base path (one workflow's when an id is given)."""
    from flowcept.transport import split_base_path

    directory, stem, suffix = split_base_path(base_path)
    if workflow_id is not None:
        from flowcept.consolidation import consolidated_path, find_sources

        files = find_sources(base_path, workflow_id)
        h5 = consolidated_path(base_path, workflow_id, "hdf5")
        return ([h5] if os.path.exists(h5) else []) + files
    pattern = glob.escape(os.path.join(directory, f"{stem}_")) + "*"
    files = sorted(p for p in glob.glob(pattern) if p.endswith((suffix, ".h5", ".hdf5"))
                   and not os.path.basename(p).startswith("."))
    if os.path.isfile(base_path):
        files.insert(0, base_path)
    return files


UPDATES_SUFFIX = ".updates"


def updates_path(base_path: str, workflow_id: Optional[str]) -> str:
    """``<dir>/<stem>_<workflow_id>.jsonl.updates``: the update log of ``Flowcept.db`` writes.

    Beside the consolidated file, but no consolidation source (its name does not end in the
    buffer suffix), so re-consolidating a workflow neither drops nor deletes the updates.
    """
    from flowcept.consolidation import consolidated_path

    return consolidated_path(base_path, workflow_id or "no-workflow") + UPDATES_SUFFIX


def update_files(base_path: str, workflow_id: Optional[str] = None) -> List[str]:
    """The update logs under the base path (one workflow's when an id is given)."""
    if workflow_id is not None:
        path = updates_path(base_path, workflow_id)
        return [path] if os.path.exists(path) else []
    from flowcept.transport import split_base_path

    directory, stem, suffix = split_base_path(base_path)
    pattern = glob.escape(os.path.join(directory, f"{stem}_")) + "*" + glob.escape(suffix + UPDATES_SUFFIX)
    return sorted(glob.glob(pattern))


def append_update(base_path: str, record: Dict[str, Any]) -> str:
    """Append one record to its workflow's update log (whole line, under an exclusive lock)."""
    import fcntl

    from flowcept.serialization import dumps_line

    path = updates_path(base_path, record.get("workflow_id"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = dumps_line(record)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return path


class FileStore:
    """The records of the workflows under a base path, merged as MongoDB would hold them."""

    def __init__(self, base_path: str):
        self.base_path = base_path

    def collection(self, name: str, query: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
        """Every document of a collection (``tasks``, ``workflows``, ``telemetry``, ``objects``).

        An equality on ``workflow_id`` in the filter limits reading to that workflow's files.
        """
        from flowcept.sinks.mongodb import COLLECTIONS, ID_FIELDS

        wanted_type = {v: k for k, v in COLLECTIONS.items()}.get(name)
        if wanted_type is None:
            raise UnsupportedQueryError(f"unknown collection '{name}' (known: {', '.join(COLLECTIONS.values())})")
        workflow_id = (query or {}).get("workflow_id")
        files = workflow_files(self.base_path, workflow_id if isinstance(workflow_id, str) else None)
        id_field = ID_FIELDS[name]
        store: Dict[Any, Dict[str, Any]] = {}
        anonymous = 0
        for record in self._records(files):
            if (record.get("type") or "task") != wanted_type:
                continue
            key = record.get(id_field)
            if key is None:
                anonymous += 1
                key = ("#", anonymous)
            merge_into(store, key, record)
        # Updates made through Flowcept.db come last, in the order they were made; a workflow's
        # fields (status included) apply as given, as MongoDB's update does.
        for record in self._records(update_files(self.base_path, workflow_id if isinstance(workflow_id, str)
                                                 else None)):
            if (record.get("type") or "task") != wanted_type or record.get(id_field) is None:
                continue
            key = record[id_field]
            if name == "workflows" and key in store:
                store[key].update({k: v for k, v in record.items() if v is not None})
            else:
                merge_into(store, key, record)
        return list(store.values())

    @staticmethod
    def _records(files: List[str]) -> Iterable[Dict[str, Any]]:
        import orjson

        from flowcept.consolidation import iter_file_lines, read_records

        for path in files:
            try:
                if path.endswith((".h5", ".hdf5")):
                    yield from read_records(path)
                    continue
                for line in iter_file_lines(path, []):
                    try:
                        record = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(record, dict):
                        yield record
            except FileNotFoundError:
                continue
            except Exception as error:  # an unreadable file costs that file, not the query
                logger.warning("skipped %s: %s", path, error)

    def query(self, collection: str, query: Any = None, projection: Any = None, limit: int = 0,
              sort: SortSpec = None, aggregation: Any = None,
              transform: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
        query = validate_filter(query)
        docs = self.collection(collection, query)
        if transform is not None:
            docs = [transform(d) for d in docs]
        return run_query(docs, query, projection, limit, sort, aggregation)
