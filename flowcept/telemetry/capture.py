"""Per-task telemetry: the snapshot a task stores as ``telemetry_at_start``/``telemetry_at_end``.

Two modes, chosen by ``telemetry_capture.mode``:

* ``cached`` (default): a daemon thread refreshes a snapshot every ``interval_s`` and publishes
  it by replacing one attribute; ``capture()`` only returns that attribute (tens of
  nanoseconds, no psutil call in the application thread). A published dict is never mutated,
  so tasks may share it.
* ``sync``: ``capture()`` samples on the spot (the reference behaviour; hundreds of µs).

The snapshot has the reference's shape: keys among ``cpu``, ``process``, ``memory``, ``disk``,
``network`` and ``gpu`` (a list, one entry per visible GPU). With ``emit_interval_s > 0`` the
same thread also emits ``type: "telemetry"`` records for this process through
``flowcept.capture.emit``. Fork-safe: a forked child rebuilds its samplers (its own pid) and
restarts the thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any, Dict, List, Optional

from flowcept.threads import start_background

logger = logging.getLogger("flowcept.telemetry")

_live: weakref.WeakSet[TelemetryCapture] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for capture in list(_live):
        capture._reinit_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class TelemetryCapture:
    """Samples the enabled kinds and serves snapshots to tasks; ``stop()`` is idempotent."""

    def __init__(self, cpu: bool = False, per_cpu: bool = False, mem: bool = False, disk: bool = False,
                 network: bool = False, process: bool = False, gpu: Optional[List[str]] = None,
                 mode: str = "cached", interval_s: float = 1.0, emit_interval_s: float = 0.0,
                 disk_paths: Optional[List[str]] = None, psutil: Any = None, nvml: Any = None,
                 amdsmi: Any = None):
        self.kinds = {"cpu": cpu or per_cpu, "per_cpu": per_cpu, "memory": mem, "disk": disk,
                      "network": network, "process": process}
        self.gpu_metrics = gpu
        self.mode = mode
        self.interval_s = max(0.01, float(interval_s))
        self.emit_interval_s = float(emit_interval_s or 0.0)
        self.disk_paths = list(disk_paths or [])
        self._backends = (psutil, nvml, amdsmi)
        self._lock = threading.Lock()  # serialises sampling between the thread and sync callers
        self._stop_event = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._snapshot: Dict[str, Any] = {}
        # The last two published snapshots with their JSON (orjson Fragment, or None): a task
        # holding one is written without serialising it again (see fragment_of).
        self._serialized: tuple = ()
        self._build_samplers()
        if mode == "sync":
            self.capture = self._sample_now  # type: ignore[method-assign]
        _live.add(self)

    # -- samplers ---------------------------------------------------------------------------------
    def _build_samplers(self) -> None:
        psutil, nvml, amdsmi = self._backends
        wait_first = self.mode == "sync"
        self._samplers: List[tuple] = []
        if self.kinds["cpu"]:
            from flowcept.telemetry.cpu import CpuSampler

            self._samplers.append(("cpu", CpuSampler(psutil, per_cpu=self.kinds["per_cpu"],
                                                     wait_first=wait_first)))
        if self.kinds["process"]:
            from flowcept.telemetry.process import ProcessSampler

            self._samplers.append(("process", ProcessSampler(None, psutil, wait_first=wait_first)))
        if self.kinds["memory"]:
            from flowcept.telemetry.memory import MemorySampler

            self._samplers.append(("memory", MemorySampler(psutil)))
        if self.kinds["disk"]:
            from flowcept.telemetry.disk import DiskSampler

            self._samplers.append(("disk", DiskSampler(psutil, paths=self.disk_paths)))
        if self.kinds["network"]:
            from flowcept.telemetry.network import NetworkSampler

            self._samplers.append(("network", NetworkSampler(psutil)))
        self._gpu = None
        if self.gpu_metrics is not None:
            from flowcept.telemetry.gpu import GpuSampler

            self._gpu = GpuSampler(self.gpu_metrics, nvml=nvml, amdsmi=amdsmi)
        self._pid = os.getpid()

    def _sample_now(self) -> Dict[str, Any]:
        """A fresh snapshot (never raises: a failing sampler's section is None)."""
        snapshot: Dict[str, Any] = {}
        with self._lock:
            for key, sampler in self._samplers:
                try:
                    snapshot[key] = sampler.sample()
                except Exception as error:  # e.g. ProcessGone; other sections still count
                    logger.debug("telemetry %s sampler failed: %s", key, error)
                    snapshot[key] = None
            if self._gpu is not None:
                try:
                    snapshot["gpu"] = self._gpu.sample(pids=(self._pid,))
                except Exception as error:
                    logger.debug("telemetry gpu sampler failed: %s", error)
                    snapshot["gpu"] = None
        return snapshot

    # -- the task-facing side -------------------------------------------------------------------
    def capture(self) -> Dict[str, Any]:
        """The latest snapshot (cached mode); shared between tasks, never mutated."""
        return self._snapshot

    def fragment_of(self, snapshot: Any) -> Any:
        """The JSON of ``snapshot`` as an ``orjson.Fragment`` if it is one of the last two published.

        A cached snapshot goes into two records per task; serialised once when published, it
        is copied into each line instead of serialised again (~1-3 µs a task, more with GPUs).
        None for anything else (sync mode, an orjson without Fragment).
        """
        for published, fragment in self._serialized:
            if published is snapshot:
                return fragment
        return None

    def _publish(self, snapshot: Dict[str, Any]) -> None:
        """Make ``snapshot`` the one tasks get: its JSON first, then the one reference swap."""
        self._serialized = ((snapshot, _fragment(snapshot)), *self._serialized[:1])
        self._snapshot = snapshot  # readers never see a partial dict

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> TelemetryCapture:
        """Take a first snapshot and start the refresh/emit thread where needed."""
        if self.mode == "cached":
            self._publish(self._sample_now())
        else:
            self._sample_now()  # primes the CPU% baselines so the first task does not wait long
        self._start_thread()
        return self

    def _start_thread(self) -> None:
        if self.mode != "cached" and self.emit_interval_s <= 0:
            return
        self._stop_event = threading.Event()
        self._thread = start_background(threading.Thread(target=self._run, name="flowcept-telemetry",
                                                         daemon=True))

    def _run(self) -> None:
        stop = self._stop_event
        now = time.monotonic()
        # the first refresh comes soon, so the CPU% of the first tasks is a measured value
        next_refresh = now + min(self.interval_s, 0.15) if self.mode == "cached" else float("inf")
        next_emit = now + self.emit_interval_s if self.emit_interval_s > 0 else float("inf")
        while not stop.wait(max(0.0, min(next_refresh, next_emit) - time.monotonic())):
            try:
                now = time.monotonic()
                if now >= next_refresh:
                    self._publish(self._sample_now())
                    next_refresh = now + self.interval_s
                if now >= next_emit:
                    self._emit()
                    next_emit = now + self.emit_interval_s
            except Exception:  # pragma: no cover - the thread must outlive any sampler surprise
                logger.exception("telemetry thread iteration failed")

    def _emit(self) -> None:
        from flowcept import capture as run_capture

        run = run_capture.state
        if not run.capturing or run.workflow_id is None:
            return
        snapshot = self._snapshot if self.mode == "cached" else self._sample_now()
        for record in telemetry_records(snapshot, run.workflow_id):
            run_capture.emit(record)

    def stop(self) -> None:
        """Stop the thread (idempotent)."""
        self._stopped = True
        self._stop_event.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self._thread = None

    def _reinit_after_fork(self) -> None:
        # The parent's thread does not exist here and its samplers describe the parent's pid.
        self._lock = threading.Lock()
        self._thread = None
        try:
            self._build_samplers()
            if self.mode == "cached":
                self._publish(self._sample_now())
        except Exception:
            logger.debug("telemetry re-initialisation after fork failed", exc_info=True)
        if not self._stopped:
            self._start_thread()


def _fragment(snapshot: Dict[str, Any]) -> Any:
    """``snapshot`` serialised as the capture fast path would, wrapped for orjson to copy as is."""
    import orjson

    fragment = getattr(orjson, "Fragment", None)  # orjson >= 3.9
    if fragment is None:
        return None
    from flowcept.buffer import FAST_OPTIONS
    from flowcept.serialization import _fallback

    try:
        return fragment(orjson.dumps(snapshot, default=_fallback, option=FAST_OPTIONS))
    except Exception:  # a value the fast path refuses: such tasks take the safe way, whole
        return None


def telemetry_records(snapshot: Dict[str, Any], workflow_id: Optional[str]) -> List[Dict[str, Any]]:
    """Turn a snapshot into ``type: "telemetry"`` records: one for the process, one per GPU."""
    from flowcept.ids import next_id
    from flowcept.placement import current_placement

    placement = current_placement()
    now = time.time()
    base = {"workflow_id": workflow_id, "hostname": placement.hostname, "pid": placement.pid,
            "rank": placement.rank, "timestamp": now}
    record: Dict[str, Any] = {"type": "telemetry", "telemetry_id": next_id(), "kind": "process", **base}
    for key in ("cpu", "memory", "disk", "network", "process"):
        section = snapshot.get(key)
        if section:
            record.update(section)
    record["pid"] = placement.pid
    out = [record]
    for gpu in snapshot.get("gpu") or ():
        out.append({"type": "telemetry", "telemetry_id": next_id(), "kind": "gpu", **base, **gpu})
    return out


def build_capture(settings: Any) -> Optional[TelemetryCapture]:
    """The capture the ``telemetry_capture.*`` settings ask for, started; None when none is on."""
    get = settings.get if hasattr(settings, "get") else settings.__getitem__
    gpu = get("telemetry_capture.gpu")
    flags = {name: bool(get(f"telemetry_capture.{name}"))
             for name in ("cpu", "per_cpu", "mem", "disk", "network", "process_info")}
    if not any(flags.values()) and gpu is None:
        return None
    dump_path = get("project.dump_buffer.path") or "."
    capture = TelemetryCapture(
        cpu=flags["cpu"], per_cpu=flags["per_cpu"], mem=flags["mem"], disk=flags["disk"],
        network=flags["network"], process=flags["process_info"],
        gpu=list(gpu) if gpu is not None else None, mode=get("telemetry_capture.mode") or "cached",
        interval_s=get("telemetry_capture.interval_s") or 1.0,
        emit_interval_s=get("telemetry_capture.emit_interval_s") or 0.0,
        disk_paths=[os.path.dirname(os.path.abspath(dump_path))],
    )
    return capture.start()


_shared: Optional[TelemetryCapture] = None
_shared_lock = threading.Lock()


def ensure_capture() -> TelemetryCapture:
    """A process-wide cached capture of CPU, memory and this process, for tasks that ask explicitly."""
    global _shared
    if _shared is None:
        with _shared_lock:
            if _shared is None:
                _shared = TelemetryCapture(cpu=True, mem=True, process=True, mode="cached").start()
    return _shared
