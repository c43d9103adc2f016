"""W3C PROV-JSON export: the workflow's tasks, data and agents in the standard provenance model.

Mapping (one bundle per workflow, so a campaign is one document with several bundles):

- task → ``activity`` (start/end time, activity id, status, host, rank, subtype);
- each ``used``/``generated`` value → an ``entity`` named by its key and a hash of its value, so a
  value one task generated and another used is the same entity and the data flow shows;
  ``used`` and ``wasGeneratedBy`` relations carry the key as ``prov:role``;
- rank (or host:pid when there is no rank), host and user → ``agent``; a task
  ``wasAssociatedWith`` its rank agent under the workflow's ``prov:Plan``; ranks
  ``actedOnBehalfOf`` their host agents and the user;
- ``parent_task_id`` → ``wasInformedBy`` (child informed by parent);
- the workflow → a ``prov:Plan`` entity inside its bundle, and at the top level an entity of
  type ``prov:Bundle`` with the workflow's identity, attributed to its user.

The document is plain JSON (no dependency on the ``prov`` package); ``prov`` reads it back.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
from typing import Any, Dict, Iterable, List, Optional

import orjson

logger = logging.getLogger(__name__)

NAMESPACE = "https://flowcept.org/ns/"
MAX_VALUE_CHARS = 1000
_PREFIXES = {"flowcept": NAMESPACE, "xsd": "http://www.w3.org/2001/XMLSchema#",
             "prov": "http://www.w3.org/ns/prov#"}


def _local(text: Any) -> str:
    """A QName local part: letters, digits, '-', '_', '.' kept; anything else hex-escaped."""
    out = []
    for ch in str(text):
        if ch.isascii() and (ch.isalnum() or ch in "-_."):
            out.append(ch)
        else:
            out.append(f"_x{ord(ch):X}_")
    return "".join(out) or "_"


def _qn(kind: str, value: Any) -> str:
    return f"flowcept:{kind}_{_local(value)}"


def _qname_value(text: str) -> Dict[str, str]:
    return {"$": text, "type": "xsd:QName"}


def _time(epoch: Any) -> Optional[str]:
    if not isinstance(epoch, (int, float)):
        return None
    try:
        return _dt.datetime.fromtimestamp(epoch, tz=_dt.timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


def _literal(value: Any) -> Any:
    """A PROV-JSON attribute value: scalars as themselves, anything else as JSON text (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool) or isinstance(value, str):
        return value if not isinstance(value, str) or len(value) <= MAX_VALUE_CHARS \
            else value[:MAX_VALUE_CHARS] + "…"
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else str(value)
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    try:
        text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "…"


def _value_id(key: Any, value: Any) -> str:
    try:
        blob = orjson.dumps([str(key), value], option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS)
    except TypeError:
        blob = repr((str(key), value)).encode()
    return f"flowcept:data_{_local(key)[:40]}_{hashlib.sha1(blob).hexdigest()[:16]}"


class _Container:
    """One PROV-JSON container (document top level or a bundle) being filled."""

    def __init__(self) -> None:
        self.sections: Dict[str, Dict[str, Any]] = {}
        self._counter = 0

    def element(self, section: str, identifier: str, attrs: Dict[str, Any]) -> None:
        bucket = self.sections.setdefault(section, {})
        if identifier in bucket:
            bucket[identifier].update({k: v for k, v in attrs.items() if k not in bucket[identifier]})
        else:
            bucket[identifier] = {k: v for k, v in attrs.items() if v is not None}

    def relation(self, section: str, attrs: Dict[str, Any]) -> None:
        self._counter += 1
        self.sections.setdefault(section, {})[f"_:{section[:3]}{self._counter}"] = \
            {k: v for k, v in attrs.items() if v is not None}

    def as_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in self.sections.items() if v}


