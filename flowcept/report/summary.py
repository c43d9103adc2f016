"""One streaming pass over the records of a run, gathering everything a card, a PDF or a view needs.

Memory is flat in the number of fields per task: a task costs its duration and its place on the
timeline (about 24 bytes, in ``array`` columns) plus bounded top-K lists; everything else is counts
keyed by activity, host, rank or GPU. Telemetry samples are kept as columns per node and per GPU.
"""

from __future__ import annotations

import heapq
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

TOP_K = 10
MAX_KEYS_PER_ACTIVITY = 12
MAX_ERROR_CHARS = 300

_NODE_FIELDS = ("cpu_percent", "memory_percent", "memory_used_bytes", "memory_total_bytes")
_GPU_FIELDS = ("gpu_utilization_percent", "gpu_memory_used_bytes", "gpu_memory_total_bytes",
               "gpu_memory_percent", "gpu_power_watts", "gpu_temperature_celsius")
_PROCESS_FIELDS = ("process_cpu_percent", "process_rss_bytes")


@dataclass
class ActivityStats:
    """Counts and durations of one activity (durations kept in a compact float column)."""

    count: int = 0
    errors: int = 0
    total: float = 0.0
    min: float = float("inf")
    max: float = 0.0
    subtype: Optional[str] = None
    durations: array = field(default_factory=lambda: array("d"))
    used_keys: Dict[str, Any] = field(default_factory=dict)
    generated_keys: Dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return self.total / len(self.durations) if len(self.durations) else 0.0

    def percentiles(self, *qs: float) -> List[float]:
        """The q-th percentiles (0-100) of the durations, with one sort; zeros when none."""
        n = len(self.durations)
        if not n:
            return [0.0 for _ in qs]
        ordered = sorted(self.durations)
        return [ordered[min(n - 1, int(round(q / 100.0 * (n - 1))))] for q in qs]


@dataclass
class Series:
    """A time series of numeric fields (one column per field, aligned on ``t``)."""

    t: array = field(default_factory=lambda: array("d"))
    values: Dict[str, array] = field(default_factory=dict)

    def add(self, timestamp: float, record: Dict[str, Any], names: Iterable[str]) -> None:
        index = len(self.t)
        self.t.append(timestamp)
        for name in names:
            value = record.get(name)
            column = self.values.get(name)
            if column is None:
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                column = self.values[name] = array("d", [float("nan")] * index)
            column.append(float(value) if isinstance(value, (int, float)) and value is not None
                          else float("nan"))

    def stats(self, name: str) -> Optional[Tuple[float, float, float]]:
        """(mean, max, last) of a field, ignoring missing samples; None when there are none."""
        column = self.values.get(name)
        if column is None:
            return None
        vals = [v for v in column if v == v]
        if not vals:
            return None
        return sum(vals) / len(vals), max(vals), vals[-1]


@dataclass
class HostStats:
    """What ran on one host: tasks, ranks, processes, and task-level resource snapshots."""

    tasks: int = 0
    ranks: set = field(default_factory=set)
    pids: set = field(default_factory=set)
    cpu_sum: float = 0.0
    cpu_n: int = 0
    mem_max: float = 0.0
    rss_max: float = 0.0


