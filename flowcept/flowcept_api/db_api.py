"""``Flowcept.db``: query, insert and update provenance in MongoDB, or in the files on disk.

With ``databases.mongodb.enabled`` the methods talk to MongoDB (pymongo, bounded by
``databases.mongodb.timeout_s``). Without it (the embedded default) the query methods answer
from the JSONL/HDF5 files of the workflows under ``project.dump_buffer.path``, for the subset of
the MongoDB query language documented in :mod:`flowcept.embedded_query`; both paths merge a
task's or workflow's records the same way, so they give the same answers for the same data.
Settings are read at each call, so a change of ``FLOWCEPT_*`` variables takes effect at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional, Union

from flowcept.embedded_query import (
    FileStore,
    UnsupportedQueryError,
    aggregation_name,
    normalize_aggregation,
    normalize_projection,
    normalize_sort,
    validate_filter,
)
from flowcept.records import TaskObject, WorkflowObject
from flowcept.settings import Settings, load_settings

logger = logging.getLogger(__name__)

#: Operators MongoDB understands beyond the embedded subset; accepted only with MongoDB enabled.
MONGO_ONLY_OPERATORS = {"$regex", "$options", "$elemMatch", "$size", "$all", "$type", "$mod"}


def _collection_name(collection: str) -> str:
    names = {"task": "tasks", "tasks": "tasks", "workflow": "workflows", "workflows": "workflows",
             "telemetry": "telemetry", "object": "objects", "objects": "objects"}
    if collection not in names:
        raise ValueError(f"unknown collection '{collection}' (known: tasks, workflows, telemetry, objects)")
    return names[collection]


def _validate_for_mongo(query: Any) -> Dict[str, Any]:
    """Like validate_filter, but lets MongoDB-only operators through."""
    try:
        return validate_filter(query)
    except UnsupportedQueryError as error:
        if any(f"'{op}'" in str(error) for op in MONGO_ONLY_OPERATORS):
            return query
        raise


class DBAPI:
    """The database API of the seed reference (``Flowcept.db``)."""

    def __init__(self, settings: Optional[Settings] = None):
        self._fixed_settings = settings
        self._clients: Dict[Any, Any] = {}
        self._lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------------
    def _settings(self) -> Settings:
        return self._fixed_settings or load_settings()

    def _mongo(self, settings: Settings) -> Any:
        """The MongoDB database handle when MongoDB is enabled, else None."""
        if not settings["databases.mongodb.enabled"]:
            return None
        from flowcept.sinks.mongodb import ensure_indexes, make_client, mongo_uri

        uri = mongo_uri(settings)
        key = (uri, settings["databases.mongodb.timeout_s"], os.getpid())
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = make_client(uri, settings["databases.mongodb.timeout_s"])
        db = client[settings["databases.mongodb.db"]]
        ensure_indexes(db)
        return db

    def _store(self, settings: Settings) -> FileStore:
        return FileStore(settings["project.dump_buffer.path"])

    def close(self) -> None:
        """Close the MongoDB clients this API opened."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    # -- queries ----------------------------------------------------------------------------------
    def query(self, filter: Optional[Dict[str, Any]] = None, projection: Any = None, limit: int = 0,
              sort: Any = None, aggregation: Any = None, collection: str = "tasks") -> List[Dict[str, Any]]:
        """Documents of ``collection`` matching ``filter`` (MongoDB syntax), without ``_id``.

        ``sort``: ``[(field, 1 | -1), ...]``. ``aggregation``: ``[(op, field), ...]`` with op in
        avg, sum, min, max, count; rows are grouped by the projection fields when given and hold
        the group fields (dotted names as keys) and ``<op>_<field with _ for .>``.
        A filter, sort or aggregation that is not supported raises a ValueError naming it.
        """
        settings = self._settings()
        name = _collection_name(collection)
        db = self._mongo(settings)
        if db is None:
            return self._store(settings).query(name, filter, projection, limit, sort, aggregation)
        query = _validate_for_mongo(filter)
        spec = normalize_projection(projection)
        order = normalize_sort(sort)
        operations = normalize_aggregation(aggregation)
        if limit is None or limit < 0:
            raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
        from pymongo.errors import OperationFailure

        try:
            if operations:
                return self._aggregate(db[name], query, spec, order, operations, limit)
            mongo_projection: Dict[str, int] = dict(spec or {})
            mongo_projection["_id"] = 0
            cursor = db[name].find(query, mongo_projection)
            if order:
                cursor = cursor.sort(order)
            if limit:
                cursor = cursor.limit(limit)
            return list(cursor)
        except OperationFailure as error:
            raise ValueError(f"MongoDB refused the query on {name}: {error.details or error}") from None

    @staticmethod
    def _aggregate(collection: Any, query: Dict[str, Any], spec: Optional[Dict[str, int]], order: List,
                   operations: List, limit: int) -> List[Dict[str, Any]]:
        group_fields = list(spec) if spec else []
        group: Dict[str, Any] = {"_id": {f"g{i}": f"${f}" for i, f in enumerate(group_fields)} or None}
        for operation, field in operations:
            expression: Any
            if operation == "count":
                expression = {"$sum": {"$cond": [{"$gt": [f"${field}", None]}, 1, 0]}}
            else:
                expression = {f"${operation}": f"${field}"}
            group[aggregation_name(operation, field)] = expression
        rows = []
        for row in collection.aggregate([{"$match": query}, {"$group": group}]):
            key = row.pop("_id") or {}
            out = {f: key[f"g{i}"] for i, f in enumerate(group_fields) if key.get(f"g{i}") is not None}
            out.update(row)
            rows.append(out)
        from flowcept.embedded_query import sort_docs

        rows = sort_docs(rows, [(f, 1) for f in group_fields])  # the embedded path's order
        if order:
            rows = sort_docs(rows, order)
        return rows[:limit] if limit else rows

    def task_query(self, filter: Optional[Dict[str, Any]] = None, projection: Any = None, limit: int = 0,
                   sort: Any = None, aggregation: Any = None, remove_json_unserializables: bool = True
                   ) -> List[Dict[str, Any]]:
        """Tasks matching ``filter``; see :meth:`query`."""
        return self.query(filter, projection, limit, sort, aggregation, collection="tasks")

    def workflow_query(self, filter: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
        """Workflows matching ``filter`` (start and end records merged into one document)."""
        return self.query(filter, collection="workflows")

    def get_tasks_from_current_workflow(self) -> List[Dict[str, Any]]:
        """Tasks of the running (or last) workflow of this process."""
        from flowcept.flowcept_api.flowcept_controller import Flowcept

        workflow_id = Flowcept.current_workflow_id
        if workflow_id is None:
            logger.warning("no Flowcept workflow in this process: no current tasks")
            return []
        return self.task_query({"workflow_id": workflow_id})

    def get_workflow_object(self, workflow_id: str) -> Optional[WorkflowObject]:
        """The workflow as a WorkflowObject, or None when it is unknown."""
        found = self.workflow_query({"workflow_id": workflow_id})
        return WorkflowObject.from_dict(found[0]) if found else None

    def telemetry_timeseries(self, filter: Optional[Dict[str, Any]] = None, fields: Optional[List[str]] = None,
                             time_field: str = "timestamp", start: Optional[float] = None,
                             end: Optional[float] = None, limit: int = 0) -> Dict[str, List[Any]]:
        """Columns of telemetry samples in time order: ``{time_field: [...], field: [...], ...}``.

        ``fields`` are dotted paths into the telemetry records (e.g. ``cpu.percent_all``,
        ``gpu.0.power``); a sample without a field gives None in that column. ``start``/``end``
        bound the time field; ``filter`` selects hosts, workflows... (e.g. ``{"hostname": "n1"}``).
        """
        from flowcept.embedded_query import _MISSING, get_path

        query = dict(filter or {})
        bounds = {}
        if start is not None:
            bounds["$gte"] = start
        if end is not None:
            bounds["$lte"] = end
        if bounds:
            query = {"$and": [query, {time_field: bounds}]} if query else {time_field: bounds}
        projection = None
        if fields:
            # Top-level fields only: MongoDB projections do not index arrays (gpu.0.power).
            projection = {f.split(".")[0]: 1 for f in [time_field, "hostname", *fields]}
        docs = self.query(query, projection, limit, [(time_field, 1)], collection="telemetry")
        columns = [time_field, "hostname", *(fields or [])]
        if not fields:
            seen: Dict[str, None] = {}
            for doc in docs:
                seen.update(dict.fromkeys(doc))
            columns = [time_field, *[c for c in seen if c != time_field]]
        out: Dict[str, List[Any]] = {c: [] for c in columns}
        for doc in docs:
            for column in columns:
                value = get_path(doc, column)
                out[column].append(None if value is _MISSING else value)
        return out

    # -- writes -----------------------------------------------------------------------------------
    def insert_or_update_task(self, task: Union[TaskObject, Dict[str, Any]]) -> bool:
        """Insert the task, or merge its non-null fields into the stored one (by task_id)."""
        record = task.to_dict() if isinstance(task, TaskObject) else dict(task)
        record["type"] = "task"
        if not record.get("task_id"):
            raise ValueError("insert_or_update_task needs a task with a task_id")
        return self._write(record)

    def insert_or_update_workflow(self, workflow: Union[WorkflowObject, Dict[str, Any]]) -> bool:
        """Insert the workflow, or merge its non-null fields into the stored one (by workflow_id)."""
        record = workflow.to_dict() if isinstance(workflow, WorkflowObject) else dict(workflow)
        record["type"] = "workflow"
        if not record.get("workflow_id"):
            raise ValueError("insert_or_update_workflow needs a workflow with a workflow_id")
        return self._write(record)

    def _write(self, record: Dict[str, Any]) -> bool:
        import orjson

        from flowcept.serialization import dumps_line
        from flowcept.sinks.mongodb import _redact_record

        record = _redact_record(orjson.loads(dumps_line(record)))  # JSON-safe, URI redacted
        settings = self._settings()
        db = self._mongo(settings)
        if db is not None:
            from flowcept.sinks.mongodb import apply_updates

            apply_updates(db, [record])
            return True
        # Embedded: the workflow's update log, which queries merge last and consolidation keeps.
        from flowcept.embedded_query import append_update

        append_update(settings["project.dump_buffer.path"], record)
        return True

    def delete_workflow_data(self, workflow_id: str) -> Dict[str, int]:
        """Delete a workflow and its tasks, telemetry and objects; returns the counts deleted."""
        if not workflow_id:
            raise ValueError("delete_workflow_data needs a workflow_id")
        settings = self._settings()
        db = self._mongo(settings)
        if db is not None:
            return {name: db[name].delete_many({"workflow_id": workflow_id}).deleted_count
                    for name in ("tasks", "telemetry", "objects", "workflows")}
        from flowcept.embedded_query import workflow_files

        counts = {"tasks": 0, "telemetry": 0, "objects": 0, "workflows": 0, "files": 0}
        store = self._store(settings)
        for name in ("tasks", "telemetry", "objects", "workflows"):
            counts[name] = len(store.collection(name, {"workflow_id": workflow_id}))
        from flowcept.embedded_query import update_files

        base = settings["project.dump_buffer.path"]
        for path in workflow_files(base, workflow_id) + update_files(base, workflow_id):
            try:
                os.unlink(path)
                counts["files"] += 1
            except FileNotFoundError:
                pass
        return counts

    # -- export -----------------------------------------------------------------------------------
    def to_df(self, collection: str = "tasks", filter: Optional[Dict[str, Any]] = None) -> Any:
        """The matching documents as a pandas DataFrame (nested fields as dotted columns)."""
        try:
            import pandas as pd
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError("to_df needs pandas: pip install 'flowcept[dataframe]'") from error
        return pd.json_normalize(self.query(filter, collection=collection), sep=".")

    def dump_to_file(self, collection: str = "tasks", filter: Optional[Dict[str, Any]] = None,
                     output_file: Optional[str] = None, export_format: str = "json",
                     should_zip: bool = False) -> str:
        """Write the matching documents to a JSON (list) or Parquet file; returns its path."""
        export_format = export_format.lower()
        if export_format not in ("json", "parquet"):
            raise ValueError(f"export_format must be json or parquet, got '{export_format}'")
        name = _collection_name(collection)
        output_file = output_file or f"flowcept_{name}_{int(time.time())}.{export_format}"
        docs = self.query(filter, collection=name)
        tmp = f"{output_file}.{os.getpid()}.tmp"
        if export_format == "json":
            from flowcept.serialization import dumps

            with open(tmp, "wb") as handle:
                handle.write(b"[" + b",\n".join(dumps(d) for d in docs) + b"]\n")
        else:
            try:
                import pyarrow  # noqa: F401
            except ModuleNotFoundError as error:
                raise ModuleNotFoundError("parquet export needs pyarrow: pip install pyarrow") from error
            frame = self.to_df(name, filter)
            for column in frame.columns:
                if frame[column].dtype == object:
                    import orjson

                    frame[column] = [v if v is None or isinstance(v, str) else
                                     orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY).decode()
                                     for v in frame[column]]
            frame.to_parquet(tmp, index=False)
        os.replace(tmp, output_file)
        return output_file

    # -- health -----------------------------------------------------------------------------------
    def liveness_test(self) -> bool:
        """True when the database answers a ping within ``databases.mongodb.timeout_s``.

        With MongoDB disabled the files are the database and this is True.
        """
        settings = self._settings()
        if not settings["databases.mongodb.enabled"]:
            return True
        try:
            from flowcept.sinks.mongodb import make_client, mongo_uri

            client = make_client(mongo_uri(settings), settings["databases.mongodb.timeout_s"])
            try:
                client.admin.command("ping")
            finally:
                client.close()
            return True
        except Exception as error:
            from flowcept.sinks.mongodb import _redact_text, mongo_uri

            logger.error("MongoDB liveness test failed: %s",
                         _redact_text(str(error), mongo_uri(settings))[:300])
            return False
