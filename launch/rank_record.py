"""The launcher's own records: the rank's process task and, on global rank 0, the workflow record.

Made as JSON lines; :func:`flowcept.launch.waiter.finish_rank` puts them where consolidation (now
or later, with ``flowcept consolidate``) finds them, always through a temporary name and a rename:
with a node daemon, into the node's one ``<stem>_<wf>_ranks-<node>.jsonl`` (moved there by the
node's starter), else into this launcher's per-process file ``<stem>_<wf>_<host>_<pid>.jsonl``
(:func:`flowcept.transport.process_file_path`). No pipeline, no flusher thread, no controller.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Dict, Optional

from flowcept.ids import next_id
from flowcept.transport import process_file_path, safe_name, split_base_path


def _redacted(tree: Dict[str, Any]) -> Dict[str, Any]:
    """Settings as stored on the workflow record: credentials in URIs never leave the process."""
    mongo = tree.get("databases", {}).get("mongodb", {})
    if isinstance(mongo.get("uri"), str):
        mongo["uri"] = re.sub(r"//[^@/]*@", "//***@", mongo["uri"])
    return tree


def workflow_record(launcher: Any) -> Dict[str, Any]:
    """The workflow record global rank 0 writes (what ``Flowcept(...).start()`` would save)."""
    from flowcept.version import __version__

    settings = launcher.settings
    placement = launcher.placement
    started = time.time()
    record: Dict[str, Any] = {
        "type": "workflow", "workflow_id": launcher.ids["workflow_id"], "campaign_id": launcher.ids["campaign_id"],
        "bundle_exec_id": launcher.ids["bundle_exec_id"], "name": launcher.options.workflow_name,
        "subtype": "flowcept-launch", "status": "RUNNING", "started_at": started,
        "used": {"command": launcher.options.command, "world_size": launcher.size}, "interceptor_ids": [],
        "flowcept_version": __version__, "flowcept_settings": _redacted(settings.as_dict()),
        "user": settings["experiment.user"] or placement.user, "hostname": placement.hostname,
        "job_id": placement.job_id, "step_id": placement.step_id, "world_size": launcher.size,
        "hosts": [placement.hostname], "utc_timestamp": started,
    }
    if settings["telemetry_capture.machine_info"]:
        from flowcept.telemetry import machine_info

        record["machine_info"] = machine_info(settings)
    return record


def process_record(launcher: Any, started_at: float, child_pid: Optional[int]) -> Dict[str, Any]:
    """The rank's process as a task, before its outcome (``waiter.complete_record`` adds it)."""
    command = launcher.options.command
    record: Dict[str, Any] = {"type": "task", "task_id": next_id(), "workflow_id": launcher.ids["workflow_id"],
                              "campaign_id": launcher.ids["campaign_id"]}
    if launcher.options.workflow_name:
        record["workflow_name"] = launcher.options.workflow_name
    record.update({
        "activity_id": os.path.basename(command[0]) if command else "process",
        "subtype": "rank_process",
        "started_at": started_at,
        "ended_at": None,  # placeholders keep the field order of every process task
        "status": None,
        "used": {"command": command, "cwd": os.getcwd(), "rank": launcher.rank, "world_size": launcher.size,
                 "node_name": launcher.placement.node_name},
        "generated": None,
        "custom_metadata": {"launcher_pid": os.getpid(), "child_pid": child_pid},
    })
    for name, value in launcher.placement.fields.items():
        if value is not None and name not in record:
            record[name] = value
    return record


def rank_file_path(launcher: Any) -> str:
    """The launcher's per-process file (its pid stays the same across the waiter's exec)."""
    return process_file_path(launcher.base_path, launcher.ids["workflow_id"], launcher.placement.hostname,
                             os.getpid())


def node_ranks_path(launcher: Any, collector_pid: Optional[int] = None) -> str:
    """``<dir>/<stem>_<wf>_ranks-<node>[-<pid>].jsonl``: the rank records a node collector moved.

    The starter's has no pid; a rank that collects after it (the starter died, or finished
    before this rank) adds its own, so no collector ever replaces another's file.
    """
    directory, stem, suffix = split_base_path(launcher.base_path)
    name = f"{stem}_{safe_name(launcher.ids['workflow_id'])}_ranks-{safe_name(launcher.placement.node_name)}"
    if collector_pid is not None:
        name += f"-{collector_pid}"
    return os.path.join(directory, name + suffix)


def rank_records(launcher: Any, outcome: Any, workflow: Optional[Dict[str, Any]] = None) -> bytes:
    """The process task (and the finished workflow record) as JSON lines."""
    from flowcept.launch import waiter

    record = process_record(launcher, outcome.started_at, outcome.child_pid)
    generated = {"exit_code": outcome.exit_code, "signal": outcome.signal, "user_cpu_s": outcome.user_cpu_s,
                 "sys_cpu_s": outcome.sys_cpu_s, "max_rss_bytes": outcome.max_rss_bytes}
    data = waiter.dumps(waiter.complete_record(record, generated, outcome.ended_at, outcome.error))
    if workflow is not None:
        ended = time.time()
        workflow.update(status="FINISHED", ended_at=ended, utc_timestamp=ended)
        data += waiter.dumps({k: v for k, v in workflow.items() if v is not None})
    return data
