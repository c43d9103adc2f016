"""The launcher's own records: the rank's process task and, on global rank 0, the workflow record.

Written as JSON lines to this launcher's per-process file (``<stem>_<wf>_<host>_<pid>.jsonl``,
the name :func:`flowcept.transport.process_file_path` gives every process), through a temporary
name and a rename, so consolidation (now or later, with ``flowcept consolidate``) finds a whole
file or none. No pipeline, no flusher thread, no controller: one ``write`` per rank.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Dict, Optional

import orjson

from flowcept.ids import next_id
from flowcept.transport import process_file_path


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


def process_record(launcher: Any, outcome: Any) -> Dict[str, Any]:
    """The rank's process as a task: command, exit code or signal, usage, placement."""
    command = launcher.options.command
    failed = outcome.exit_code != 0 or outcome.signal is not None
    record: Dict[str, Any] = {"type": "task", "task_id": next_id(), "workflow_id": launcher.ids["workflow_id"],
                              "campaign_id": launcher.ids["campaign_id"]}
    if launcher.options.workflow_name:
        record["workflow_name"] = launcher.options.workflow_name
    record.update({
        "activity_id": os.path.basename(command[0]) if command else "process",
        "subtype": "rank_process",
        "started_at": outcome.started_at,
        "ended_at": outcome.ended_at,
        "status": "ERROR" if failed else "FINISHED",
        "used": {"command": command, "cwd": os.getcwd(), "rank": launcher.rank, "world_size": launcher.size,
                 "node_name": launcher.placement.node_name},
        "generated": {"exit_code": outcome.exit_code, "signal": outcome.signal, "user_cpu_s": outcome.user_cpu_s,
                      "sys_cpu_s": outcome.sys_cpu_s, "max_rss_bytes": outcome.max_rss_bytes},
        "custom_metadata": {"launcher_pid": os.getpid(), "child_pid": outcome.child_pid},
    })
    if outcome.error:
        record["stderr"] = outcome.error
    for name, value in launcher.placement.fields.items():
        if value is not None and name not in record:
            record[name] = value
    record["utc_timestamp"] = time.time()
    return record


def write_rank_file(launcher: Any, outcome: Any, workflow: Optional[Dict[str, Any]] = None) -> str:
    """Write the process task (and the finished workflow record) to this launcher's file."""
    option = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
    data = orjson.dumps(process_record(launcher, outcome), option=option, default=str)
    if workflow is not None:
        ended = time.time()
        workflow.update(status="FINISHED", ended_at=ended, utc_timestamp=ended)
        data += orjson.dumps({k: v for k, v in workflow.items() if v is not None}, option=option, default=str)
    placement = launcher.placement
    path = process_file_path(launcher.base_path, launcher.ids["workflow_id"], placement.hostname, os.getpid())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if launcher.settings["project.dump_buffer.fsync"] != "never":
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path