def to_prov_document(records: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """The PROV-JSON document (a dict) of the given workflow/task records."""
    top = _Container()
    bundles: Dict[str, _Container] = {}
    workflows: Dict[str, Dict[str, Any]] = {}
    users: Dict[str, str] = {}

    def bundle_of(wid: Any) -> _Container:
        key = str(wid) if wid is not None else "unknown"
        container = bundles.get(key)
        if container is None:
            container = bundles[key] = _Container()
            container.element("entity", _qn("plan", key), {"prov:type": _qname_value("prov:Plan"),
                                                          "flowcept:workflow_id": key})
        return container

    for record in records:
        kind = record.get("type", "task")
        if kind == "workflow":
            merged = workflows.setdefault(str(record.get("workflow_id")), {})
            merged.update({k: v for k, v in record.items() if v is not None})
        elif kind == "task":
            _add_task(bundle_of(record.get("workflow_id")), record, users)

    for wid, wf in workflows.items():
        container = bundle_of(wid)
        container.element("entity", _qn("plan", wid), {"prov:label": _literal(wf.get("name") or wid)})
    for wid in bundles:
        wf = workflows.get(wid, {})
        attrs = {"prov:type": _qname_value("prov:Bundle"), "flowcept:workflow_id": wid,
                 "prov:label": _literal(wf.get("name") or wid), "flowcept:status": _literal(wf.get("status")),
                 "flowcept:campaign_id": _literal(wf.get("campaign_id")),
                 "flowcept:started_at": _time(wf.get("started_at")),
                 "flowcept:ended_at": _time(wf.get("ended_at")),
                 "flowcept:world_size": wf.get("world_size"),
                 "flowcept:flowcept_version": _literal(wf.get("flowcept_version"))}
        if wf.get("hosts"):
            attrs["flowcept:hosts"] = _literal(wf["hosts"])
        top.element("entity", _qn("workflow", wid), {k: v for k, v in attrs.items() if v is not None})
        user = wf.get("user")
        if user:
            users[str(user)] = _qn("user", user)
            top.relation("wasAttributedTo", {"prov:entity": _qn("workflow", wid),
                                             "prov:agent": _qn("user", user)})
    for user, qn in users.items():
        top.element("agent", qn, {"prov:type": _qname_value("prov:Person"), "prov:label": user})
    document: Dict[str, Any] = {"prefix": dict(_PREFIXES)}
    document.update(top.as_dict())
    if bundles:
        document["bundle"] = {_qn("workflow", wid): c.as_dict() for wid, c in bundles.items()}
    return document


def _add_task(container: _Container, task: Dict[str, Any], users: Dict[str, str]) -> None:
    task_id = task.get("task_id")
    if task_id is None:
        return
    act = _qn("task", task_id)
    wid = str(task.get("workflow_id")) if task.get("workflow_id") is not None else "unknown"
    attrs: Dict[str, Any] = {
        "prov:startTime": _time(task.get("started_at")), "prov:endTime": _time(task.get("ended_at")),
        "prov:type": _qname_value("flowcept:Task"), "prov:label": _literal(task.get("activity_id")),
        "flowcept:task_id": str(task_id), "flowcept:activity_id": _literal(task.get("activity_id")),
        "flowcept:status": _literal(task.get("status")), "flowcept:subtype": _literal(task.get("subtype")),
        "flowcept:hostname": _literal(task.get("hostname")), "flowcept:rank": task.get("rank"),
        "flowcept:pid": task.get("pid"), "flowcept:group_id": _literal(task.get("group_id")),
        "flowcept:job_id": _literal(task.get("job_id")),
    }
    if task.get("stderr"):
        attrs["flowcept:stderr"] = _literal(task.get("stderr"))
    container.element("activity", act, {k: v for k, v in attrs.items() if v is not None})
    ended = _time(task.get("ended_at"))
    started = _time(task.get("started_at"))
    for direction, section, time_key in (("used", "used", started), ("generated", "wasGeneratedBy", ended)):
        values = task.get(direction)
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            entity = _value_id(key, value)
            container.element("entity", entity, {"prov:label": str(key), "prov:value": _literal(value),
                                                 "flowcept:name": str(key)})
            container.relation(section, {"prov:activity": act, "prov:entity": entity,
                                         "prov:role": _qname_value(f"flowcept:{_local(key)}"),
                                         "prov:time": time_key})
    host = task.get("hostname") or task.get("node_name")
    rank = task.get("rank")
    if rank is not None:
        agent = _qn("rank", f"{wid}_{rank}")
        agent_attrs: Dict[str, Any] = {"prov:type": _qname_value("prov:SoftwareAgent"),
                                       "prov:label": f"rank {rank}", "flowcept:rank": rank}
    elif host is not None or task.get("pid") is not None:
        agent = _qn("process", f"{host}_{task.get('pid')}")
        agent_attrs = {"prov:type": _qname_value("prov:SoftwareAgent"),
                       "prov:label": f"{host}:{task.get('pid')}"}
    else:
        agent = None
    if agent is not None:
        new_agent = agent not in container.sections.get("agent", {})
        if host is not None:
            agent_attrs["flowcept:hostname"] = str(host)
        container.element("agent", agent, agent_attrs)
        container.relation("wasAssociatedWith", {"prov:activity": act, "prov:agent": agent,
                                                 "prov:plan": _qn("plan", wid)})
        if new_agent:
            if host is not None:
                host_agent = _qn("host", host)
                container.element("agent", host_agent, {"prov:type": _qname_value("flowcept:Host"),
                                                        "prov:label": str(host)})
                container.relation("actedOnBehalfOf", {"prov:delegate": agent, "prov:responsible": host_agent})
            user = task.get("user") or task.get("login_name")
            if user:
                users[str(user)] = _qn("user", user)
                container.element("agent", _qn("user", user), {"prov:type": _qname_value("prov:Person"),
                                                               "prov:label": str(user)})
                container.relation("actedOnBehalfOf", {"prov:delegate": agent,
                                                       "prov:responsible": _qn("user", user)})
    parent = task.get("parent_task_id")
    if parent:
        container.relation("wasInformedBy", {"prov:informed": act, "prov:informant": _qn("task", parent)})


def export_prov_json(output_path: Optional[str] = None, input_jsonl_path: Optional[str] = None,
                     records: Optional[List[Dict[str, Any]]] = None, workflow_id: Optional[str] = None,
                     campaign_id: Optional[str] = None, indent: bool = False) -> Dict[str, Any]:
    """Write the PROV-JSON document of a workflow/campaign (same input modes as generate_report).

    Returns ``output_path``, ``input_mode``, ``format`` and counts of activities, entities and agents.
    """
    from flowcept.report.loaders import select_input

    input_mode, source = select_input(input_jsonl_path=input_jsonl_path, records=records,
                                      workflow_id=workflow_id, campaign_id=campaign_id)
    document = to_prov_document(source)
    path = os.path.abspath(os.fspath(output_path) if output_path is not None else "PROVENANCE.prov.json")
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(orjson.dumps(document, option=orjson.OPT_INDENT_2 if indent else 0))
    os.replace(tmp, path)
    counts = {"activities": 0, "entities": 0, "agents": 0}
    for bundle in document.get("bundle", {}).values():
        counts["activities"] += len(bundle.get("activity", {}))
        counts["entities"] += len(bundle.get("entity", {}))
        counts["agents"] += len(bundle.get("agent", {}))
    counts["agents"] += len(document.get("agent", {}))
    logger.info("PROV-JSON written to %s (%d activities)", path, counts["activities"])
    return {"output_path": path, "input_mode": input_mode, "format": "prov-json",
            "bundles": len(document.get("bundle", {})), **counts}
