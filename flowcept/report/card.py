"""The provenance card: one markdown page that says what ran, where, how long, what failed, what it used.

Built from a ``Summary`` (one streaming pass), so the card of a million-task workflow costs one read
of the file plus a sort of each activity's durations.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Dict, Iterable, List, Optional

from flowcept.report.summary import Summary, summarize

MAX_ACTIVITY_ROWS = 40
MAX_HOST_ROWS = 64


def render_card(records: Iterable[Dict[str, Any]], summary: Optional[Summary] = None) -> str:
    """Markdown provenance card of the given records (or of a Summary built from them already)."""
    s = summary if summary is not None else summarize(records)
    parts: List[str] = []
    parts.extend(_identity(s))
    parts.extend(_placement(s))
    parts.extend(_overview(s))
    parts.extend(_activities(s))
    parts.extend(_loops(s))
    parts.extend(_slowest(s))
    parts.extend(_failed(s))
    parts.extend(_inputs_outputs(s))
    parts.extend(_resources(s))
    return "\n".join(parts).rstrip() + "\n"


# -- formatting helpers -----------------------------------------------------------------------------

def fmt_duration(seconds: Optional[float]) -> str:
    """Human duration: µs, ms, s, min or h."""
    if seconds is None or seconds != seconds:
        return "–"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_bytes(value: Optional[float]) -> str:
    """Binary-prefixed size."""
    if value is None or value != value:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024.0
    return f"{value:.1f} TiB"


def fmt_time(epoch: Any) -> str:
    """UTC ISO time of an epoch timestamp."""
    if not isinstance(epoch, (int, float)):
        return "–"
    try:
        return _dt.datetime.fromtimestamp(epoch, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return str(epoch)


def _cell(value: Any) -> str:
    text = "–" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _table(header: List[str], rows: List[List[Any]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out.extend("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)
    out.append("")
    return out


# -- sections -----------------------------------------------------------------------------------------

def _workflow_ids(s: Summary) -> List[Any]:
    ids = list(s.workflows)
    ids.extend(w for w in s.workflow_tasks if w not in s.workflows and w is not None)
    return ids


def _identity(s: Summary) -> List[str]:
    ids = _workflow_ids(s)
    if len(ids) <= 1:
        wid = ids[0] if ids else None
        wf = s.workflows.get(wid, {}) if wid else {}
        title = wf.get("name") or wid or "unnamed workflow"
        status = wf.get("status") or ("ERROR" if s.n_failed else ("FINISHED" if s.n_tasks else "UNKNOWN"))
        if s.n_failed and status == "FINISHED":
            status = f"FINISHED with {s.n_failed} failed task(s)"
        started = wf.get("started_at", s.t_min if s.n_tasks else None)
        ended = wf.get("ended_at", s.t_max if s.n_tasks else None)
        out = [f"# Provenance Card: {title}", "", "## Workflow", ""]
        rows = [["Workflow id", wid], ["Name", wf.get("name")], ["Campaign", wf.get("campaign_id")
                                                                  or ", ".join(sorted(map(str, s.campaigns)))],
                ["Status", status], ["User", wf.get("user") or ", ".join(sorted(map(str, s.users)))],
                ["Started", fmt_time(started)], ["Ended", fmt_time(ended)],
                ["Duration", fmt_duration(ended - started) if isinstance(started, (int, float))
                 and isinstance(ended, (int, float)) else None],
                ["Flowcept version", wf.get("flowcept_version")]]
        if wf.get("subtype"):
            rows.append(["Subtype", wf["subtype"]])
        if wf.get("parent_workflow_id"):
            rows.append(["Parent workflow", wf["parent_workflow_id"]])
        if isinstance(wf.get("used"), dict) and wf["used"]:
            rows.append(["Arguments", _short_json(wf["used"])])
        return out + _table(["Field", "Value"], [r for r in rows if r[1] not in (None, "")])
    campaign = ", ".join(sorted(map(str, s.campaigns))) or "(no campaign id)"
    out = [f"# Provenance Card: campaign {campaign}", "", f"## Campaign: {len(ids)} workflows", ""]
    rows = []
    for wid in ids:
        wf = s.workflows.get(wid, {})
        started, ended = wf.get("started_at"), wf.get("ended_at")
        errors = s.workflow_errors.get(wid, 0)
        status = wf.get("status") or ("ERROR" if errors else "UNKNOWN")
        rows.append([wf.get("name"), wid, status, s.workflow_tasks.get(wid, 0), errors,
                     fmt_time(started), fmt_duration(ended - started) if isinstance(started, (int, float))
                     and isinstance(ended, (int, float)) else None, wf.get("user")])
    return out + _table(["Name", "Workflow id", "Status", "Tasks", "Failed", "Started", "Duration", "User"], rows)


def _placement(s: Summary) -> List[str]:
    out = ["## Where it ran", ""]
    world = [w.get("world_size") for w in s.workflows.values() if w.get("world_size")]
    hosts_declared = sorted({h for w in s.workflows.values() for h in (w.get("hosts") or [])})
    hosts = sorted(set(s.hosts) | set(hosts_declared) | {h for h, _ in s.gpu_series} | set(s.node_series))
    ranks = s.ranks
    rows = [["Hosts", f"{len(hosts)}: " + _list(hosts)],
            ["Ranks", f"{len(ranks)} ({_range(ranks)})" if ranks else None],
            ["World size", max(world) if world else None],
            ["Processes", sum(len(h.pids) for h in s.hosts.values()) or None]]
    if s.jobs:
        rows.append(["Scheduler job", _list(sorted(f"{j}" + (f".{st}" if st is not None else "")
                                                   for j, st in s.jobs))])
    if s.gpu_series:
        rows.append(["GPUs", f"{len(s.gpu_series)}: " + _list([f"{h}/gpu{g}" for h, g in s.gpu_names()])])
    machine = next((w.get("machine_info") for w in s.workflows.values() if isinstance(w.get("machine_info"), dict)),
                   None)
    if machine:
        rows.append(["Machine", _machine_line(machine)])
    return out + _table(["Field", "Value"], [r for r in rows if r[1] not in (None, "")])


def _overview(s: Summary) -> List[str]:
    out = ["## Tasks", ""]
    status = ", ".join(f"{k}: {v}" for k, v in s.statuses.most_common())
    rows = [["Tasks", s.n_tasks], ["By status", status or None],
            ["Activities", len(s.activities)],
            ["Wall span", fmt_duration(s.span) if s.n_tasks else None],
            ["Nested tasks (with a parent)", s.children or None],
            ["Loop iterations", s.subtypes.get("iteration")],
            ["Telemetry samples", s.n_telemetry or None]]
    return out + _table(["Field", "Value"], [r for r in rows if r[1] not in (None, "")])


def _activities(s: Summary) -> List[str]:
    if not s.activities:
        return []
    ordered = sorted(s.activities.items(), key=lambda kv: -kv[1].total)
    rows = []
    for name, a in ordered[:MAX_ACTIVITY_ROWS]:
        p50, p95 = a.percentiles(50, 95)
        timed = len(a.durations)
        rows.append([name, a.subtype, a.count, a.errors or 0,
                     fmt_duration(a.total) if timed else None, fmt_duration(a.mean) if timed else None,
                     fmt_duration(p50) if timed else None, fmt_duration(p95) if timed else None,
                     fmt_duration(a.max) if timed else None])
    out = ["## Activities", "", "Sorted by total time."]
    if len(ordered) > MAX_ACTIVITY_ROWS:
        out.append(f"Showing {MAX_ACTIVITY_ROWS} of {len(ordered)} activities.")
    out.append("")
    return out + _table(["Activity", "Subtype", "Count", "Failed", "Total", "Mean", "p50", "p95", "Max"], rows)


def _loops(s: Summary) -> List[str]:
    if not s.loops:
        return []
    rows = [[loop["activity_id"], loop["task_id"], loop["iterations"], loop["status"]] for loop in s.loops[:20]]
    out = ["## Loops", ""]
    if len(s.loops) > 20:
        out += [f"Showing 20 of {len(s.loops)} loops.", ""]
    return out + _table(["Loop", "Task id", "Iterations", "Status"], rows)


def _slowest(s: Summary) -> List[str]:
    slow = s.slowest_tasks()
    if not slow:
        return []
    rows = [[fmt_duration(d), t["activity_id"], t["task_id"], t["hostname"], t["rank"], t["status"], t["used"]]
            for d, t in slow]
    return ["## Slowest tasks", ""] + _table(["Duration", "Activity", "Task id", "Host", "Rank", "Status",
                                              "Used"], rows)


def _failed(s: Summary) -> List[str]:
    if not s.n_failed:
        return []
    rows = [[t["activity_id"], t["task_id"], t["hostname"], t["rank"], t["stderr"]] for t in s.failed]
    out = ["## Failed tasks", "", f"{s.n_failed} task(s) ended with status ERROR"
           + (f"; the first {len(s.failed)} are listed." if s.n_failed > len(s.failed) else "."), ""]
    return out + _table(["Activity", "Task id", "Host", "Rank", "Error"], rows)


def _inputs_outputs(s: Summary) -> List[str]:
    rows = []
    for name, a in sorted(s.activities.items(), key=lambda kv: -kv[1].total)[:MAX_ACTIVITY_ROWS]:
        used = ", ".join(f"{k}={v[1]}" for k, v in a.used_keys.items())
        generated = ", ".join(f"{k}={v[1]}" for k, v in a.generated_keys.items())
        if used or generated:
            rows.append([name, used or None, generated or None])
    if not rows:
        return []
    return ["## Inputs and outputs", "", "Keys each activity used and generated, with a first example value.",
            ""] + _table(["Activity", "Used", "Generated"], rows)


def _resources(s: Summary) -> List[str]:
    out: List[str] = []
    if s.node_series:
        rows = []
        for host in sorted(s.node_series)[:MAX_HOST_ROWS]:
            series = s.node_series[host]
            cpu = series.stats("cpu_percent")
            mem = series.stats("memory_used_bytes")
            memp = series.stats("memory_percent")
            rows.append([host, len(series.t), _pct(cpu, 0), _pct(cpu, 1),
                         fmt_bytes(mem[0]) if mem else None, fmt_bytes(mem[1]) if mem else None,
                         _pct(memp, 1)])
        out += ["## Resource usage per node", ""]
        out += _table(["Node", "Samples", "CPU mean", "CPU max", "Memory mean", "Memory max", "Memory max %"], rows)
    elif any(h.cpu_n or h.mem_max for h in s.hosts.values()):
        rows = [[host, h.tasks, f"{h.cpu_sum / h.cpu_n:.1f} %" if h.cpu_n else None,
                 fmt_bytes(h.mem_max) if h.mem_max else None, fmt_bytes(h.rss_max) if h.rss_max else None]
                for host, h in sorted(s.hosts.items())[:MAX_HOST_ROWS]]
        out += ["## Resource usage per node (from task telemetry)", ""]
        out += _table(["Node", "Tasks", "CPU mean", "Memory max", "Process RSS max"], rows)
    if s.process_series:
        rows = []
        for (host, pid), series in sorted(s.process_series.items(), key=lambda kv: str(kv[0]))[:MAX_HOST_ROWS]:
            cpu = series.stats("process_cpu_percent")
            rss = series.stats("process_rss_bytes")
            rows.append([host, pid, _pct(cpu, 0), fmt_bytes(rss[1]) if rss else None])
        out += ["## Resource usage per process", ""]
        out += _table(["Node", "PID", "CPU mean", "RSS max"], rows)
    if s.gpu_series:
        rows = []
        for (host, gpu) in s.gpu_names()[:MAX_HOST_ROWS]:
            series = s.gpu_series[(host, gpu)]
            util = series.stats("gpu_utilization_percent")
            mem = series.stats("gpu_memory_used_bytes")
            power = series.stats("gpu_power_watts")
            rows.append([host, gpu, len(series.t), _pct(util, 0), _pct(util, 1),
                         fmt_bytes(mem[1]) if mem else None,
                         f"{power[0]:.0f} W" if power else None, f"{power[1]:.0f} W" if power else None])
        out += ["## Resource usage per GPU", ""]
        out += _table(["Node", "GPU", "Samples", "Util mean", "Util max", "Memory max", "Power mean",
                       "Power max"], rows)
    return out


def _pct(stats: Any, index: int) -> Optional[str]:
    return f"{stats[index]:.1f} %" if stats else None


def _list(items: List[Any], limit: int = 16) -> str:
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", … (+{len(items) - limit})"


def _range(ranks: set) -> str:
    ordered = sorted(r for r in ranks if isinstance(r, int))
    if not ordered:
        return _list(sorted(map(str, ranks)))
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}–{ordered[-1]}" if len(ordered) > 1 else str(ordered[0])
    return _list(ordered)


def _machine_line(machine: Dict[str, Any]) -> str:
    """OS, CPU, memory, GPUs and Python of the machine_info record, in one line."""

    def sub(key: str) -> Dict[str, Any]:
        value = machine.get(key)
        return value if isinstance(value, dict) else {}

    parts = []
    os_info, cpu, memory, python, gpu = sub("os"), sub("cpu"), sub("memory"), sub("python"), sub("gpu")
    if os_info.get("system"):
        parts.append(f"{os_info['system']} {os_info.get('release') or ''}".strip())
    if cpu.get("model") or cpu.get("count_logical"):
        parts.append(f"{cpu.get('model') or 'CPU'} ×{cpu.get('count_logical') or '?'}")
    if memory.get("total_bytes"):
        parts.append(f"{fmt_bytes(memory['total_bytes'])} RAM")
    devices = gpu.get("devices") if isinstance(gpu.get("devices"), list) else []
    if devices:
        names = sorted({str(d.get("gpu_name") or d.get("name") or "GPU") for d in devices if isinstance(d, dict)})
        parts.append(f"{len(devices)} GPU(s): {', '.join(names)}")
    if python.get("version"):
        parts.append(f"{python.get('implementation') or 'Python'} {python['version']}")
    return "; ".join(parts) or _short_json(machine)


def _short_json(value: Any, limit: int = 200) -> str:
    from flowcept.report.summary import _short

    return _short(value, limit)