class Summary:
    """The aggregate of one stream of records (one workflow, or several of a campaign)."""

    def __init__(self) -> None:
        self.workflows: Dict[str, Dict[str, Any]] = {}
        self.workflow_tasks: Counter = Counter()
        self.workflow_errors: Counter = Counter()
        self.activities: Dict[str, ActivityStats] = {}
        self.statuses: Counter = Counter()
        self.n_tasks = 0
        self.n_records = 0
        self.t_min = float("inf")
        self.t_max = float("-inf")
        self.hosts: Dict[str, HostStats] = {}
        self.jobs: set = set()
        self.users: set = set()
        self.campaigns: set = set()
        self.slowest: List[Tuple[float, int, Dict[str, Any]]] = []
        self.failed: List[Dict[str, Any]] = []
        self.n_failed = 0
        self.loops: List[Dict[str, Any]] = []
        self.subtypes: Counter = Counter()
        self.children = 0
        # Timeline columns: one entry per task with both times.
        self.lane_names: List[str] = []
        self._lanes: Dict[Any, int] = {}
        self.activity_names: List[str] = []
        self._activity_index: Dict[str, int] = {}
        self.tl_start = array("d")
        self.tl_end = array("d")
        self.tl_lane = array("i")
        self.tl_activity = array("i")
        # Telemetry: per node, per (node, gpu), per (node, pid).
        self.node_series: Dict[str, Series] = {}
        self.gpu_series: Dict[Tuple[str, str], Series] = {}
        self.process_series: Dict[Tuple[str, Any], Series] = {}
        self.n_telemetry = 0
        self.other_types: Counter = Counter()

    # -- ingest ---------------------------------------------------------------------------------
    def add_all(self, records: Iterable[Dict[str, Any]]) -> Summary:
        """Ingest every record of an iterable (streamed); returns self."""
        add_task = self._add_task
        for record in records:
            self.n_records += 1
            kind = record.get("type", "task")
            if kind == "task":
                add_task(record)
            elif kind == "workflow":
                self._add_workflow(record)
            elif kind == "telemetry":
                self._add_telemetry(record)
            else:
                self.other_types[kind] += 1
        return self

    def _add_workflow(self, record: Dict[str, Any]) -> None:
        wid = record.get("workflow_id") or "?"
        merged = self.workflows.setdefault(wid, {})
        for key, value in record.items():
            if value is not None:
                merged[key] = value
        if record.get("campaign_id"):
            self.campaigns.add(record["campaign_id"])
        if record.get("user"):
            self.users.add(record["user"])
        if record.get("job_id") is not None:
            self.jobs.add((str(record["job_id"]), record.get("step_id")))

    def _add_task(self, task: Dict[str, Any]) -> None:
        self.n_tasks += 1
        get = task.get
        activity = get("activity_id") or "(unnamed)"
        status = get("status") or "UNKNOWN"
        self.statuses[status] += 1
        wid = get("workflow_id")
        self.workflow_tasks[wid] += 1
        stats = self.activities.get(activity)
        if stats is None:
            stats = self.activities[activity] = ActivityStats(subtype=get("subtype"))
            self._activity_index[activity] = len(self.activity_names)
            self.activity_names.append(activity)
            self._note_keys(stats.used_keys, get("used"))
            self._note_keys(stats.generated_keys, get("generated"))
        elif stats.count < 64:  # keys of the first tasks are representative; later ones are skipped
            self._note_keys(stats.used_keys, get("used"))
            self._note_keys(stats.generated_keys, get("generated"))
        stats.count += 1
        subtype = get("subtype")
        if subtype is not None:
            self.subtypes[subtype] += 1
            if subtype == "loop":
                gen = get("generated") or {}
                self.loops.append({"activity_id": activity, "task_id": get("task_id"),
                                   "iterations": gen.get("iterations") if isinstance(gen, dict) else None,
                                   "status": status})
        if get("parent_task_id"):
            self.children += 1
        host = get("hostname") or get("node_name") or "(unknown host)"
        hstats = self.hosts.get(host)
        if hstats is None:
            hstats = self.hosts[host] = HostStats()
        hstats.tasks += 1
        rank = get("rank")
        pid = get("pid")
        if rank is not None:
            hstats.ranks.add(rank)
        if pid is not None and len(hstats.pids) < 4096:
            hstats.pids.add(pid)
        job = get("job_id")
        if job is not None and len(self.jobs) < 64:
            self.jobs.add((str(job), get("step_id")))
        telemetry = get("telemetry_at_end") or get("telemetry_at_start")
        if telemetry:
            self._note_task_telemetry(hstats, telemetry)
        if get("campaign_id"):
            self.campaigns.add(get("campaign_id"))
        started = get("started_at")
        ended = get("ended_at")
        if status == "ERROR":
            stats.errors += 1
            self.workflow_errors[wid] += 1
            self.n_failed += 1
            if len(self.failed) < TOP_K:
                self.failed.append(_brief(task, activity, host))
        if isinstance(started, (int, float)) and isinstance(ended, (int, float)):
            duration = ended - started
            if duration < 0:
                duration = 0.0
            stats.durations.append(duration)
            stats.total += duration
            if duration < stats.min:
                stats.min = duration
            if duration > stats.max:
                stats.max = duration
            if started < self.t_min:
                self.t_min = started
            if ended > self.t_max:
                self.t_max = ended
            if len(self.slowest) < TOP_K:
                heapq.heappush(self.slowest, (duration, self.n_tasks, _brief(task, activity, host)))
            elif duration > self.slowest[0][0]:
                heapq.heapreplace(self.slowest, (duration, self.n_tasks, _brief(task, activity, host)))
            lane_key = rank if rank is not None else (host, pid)
            lane = self._lanes.get(lane_key)
            if lane is None:
                lane = self._lanes[lane_key] = len(self.lane_names)
                self.lane_names.append(f"rank {rank}" if rank is not None else f"{host}:{pid}")
            self.tl_start.append(started)
            self.tl_end.append(ended)
            self.tl_lane.append(lane)
            self.tl_activity.append(self._activity_index[activity])

    @staticmethod
    def _note_keys(keys: Dict[str, Any], values: Any) -> None:
        if not isinstance(values, dict):
            return
        for key, value in values.items():
            if key in keys:
                keys[key][0] += 1
            elif len(keys) < MAX_KEYS_PER_ACTIVITY:
                keys[key] = [1, _short(value)]

    @staticmethod
    def _note_task_telemetry(hstats: HostStats, telemetry: Any) -> None:
        flat = _flatten_telemetry(telemetry)
        cpu = flat.get("cpu_percent")
        if isinstance(cpu, (int, float)):
            hstats.cpu_sum += cpu
            hstats.cpu_n += 1
        mem = flat.get("memory_used_bytes")
        if isinstance(mem, (int, float)) and mem > hstats.mem_max:
            hstats.mem_max = float(mem)
        rss = flat.get("process_rss_bytes")
        if isinstance(rss, (int, float)) and rss > hstats.rss_max:
            hstats.rss_max = float(rss)

    def _add_telemetry(self, record: Dict[str, Any]) -> None:
        self.n_telemetry += 1
        timestamp = record.get("timestamp") or record.get("utc_timestamp")
        if not isinstance(timestamp, (int, float)):
            return
        host = record.get("hostname") or record.get("node_name") or "(unknown host)"
        kind = record.get("kind") or "node"
        if kind == "gpu" or ("gpu_utilization_percent" in record and kind != "node"):
            gpu = record.get("gpu_index", record.get("gpu_id", record.get("index", record.get("uuid", 0))))
            key = (host, str(gpu))
            series = self.gpu_series.get(key)
            if series is None:
                series = self.gpu_series[key] = Series()
            series.add(timestamp, record, _GPU_FIELDS)
        elif kind == "process":
            key2 = (host, record.get("pid"))
            series = self.process_series.get(key2)
            if series is None:
                series = self.process_series[key2] = Series()
            series.add(timestamp, record, _PROCESS_FIELDS)
        else:
            series = self.node_series.get(host)
            if series is None:
                series = self.node_series[host] = Series()
            series.add(timestamp, record, _NODE_FIELDS)
            for gpu in record.get("gpus") or ():  # a node record may embed its GPUs
                if isinstance(gpu, dict):
                    key = (host, str(gpu.get("gpu_index", gpu.get("index", 0))))
                    gseries = self.gpu_series.get(key)
                    if gseries is None:
                        gseries = self.gpu_series[key] = Series()
                    gseries.add(timestamp, gpu, _GPU_FIELDS)
        if timestamp < self.t_min:
            self.t_min = timestamp
        if timestamp > self.t_max:
            self.t_max = timestamp

    # -- derived --------------------------------------------------------------------------------
    @property
    def ranks(self) -> set:
        out: set = set()
        for host in self.hosts.values():
            out |= host.ranks
        return out

    @property
    def span(self) -> float:
        return self.t_max - self.t_min if self.t_max >= self.t_min else 0.0

    def slowest_tasks(self) -> List[Tuple[float, Dict[str, Any]]]:
        return [(d, info) for d, _, info in sorted(self.slowest, key=lambda x: -x[0])]

    def gpu_names(self) -> List[Tuple[str, str]]:
        return sorted(self.gpu_series)


