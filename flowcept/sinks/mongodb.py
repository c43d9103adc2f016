"""MongoDB sink: live writes from node daemons and bulk loads of finished workflows.

Collections: ``workflows``, ``tasks``, ``telemetry`` and ``objects``, with their indexes created
once per process and database (``ensure_indexes``). Every write is an unordered bulk operation
and idempotent, so replaying a batch (after an outage, or a second load) never duplicates:

- tasks: ``insert_many`` (the fast path, unique index on ``task_id``); a task already stored is
  merged with ``$set`` of the new record's non-null fields (RUNNING then FINISHED gives one
  document). A non-terminal status never replaces a stored FINISHED/ERROR one.
- workflows: upsert by ``workflow_id`` with ``$set`` of non-null fields; the start record's
  status is only set on insert, so an end record written first keeps its FINISHED.
- telemetry and objects: ``insert_many``; a record already stored (same ``telemetry_id`` or
  ``object_id``) is left as it is. A record without an id gets one derived from its content.

``MongoSink.write`` never waits for the database: it appends to memory (or, past
``max_pending`` records, to the disk spool) and a worker thread writes batches of
``batch_size`` records or every ``flush_interval_s``. When the database is down or slow, batches
go to the spool (``flowcept.mongo_spool``) and are replayed in order when it answers again.
``flush()`` and ``close()`` wait at most ``flush_timeout_s`` (default 3 x
``databases.mongodb.timeout_s``, at least 5 s); what is still unwritten then stays in the spool.

Credentials: the URI is used only to connect; logs and records show it through ``redact_uri``,
and a workflow's copy of the settings has its URI redacted before it is stored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import orjson

from flowcept.threads import handled_signals_blocked, start_background

logger = logging.getLogger(__name__)

COLLECTIONS = {"task": "tasks", "workflow": "workflows", "telemetry": "telemetry", "object": "objects"}
TERMINAL_STATUSES = ("FINISHED", "ERROR")
DUPLICATE_KEY = 11000

INDEXES: Dict[str, List[Tuple[str, bool]]] = {
    "tasks": [("task_id", True), ("workflow_id", False), ("campaign_id", False), ("activity_id", False),
              ("status", False), ("started_at", False), ("ended_at", False)],
    "workflows": [("workflow_id", True), ("campaign_id", False), ("name", False), ("started_at", False)],
    "telemetry": [("telemetry_id", True), ("workflow_id", False), ("hostname", False), ("timestamp", False)],
    "objects": [("object_id", True), ("workflow_id", False), ("task_id", False)],
}
ID_FIELDS = {"tasks": "task_id", "workflows": "workflow_id", "telemetry": "telemetry_id", "objects": "object_id"}

_indexed: set = set()
_indexed_lock = threading.Lock()

_USERINFO = re.compile(r"(mongodb(?:\+srv)?://)[^@/\s]*@")


# -- connection -------------------------------------------------------------------------------------

def redact_uri(uri: Optional[str]) -> str:
    """The URI with any ``user:password@`` replaced by ``***@`` (safe to log)."""
    return _USERINFO.sub(r"\1***@", uri or "")


def _redact_text(text: str, uri: Optional[str]) -> str:
    text = _USERINFO.sub(r"\1***@", text)
    if uri:
        match = re.match(r"mongodb(?:\+srv)?://([^@/\s]*)@", uri)
        if match:
            for secret in {match.group(1), *match.group(1).split(":")}:
                if len(secret) >= 3:
                    text = text.replace(secret, "***")
    return text


def mongo_uri(settings: Any) -> str:
    """The URI from ``databases.mongodb.uri``, else built from host and port."""
    uri = settings["databases.mongodb.uri"]
    if uri:
        return uri
    return f"mongodb://{settings['databases.mongodb.host']}:{settings['databases.mongodb.port']}"


def make_client(uri: str, timeout_s: float) -> Any:
    """A pymongo client whose every wait is bounded by ``timeout_s`` (writes: 10x, at least 30 s)."""
    try:
        import pymongo
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("MongoDB support needs pymongo: pip install 'flowcept[mongo]'") from error
    ms = max(1, int(timeout_s * 1000))
    with handled_signals_blocked():  # pymongo's monitor threads inherit the mask (see flowcept.threads)
        return pymongo.MongoClient(uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms,
                                   socketTimeoutMS=max(30000, 10 * ms), appname="flowcept")


class _SharedClients:
    """One MongoClient per (URI, timeout, process), shared by every sink of the process.

    A node daemon makes a sink per workflow; each client would hold its own connection pool and
    monitor threads. Clients are reference-counted and closed when their last user releases them.
    The pid in the key keeps a forked child from using its parent's sockets.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: Dict[Tuple[str, float, int], List[Any]] = {}  # key -> [client, users]

    def acquire(self, uri: str, timeout_s: float) -> Any:
        key = (uri, float(timeout_s), os.getpid())
        with self._lock:
            entry = self._clients.get(key)
            if entry is None:
                entry = self._clients[key] = [make_client(uri, timeout_s), 0]
            entry[1] += 1
            return entry[0]

    def release(self, client: Any) -> None:
        """Drop one use of ``client``; the last release closes it."""
        with self._lock:
            for key, entry in list(self._clients.items()):
                if entry[0] is client:
                    entry[1] -= 1
                    if entry[1] > 0:
                        return
                    del self._clients[key]
                    break
            else:
                return
        with _indexed_lock:  # a later client may reuse this one's id()
            _indexed.difference_update({k for k in _indexed if k[0] == id(client)})
        client.close()

    def users(self, client: Any) -> int:
        """How many holders ``client`` has (0 once closed)."""
        with self._lock:
            return next((entry[1] for entry in self._clients.values() if entry[0] is client), 0)


