"""Where report input comes from: a JSONL file, in-memory records, or the database/embedded store.

Exactly one input mode is chosen per call (``jsonl``, ``records`` or ``db``). Files are streamed
line by line so a report of a million-task workflow never holds the whole file in memory; the
database mode asks ``Flowcept.db`` (MongoDB or the embedded store on disk) and falls back to the
consolidated files under ``project.dump_buffer.path`` when no database API is available.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import orjson

logger = logging.getLogger(__name__)

INPUT_JSONL = "jsonl"
INPUT_RECORDS = "records"
INPUT_DB = "db"


def iter_jsonl(path: str) -> Iterator[Dict[str, Any]]:
    """Yield the records of a JSONL file, streaming; torn or corrupt lines are skipped and logged."""
    bad = 0
    loads = orjson.loads
    with open(path, "rb") as handle:
        for line in handle:
            try:
                record = loads(line)
            except orjson.JSONDecodeError:
                if line.strip():
                    bad += 1
                continue
            if type(record) is dict:
                yield record
            else:
                bad += 1
    if bad:
        logger.warning("skipped %d torn or corrupt line(s) in %s", bad, path)


def iter_path(path: str) -> Iterator[Dict[str, Any]]:
    """Yield the records of a JSONL (streamed) or HDF5 Flowcept file."""
    if path.endswith((".h5", ".hdf5")):
        from flowcept.consolidation import read_records

        yield from read_records(path)
        return
    yield from iter_jsonl(path)


def select_input(input_jsonl_path: Optional[str] = None, records: Optional[List[Dict[str, Any]]] = None,
                 workflow_id: Optional[str] = None, campaign_id: Optional[str] = None
                 ) -> Tuple[str, Iterable[Dict[str, Any]]]:
    """Validate the input selection and return ``(input_mode, records iterable)``.

    Raises ValueError when no mode or more than one mode is selected, FileNotFoundError when the
    JSONL path does not exist.
    """
    chosen = [name for name, given in (("input_jsonl_path", input_jsonl_path is not None),
                                       ("records", records is not None),
                                       ("workflow_id/campaign_id",
                                        workflow_id is not None or campaign_id is not None)) if given]
    if len(chosen) != 1:
        raise ValueError(
            "select exactly one report input: input_jsonl_path, records, or workflow_id/campaign_id "
            f"(database query mode); got {', '.join(chosen) if chosen else 'none'}")
    if input_jsonl_path is not None:
        path = os.fspath(input_jsonl_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"report input file '{path}' was not found")
        return INPUT_JSONL, _Reiterable(lambda: iter_path(path))
    if records is not None:
        if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
            raise ValueError("records must be a list of record dicts")
        return INPUT_RECORDS, [r for r in records if isinstance(r, dict)]
    return INPUT_DB, query_records(workflow_id=workflow_id, campaign_id=campaign_id)


class _Reiterable:
    """An iterable that re-opens its source on every iteration (streams, never caches)."""

    def __init__(self, factory: Any):
        self._factory = factory

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return iter(self._factory())


def query_records(workflow_id: Optional[str] = None, campaign_id: Optional[str] = None) -> List[Dict[str, Any]]:
    """The workflow, task and telemetry records of a workflow or a campaign, from the database API.

    Uses ``Flowcept.db`` (MongoDB, or the embedded store on disk); without a database API module,
    reads the consolidated/per-process files of the dump buffer path directly.
    """
    try:
        from flowcept.flowcept_api.db_api import DBAPI  # noqa: F401  (presence check only)
    except ImportError:
        logger.info("no database API module; reading the workflow files on disk")
        return _records_from_files(workflow_id, campaign_id)
    try:
        out = _records_from_db(workflow_id, campaign_id)
    except Exception as error:  # database down or not configured: the files on disk still hold the run
        logger.warning("database query failed (%s); reading the workflow files on disk", error)
        out = []
    return out or _records_from_files(workflow_id, campaign_id)


def _records_from_db(workflow_id: Optional[str], campaign_id: Optional[str]) -> List[Dict[str, Any]]:
    from flowcept.flowcept_api.flowcept_controller import Flowcept

    db = Flowcept.db
    filt: Dict[str, Any] = {}
    if workflow_id is not None:
        filt["workflow_id"] = workflow_id
    if campaign_id is not None:
        filt["campaign_id"] = campaign_id
    workflows = list(_call(db.workflow_query, filt) or [])
    workflow_ids = {w.get("workflow_id") for w in workflows if isinstance(w, dict)}
    if workflow_id is not None:
        workflow_ids.add(workflow_id)
    task_filter = dict(filt) if workflow_id is not None or not workflow_ids else \
        {"workflow_id": {"$in": sorted(i for i in workflow_ids if i)}}
    tasks = list(_call(db.task_query, task_filter) or [])
    telemetry: List[Dict[str, Any]] = []
    query = getattr(db, "query", None)
    if query is not None and workflow_ids:
        try:
            telemetry = list(query({"workflow_id": {"$in": sorted(i for i in workflow_ids if i)}},
                                   collection="telemetry") or [])
        except Exception as error:  # telemetry is optional in a report
            logger.debug("telemetry query failed: %s", error)
    out = [dict(w, type="workflow") for w in workflows if isinstance(w, dict)]
    out.extend(dict(t, type=t.get("type", "task")) for t in tasks if isinstance(t, dict))
    out.extend(dict(t, type="telemetry") for t in telemetry if isinstance(t, dict))
    return out


def _call(method: Any, filt: Dict[str, Any]) -> Any:
    try:
        return method(filter=filt)
    except TypeError:
        return method(filt)


def _records_from_files(workflow_id: Optional[str], campaign_id: Optional[str]) -> List[Dict[str, Any]]:
    """Read a workflow (or every workflow of a campaign) from the files under the dump buffer path."""
    from flowcept.flowcept_api.flowcept_controller import Flowcept

    if workflow_id is not None:
        records = Flowcept.read_buffer_file(workflow_id=workflow_id)
        if campaign_id is not None:
            records = [r for r in records if r.get("campaign_id") in (None, campaign_id)]
        return records
    from flowcept.settings import load_settings
    from flowcept.transport import split_base_path

    base = load_settings()["project.dump_buffer.path"]
    directory, stem, suffix = split_base_path(base)
    workflow_ids: List[str] = []
    candidates = [base] + sorted(glob.glob(os.path.join(directory, f"{glob.escape(stem)}_*{suffix}")))
    for path in candidates:
        if not os.path.isfile(path):
            continue
        for record in iter_jsonl(path):
            if record.get("campaign_id") == campaign_id and record.get("workflow_id") not in workflow_ids:
                workflow_ids.append(record.get("workflow_id"))
    if not workflow_ids:
        raise ValueError(f"no workflow of campaign '{campaign_id}' was found under {directory}")
    out: List[Dict[str, Any]] = []
    for wid in workflow_ids:
        out.extend(Flowcept.read_buffer_file(workflow_id=wid))
    return out