def summarize(records: Iterable[Dict[str, Any]]) -> Summary:
    """Build a Summary from records in one pass."""
    return Summary().add_all(records)


def _brief(task: Dict[str, Any], activity: str, host: str) -> Dict[str, Any]:
    stderr = task.get("stderr")
    if stderr is not None and not isinstance(stderr, str):
        stderr = str(stderr)
    if stderr and len(stderr) > MAX_ERROR_CHARS:
        stderr = stderr[:MAX_ERROR_CHARS] + "…"
    started, ended = task.get("started_at"), task.get("ended_at")
    return {"task_id": task.get("task_id"), "activity_id": activity, "hostname": host,
            "rank": task.get("rank"), "status": task.get("status"), "stderr": stderr,
            "workflow_id": task.get("workflow_id"),
            "duration": (ended - started) if isinstance(started, (int, float)) and
            isinstance(ended, (int, float)) else None,
            "used": _short(task.get("used"), 120)}


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            import orjson

            text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _flatten_telemetry(telemetry: Any) -> Dict[str, Any]:
    """Flatten a task's telemetry snapshot into ``cpu_percent``/``memory_used_bytes``/... names.

    Accepts the flat field names of flowcept's samplers, nested one level (``{"cpu": {...}}``),
    and the reference package's shape (``cpu.percent_all``, ``memory.virtual.used``).
    """
    if not isinstance(telemetry, dict):
        return {}
    flat: Dict[str, Any] = {}
    for key, value in telemetry.items():
        if isinstance(value, dict):
            for inner_key, inner in value.items():
                if not isinstance(inner, dict):
                    flat.setdefault(inner_key, inner)
        else:
            flat.setdefault(key, value)
    cpu = telemetry.get("cpu")
    if isinstance(cpu, dict) and "cpu_percent" not in flat and "percent_all" in cpu:
        flat["cpu_percent"] = cpu["percent_all"]
    memory = telemetry.get("memory")
    if isinstance(memory, dict) and "memory_used_bytes" not in flat:
        virtual = memory.get("virtual")
        if isinstance(virtual, dict) and "used" in virtual:
            flat["memory_used_bytes"] = virtual["used"]
    process = telemetry.get("process")
    if isinstance(process, dict) and "process_rss_bytes" not in flat:
        info = process.get("memory_info") if isinstance(process.get("memory_info"), dict) else {}
        if "rss" in info:
            flat["process_rss_bytes"] = info["rss"]
    return flat