shared_clients = _SharedClients()


def ensure_indexes(db: Any) -> None:
    """Create the collections' indexes, once per process and database."""
    key = (id(db.client), db.name)
    with _indexed_lock:
        if key in _indexed:
            return
    for collection, specs in INDEXES.items():
        for field, unique in specs:
            db[collection].create_index(field, unique=unique)
    with _indexed_lock:
        _indexed.add(key)


def retryable_errors() -> Tuple[type, ...]:
    """Errors after which a batch is spooled and retried (the database is down or slow)."""
    from pymongo import errors

    return (errors.ConnectionFailure, errors.ExecutionTimeout, errors.WTimeoutError,
            errors.NotPrimaryError, errors.ServerSelectionTimeoutError)


# -- the writes -----------------------------------------------------------------------------------

def _redact_record(record: Dict[str, Any]) -> Dict[str, Any]:
    settings = record.get("flowcept_settings")
    if isinstance(settings, dict):
        mongo = (settings.get("databases") or {}).get("mongodb")
        if isinstance(mongo, dict) and mongo.get("uri"):
            record = dict(record)
            settings = dict(settings)
            databases = dict(settings["databases"])
            databases["mongodb"] = dict(mongo, uri=redact_uri(mongo["uri"]))
            settings["databases"] = databases
            record["flowcept_settings"] = settings
    return record


def _content_id(record: Dict[str, Any]) -> str:
    return hashlib.blake2b(orjson.dumps(record, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()


def _non_null(record: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in record.items() if v is not None and k != "_id"}


def split_by_collection(records: Iterable[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Group records by target collection (unknown types go to tasks, like the reference)."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for record in records:
        if not isinstance(record, dict):
            continue
        collection = COLLECTIONS.get(record.get("type") or "task", "tasks")
        groups.setdefault(collection, []).append(record)
    return groups


def _merge_same_ids(records: List[Dict[str, Any]], id_field: str) -> List[Dict[str, Any]]:
    """One document per id within a batch: later non-null fields win (stale statuses excepted)."""
    merged: Dict[Any, Dict[str, Any]] = {}
    for record in records:
        if record.get(id_field) is None:
            record = dict(record, **{id_field: _content_id(record)})
        key = record[id_field]
        previous = merged.get(key)
        if previous is None:
            merged[key] = _non_null(record)
            continue
        update = _non_null(record)
        if previous.get("status") in TERMINAL_STATUSES and update.get("status") not in TERMINAL_STATUSES:
            update.pop("status", None)
        previous.update(update)
    return list(merged.values())


def _duplicate_indexes(error: Any) -> Tuple[List[int], List[dict]]:
    duplicates, others = [], []
    for item in error.details.get("writeErrors", []):
        (duplicates if item.get("code") == DUPLICATE_KEY else others).append(item)
    return [item["index"] for item in duplicates], others


def _insert_new(collection: Any, docs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """insert_many unordered; returns the documents whose id was already stored."""
    from pymongo.errors import BulkWriteError

    if not docs:
        return []
    try:
        collection.insert_many([dict(d) for d in docs], ordered=False)
        return []
    except BulkWriteError as error:
        indexes, others = _duplicate_indexes(error)
        for item in others:
            logger.error("MongoDB rejected a %s document: %s", collection.name, item.get("errmsg"))
        return [docs[i] for i in indexes]


def _write_tasks(collection: Any, records: List[Dict[str, Any]]) -> None:
    from pymongo import UpdateOne

    docs = _merge_same_ids(records, "task_id")
    existing = _insert_new(collection, docs)
    if not existing:
        return
    merges, statuses = [], []
    for doc in existing:
        fields = dict(doc)
        status = fields.get("status")
        if status is not None and status not in TERMINAL_STATUSES:
            fields.pop("status")
            statuses.append(UpdateOne({"task_id": doc["task_id"], "status": {"$nin": list(TERMINAL_STATUSES)}},
                                      {"$set": {"status": status}}))
        merges.append(UpdateOne({"task_id": doc["task_id"]}, {"$set": fields}, upsert=True))
    collection.bulk_write(merges, ordered=False)
    if statuses:
        collection.bulk_write(statuses, ordered=False)


def _write_workflows(collection: Any, records: List[Dict[str, Any]]) -> None:
    from pymongo import UpdateOne

    operations = []
    for record in records:
        fields = _non_null(_redact_record(record))
        if fields.get("workflow_id") is None:
            logger.error("a workflow record without workflow_id was not written")
            continue
        update: Dict[str, Any] = {"$set": fields}
        if fields.get("ended_at") is None and "status" in fields:
            update["$setOnInsert"] = {"status": fields.pop("status")}
        operations.append(UpdateOne({"workflow_id": fields["workflow_id"]}, update, upsert=True))
    if operations:
        collection.bulk_write(operations, ordered=True)  # start before end, as they came


def _write_immutable(collection: Any, records: List[Dict[str, Any]], id_field: str) -> None:
    docs = _merge_same_ids(records, id_field)
    _insert_new(collection, docs)  # already stored: the same record, left as it is


def write_records(db: Any, records: List[Dict[str, Any]]) -> int:
    """Write a batch into its collections (idempotent); returns the records handled.

    Raises the pymongo error when the database is unreachable (the caller spools the batch).
    A document the server cannot encode or refuses is logged and skipped, never retried.
    """
    from bson.errors import InvalidDocument

    groups = split_by_collection(records)
    for name, group in groups.items():
        collection = db[name]
        writer = {"tasks": _write_tasks, "workflows": _write_workflows}.get(name)
        try:
            _dispatch(collection, group, writer)
        except (InvalidDocument, OverflowError):
            for record in group:  # find the bad one(s): rare, so one by one is fine
                try:
                    _dispatch(collection, [record], writer)
                except (InvalidDocument, OverflowError) as error:
                    from flowcept.serialization import dumps

                    logger.error("record not storable in MongoDB (%s); stored as sanitized JSON", error)
                    _dispatch(collection, [orjson.loads(dumps(_safe_ints(record)))], writer)
    return sum(len(g) for g in groups.values())


def apply_updates(db: Any, records: List[Dict[str, Any]]) -> None:
    """Apply explicit ``Flowcept.db`` updates.

    Tasks merge as the sink merges them; a workflow's fields, status included, are set as given.
    """
    from pymongo import UpdateOne

    tasks = [r for r in records if r.get("type") != "workflow"]
    operations = []
    for record in records:
        if record.get("type") == "workflow" and record.get("workflow_id") is not None:
            fields = _non_null(_redact_record(record))
            operations.append(UpdateOne({"workflow_id": fields["workflow_id"]}, {"$set": fields}, upsert=True))
    if tasks:
        write_records(db, tasks)
    if operations:
        db["workflows"].bulk_write(operations, ordered=True)


def _dispatch(collection: Any, group: List[Dict[str, Any]], writer: Any) -> None:
    if writer is not None:
        writer(collection, group)
    else:
        _write_immutable(collection, group, ID_FIELDS[collection.name])


def _safe_ints(value: Any) -> Any:
    """Integers BSON cannot hold (beyond 64 bits) become strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(2 ** 63) <= value < 2 ** 63:
        return str(value)
    if isinstance(value, dict):
        return {k: _safe_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe_ints(v) for v in value]
    return value


# -- the sink -----------------------------------------------------------------------------------

def default_spool_dir(settings: Any) -> str:
    """databases.mongodb.spool_dir, else flowcept_mongo_spool/ beside the buffer files."""
    spool_dir = settings["databases.mongodb.spool_dir"]
    if spool_dir:
        return spool_dir
    base = os.path.abspath(settings["project.dump_buffer.path"])
    return os.path.join(os.path.dirname(base), "flowcept_mongo_spool")


class MongoSink:
    """Writes record batches to MongoDB from a worker thread; spools to disk during outages."""

    def __init__(self, settings: Any = None, uri: Optional[str] = None, db: Optional[str] = None,
                 batch_size: int = 5000, flush_interval_s: float = 0.5, max_pending: int = 200000,
                 spool_dir: Optional[str] = None, spool_max_bytes: Optional[int] = None,
                 timeout_s: Optional[float] = None, flush_timeout_s: Optional[float] = None,
                 retry_max_s: float = 5.0, **_file_sink_options: Any):
        # The daemon builds every sink as sink_class(name)(path, fsync=...): a path (and file-sink
        # options such as fsync) means "the settings of this process".
        if settings is None or isinstance(settings, (str, os.PathLike)):
            from flowcept.settings import load_settings

            settings = load_settings()
        self.uri = uri or mongo_uri(settings)
        self.db_name = db or settings["databases.mongodb.db"]
        self.timeout_s = settings["databases.mongodb.timeout_s"] if timeout_s is None else timeout_s
        self.flush_timeout_s = flush_timeout_s if flush_timeout_s is not None else max(5.0, 3 * self.timeout_s)
        self.batch_size = max(1, batch_size)
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.retry_max_s = retry_max_s
        from flowcept.mongo_spool import Spool

        self.spool = Spool(spool_dir or default_spool_dir(settings),
                           settings["databases.mongodb.spool_max_bytes"] if spool_max_bytes is None
                           else spool_max_bytes)
        self.written = 0
        self.spooled = 0
        self.failures = 0
        self._client = shared_clients.acquire(self.uri, self.timeout_s)
        self._db = self._client[self.db_name]
        self._pending: List[Dict[str, Any]] = []
        self._busy = False
        self._closed = False
        self._flush_requested = False
        self._next_retry = 0.0
        self._backoff = 0.0
        self._cond = threading.Condition()
        self._thread = start_background(threading.Thread(target=self._run, name="flowcept-mongo-sink",
                                                         daemon=True))
        logger.info("MongoDB sink to %s/%s (spool %s)", redact_uri(self.uri), self.db_name, self.spool.directory)

    @property
    def target(self) -> str:
        return f"{redact_uri(self.uri)}/{self.db_name}"

    # Called from any thread; returns at once (memory append, or one spool segment when full).
    def write(self, records: List[Dict[str, Any]]) -> None:
        if not records:
            return
        overflow: List[Dict[str, Any]] = []
        with self._cond:
            if self._closed:
                raise RuntimeError("write() on a closed MongoSink")
            if len(self._pending) + len(records) > self.max_pending:
                # The database is slower than the producer: older records go first, to disk.
                overflow, self._pending = self._pending + list(records), []
            else:
                self._pending.extend(records)
                if len(self._pending) >= self.batch_size:
                    self._cond.notify_all()
        if overflow and self.spool.append(overflow):
            self.spooled += len(overflow)

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        """Wait (bounded) until every record written so far is in MongoDB; False if not yet."""
        deadline = time.monotonic() + (self.flush_timeout_s if timeout_s is None else timeout_s)
        with self._cond:
            self._flush_requested = True
            self._next_retry = 0.0
            self._cond.notify_all()
            while self._pending or self._busy or self._flush_requested:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.1))
        return self.spool.is_empty()

    def flush_async(self) -> None:
        """Ask the worker to write now, without waiting for it.

        The daemon's periodic flush must not hold its writer thread for ``timeout_s`` while the
        database is down; ``close()`` still waits.
        """
        self.flush(timeout_s=0)

    def close(self) -> None:
        """Flush (bounded), stop the worker, spool what is left, close the client; idempotent."""
        if self._closed:
            return
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(self.flush_timeout_s)
        with self._cond:
            left, self._pending = self._pending, []
        if left and self.spool.append(left):
            self.spooled += len(left)
        if self.spool.refused_records:
            logger.error("%d record(s) could not be spooled for MongoDB (spool full)", self.spool.refused_records)
        shared_clients.release(self._client)

    def counters(self) -> Dict[str, int]:
        return {"written": self.written, "spooled": self.spooled, "failures": self.failures,
                "pending": len(self._pending), "spool_refused": self.spool.refused_records}

    # -- worker thread only -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                wait_until = time.monotonic() + self.flush_interval_s
                while (not self._closed and not self._flush_requested and len(self._pending) < self.batch_size):
                    left = wait_until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed and not self._pending:
                    self._flush_requested = False
                    self._cond.notify_all()
                    return
                batch, self._pending = self._pending, []
                requested = self._flush_requested
                self._busy = True
            try:
                self._deliver(batch, force_retry=requested)
            except Exception:  # never let the worker die: the batch is spooled or logged
                logger.exception("MongoDB sink worker error")
            with self._cond:
                self._busy = False
                if requested and not self._pending:
                    self._flush_requested = False
                self._cond.notify_all()

    def _deliver(self, batch: List[Dict[str, Any]], force_retry: bool = False) -> None:
        errors = retryable_errors()
        if self.spool.is_empty() and batch:
            if time.monotonic() >= self._next_retry or force_retry:
                try:
                    ensure_indexes(self._db)
                    self.written += write_records(self._db, batch)
                    self._backoff = 0.0
                    return
                except errors as error:
                    self._note_failure(error)
            if self.spool.append(batch):
                self.spooled += len(batch)
            return
        if batch and self.spool.append(batch):
            self.spooled += len(batch)
        if self.spool.is_empty() or (time.monotonic() < self._next_retry and not force_retry):
            return
        try:
            ensure_indexes(self._db)
            if self.spool.drain(self._write_counted):
                logger.info("MongoDB at %s is back: spool drained", self.target)
            self._backoff = 0.0
        except errors as error:
            self._note_failure(error)

    def _write_counted(self, records: List[Dict[str, Any]]) -> None:
        self.written += write_records(self._db, records)

    def _note_failure(self, error: Exception) -> None:
        self.failures += 1
        self._backoff = min(self.retry_max_s, max(0.25, self._backoff * 2))
        self._next_retry = time.monotonic() + self._backoff
        logger.warning("MongoDB at %s unavailable (%s); records spooled to %s, retry in %.1f s", self.target,
                       _redact_text(str(error), self.uri)[:300], self.spool.directory, self._backoff)


# -- bulk load of a finished workflow -------------------------------------------------------------------

def _workflow_files(base_path: str, workflow_id: str) -> List[str]:
    from flowcept.consolidation import consolidated_path, find_sources

    sources = find_sources(base_path, workflow_id)
    h5 = consolidated_path(base_path, workflow_id, "hdf5")
    if os.path.exists(h5):
        sources.insert(0, h5)
    return sources


def iter_workflow_records(base_path: str, workflow_id: str) -> Iterable[Dict[str, Any]]:
    """Every record of ``workflow_id`` in its files (consolidated or not), streaming JSONL."""
    from flowcept.consolidation import iter_file_lines, read_records

    for path in _workflow_files(base_path, workflow_id):
        if path.endswith((".h5", ".hdf5")):
            try:
                records: Iterable[Dict[str, Any]] = read_records(path)
            except Exception as error:
                logger.error("cannot read %s: %s", path, error)
                continue
        else:
            records = _parse_lines(iter_file_lines(path, []))
        for record in records:
            if isinstance(record, dict) and record.get("workflow_id") == workflow_id:
                yield record


def _updates_of(base_path: str, workflow_id: str) -> str:
    from flowcept.embedded_query import updates_path

    return updates_path(base_path, workflow_id)


def iter_workflow_updates(base_path: str, workflow_id: str) -> Iterable[Dict[str, Any]]:
    """The ``Flowcept.db`` updates of ``workflow_id`` made without MongoDB, in order."""
    from flowcept.consolidation import iter_file_lines

    path = _updates_of(base_path, workflow_id)
    if not os.path.exists(path):
        return
    for record in _parse_lines(iter_file_lines(path, [])):
        if isinstance(record, dict) and record.get("workflow_id") == workflow_id:
            yield record


def _parse_lines(lines: Iterable[bytes]) -> Iterable[Dict[str, Any]]:
    for line in lines:
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError:
            continue


def load_workflow(base_path: str, workflow_id: str, settings: Any = None, batch_size: int = 10000) -> int:
    """Bulk-load a workflow's records from its files into MongoDB; returns the records loaded.

    Idempotent (records already stored are merged, not duplicated). When the database does not
    answer within ``databases.mongodb.timeout_s`` the remaining records go to the spool and are
    written by the next sink or load that reaches the database; the call then returns.
    """
    if settings is None:
        from flowcept.settings import load_settings

        settings = load_settings()
    from flowcept.mongo_spool import Spool

    uri = mongo_uri(settings)
    client = shared_clients.acquire(uri, settings["databases.mongodb.timeout_s"])
    spool = Spool(default_spool_dir(settings), settings["databases.mongodb.spool_max_bytes"])
    db = client[settings["databases.mongodb.db"]]
    loaded = 0
    down = False
    errors = retryable_errors()
    try:
        try:
            ensure_indexes(db)
            spool.drain(lambda records: write_records(db, records))
        except errors as error:
            down = True
            logger.warning("MongoDB at %s unavailable (%s); workflow %s is spooled to %s", redact_uri(uri),
                           _redact_text(str(error), uri)[:300], workflow_id, spool.directory)
        batch: List[Dict[str, Any]] = []
        for record in iter_workflow_records(base_path, workflow_id):
            batch.append(record)
            if len(batch) >= batch_size:
                down = _load_batch(db, spool, batch, down, errors, uri)
                loaded += len(batch)
                batch = []
        if batch:
            down = _load_batch(db, spool, batch, down, errors, uri)
            loaded += len(batch)
        updates = list(iter_workflow_updates(base_path, workflow_id))
        if updates:
            loaded += len(updates)
            if down:
                logger.warning("MongoDB down: %d Flowcept.db update(s) of workflow %s stay in %s only",
                               len(updates), workflow_id, os.path.basename(_updates_of(base_path, workflow_id)))
            else:
                try:
                    apply_updates(db, updates)
                except errors as error:
                    logger.warning("MongoDB at %s stopped answering (%s); updates not loaded", redact_uri(uri),
                                   _redact_text(str(error), uri)[:300])
    finally:
        shared_clients.release(client)
    logger.info("loaded %d record(s) of workflow %s into %s", loaded, workflow_id, redact_uri(uri))
    return loaded


def _load_batch(db: Any, spool: Any, batch: List[Dict[str, Any]], down: bool, errors: Tuple[type, ...],
                uri: str) -> bool:
    if not down:
        try:
            write_records(db, batch)
            return False
        except errors as error:
            logger.warning("MongoDB at %s stopped answering (%s); spooling", redact_uri(uri),
                           _redact_text(str(error), uri)[:300])
    spool.append(batch)
    return True
