"""``Flowcept``: start and stop a run, and read what it wrote.

A started ``Flowcept`` publishes the run state capture reads (workflow and campaign ids,
placement, telemetry) and makes sure the process-wide pipeline exists. Runs nest: the inner
one captures while it is active and the outer one resumes when it stops. ``stop()`` sends the
workflow's end record, flushes and closes this process's file for the workflow, waits for the
other ranks when it can (MPI), and the root then consolidates.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Union

import orjson

from flowcept import capture
from flowcept.buffer import Pipeline, get_pipeline, set_pipeline_factory, shutdown_pipeline
from flowcept.consolidation import (
    consolidate,
    consolidated_path,
    find_sources,
    merge_workflow_records,
    read_jsonl,
    read_records,
    workflow_start_line,
)
from flowcept.coordination import Coordinator, get_coordinator
from flowcept.placement import current_placement
from flowcept.records import Status, WorkflowObject
from flowcept.settings import Settings, load_settings
from flowcept.version import __version__

logger = logging.getLogger("flowcept")


class _ClassProperty:
    def __init__(self, getter: Any):
        self.getter = getter

    def __get__(self, instance: Any, owner: Any) -> Any:
        return self.getter(owner)


def _configure_logging(settings: Settings) -> None:
    level = settings["log.log_stream_level"]
    root = logging.getLogger("flowcept")
    if getattr(root, "_flowcept_configured", None) == (level, settings["log.log_file_level"]):
        return
    for handler in list(root.handlers):
        if getattr(handler, "_flowcept", False):
            root.removeHandler(handler)
    formatter = logging.Formatter("[flowcept %(levelname)s %(name)s] %(message)s")
    levels = []
    if level != "disable":
        handler = logging.StreamHandler()
        handler._flowcept = True  # type: ignore[attr-defined]
        handler.setLevel(level.upper())
        handler.setFormatter(formatter)
        root.addHandler(handler)
        levels.append(handler.level)
    file_level = settings["log.log_file_level"]
    if file_level != "disable":
        handler = logging.FileHandler(settings["log.log_path"])
        handler._flowcept = True  # type: ignore[attr-defined]
        handler.setLevel(file_level.upper())
        handler.setFormatter(formatter)
        root.addHandler(handler)
        levels.append(handler.level)
    root.setLevel(min(levels) if levels else logging.CRITICAL + 1)
    root.propagate = False
    root._flowcept_configured = (level, file_level)  # type: ignore[attr-defined]


def _pipeline_config(settings: Settings) -> tuple:
    return (
        os.path.abspath(settings["project.dump_buffer.path"]),
        settings["daemon.address"] if not os.environ.get("FLOWCEPT_NO_DAEMON") else None,
        settings["project.dump_buffer.fsync"],
        settings["project.dump_buffer.flush_interval_s"],
        settings["project.dump_buffer.flush_size"],
        settings["project.dump_buffer.max_pending"],
        settings["project.buffer_view_max_records"],
    )


def _build_pipeline(settings: Settings) -> Pipeline:
    base_path, address, fsync, interval, size, max_pending, view_cap = _pipeline_config(settings)
    hostname = current_placement().hostname
    from flowcept.transport import FileTransport, MemoryOnlyTransport

    transport: Any = (FileTransport(base_path, hostname, fsync=fsync) if settings["project.dump_buffer.enabled"]
                      else MemoryOnlyTransport())
    if address:
        try:
            from flowcept.daemon_link import DaemonLink

            transport = DaemonLink(address, fallback=transport, settings=settings)
        except Exception as error:  # no pyzmq, bad address: files still work
            logger.warning("node daemon at %s unusable (%s); writing per-process files", address, error)
    pipeline = Pipeline(transport, flush_interval_s=interval, flush_size=size, max_pending=max_pending,
                        view_cap=view_cap)
    pipeline.config = _pipeline_config(settings)  # type: ignore[attr-defined]
    return pipeline


class Flowcept:
    """Main Flowcept controller: one instance per workflow run (see the seed API reference).

    ``start_persistence=False``: the run's records still go to the buffer files (``get_buffer``,
    ``read_buffer_file`` and consolidation work as usual), but ``stop()`` does not load them
    into the configured database (MongoDB); node daemons writing it live follow their own
    ``daemon.sinks``. ``check_safe_stops`` is accepted for compatibility: ``stop()`` always
    waits for this process's records to be written.
    """

    _db = None
    current_workflow_id: Optional[str] = None
    campaign_id: Optional[str] = None
    bundle_exec_id: Optional[str] = None
    is_started: bool = False
    _active: List[Flowcept] = []
    _lock = threading.RLock()
    _settings: Optional[Settings] = None

    @_ClassProperty
    def db(cls) -> Any:
        """The database API (``flowcept.flowcept_api.db_api.DBAPI``), created on first use."""
        if cls._db is None:
            from flowcept.flowcept_api.db_api import DBAPI

            cls._db = DBAPI()
        return cls._db

    def __init__(self, interceptors: Union[List[str], str, None] = None, bundle_exec_id: Optional[str] = None,
                 campaign_id: Optional[str] = None, workflow_id: Optional[str] = None,
                 workflow_name: Optional[str] = None, workflow_subtype: Optional[str] = None,
                 workflow_args: Optional[Dict] = None, agent_id: Optional[str] = None,
                 parent_workflow_id: Optional[str] = None, start_persistence: bool = True,
                 check_safe_stops: bool = True, save_workflow: bool = True,
                 delete_buffer_file: Optional[bool] = None, *args: Any, **kwargs: Any):
        if interceptors is None:
            interceptors = ["instrumentation"]
        elif isinstance(interceptors, str):
            interceptors = [interceptors]
        unsupported = [i for i in interceptors if isinstance(i, str) and i != "instrumentation"]
        if unsupported:
            raise ValueError(f"interceptors {unsupported} are not supported; Flowcept captures through "
                             f"instrumentation (FlowceptTask, @flowcept_task, loops) and the node daemon")
        self.interceptors = interceptors
        self._given_bundle_exec_id = bundle_exec_id
        self._given_campaign_id = campaign_id
        self._given_workflow_id = workflow_id
        self.workflow_name = workflow_name
        self.workflow_subtype = workflow_subtype
        self.workflow_args = workflow_args
        self.agent_id = agent_id
        self.parent_workflow_id = parent_workflow_id
        self.start_persistence = start_persistence
        self.check_safe_stops = check_safe_stops
        self._should_save_workflow = save_workflow
        self._delete_buffer_file = delete_buffer_file
        self.args = args
        self.kwargs = kwargs
        self._comm = kwargs.get("comm")
        self.current_workflow_id: Optional[str] = workflow_id  # type: ignore[misc]
        self.campaign_id: Optional[str] = campaign_id  # type: ignore[misc]
        self.bundle_exec_id: Optional[str] = bundle_exec_id  # type: ignore[misc]
        self.is_started: bool = False  # type: ignore[misc]
        self.enabled = True
        self.settings: Optional[Settings] = None
        self._coordinator: Optional[Coordinator] = None
        self._workflow: Optional[WorkflowObject] = None
        self._previous_state: Optional[capture.RunState] = None
        self._telemetry: Any = None
        self.last_consolidation: Any = None
        self.output_path: Optional[str] = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Flowcept:
        """Start capturing into this workflow; returns self."""
        if self.is_started:
            logger.warning("this Flowcept is already started")
            return self
        settings = load_settings()
        self.settings = settings
        Flowcept._settings = settings
        _configure_logging(settings)
        from flowcept import serialization

        serialization.max_value_bytes = settings["project.max_value_bytes"]
        if not settings["instrumentation.enabled"]:
            self.enabled = False
        delete_previous = (settings["project.dump_buffer.delete_previous_file"]
                           if self._delete_buffer_file is None else self._delete_buffer_file)
        if delete_previous:
            Flowcept.delete_buffer_file(settings["project.dump_buffer.path"])

        with Flowcept._lock:
            self._coordinator = get_coordinator(self._comm)
            env = os.environ
            ids = self._coordinator.agree({
                "workflow_id": self._given_workflow_id or env.get("FLOWCEPT_WORKFLOW_ID"),
                "campaign_id": self._given_campaign_id or env.get("FLOWCEPT_CAMPAIGN_ID"),
                "bundle_exec_id": self._given_bundle_exec_id or env.get("FLOWCEPT_BUNDLE_EXEC_ID"),
            }, self.workflow_name)
            self.current_workflow_id = ids["workflow_id"]  # type: ignore[misc]
            self.campaign_id = ids["campaign_id"]  # type: ignore[misc]
            self.bundle_exec_id = ids["bundle_exec_id"]  # type: ignore[misc]

            pipeline = self._ensure_pipeline(settings)
            append = pipeline.append
            self._telemetry = self._build_telemetry(settings)
            base = {k: v for k, v in current_placement().fields.items() if v is not None}
            if settings["project.debug"]:
                base["debug"] = True
            self._previous_state = capture.state
            capture.publish(capture.RunState(
                capturing=self.enabled, workflow_id=self.current_workflow_id, campaign_id=self.campaign_id,
                workflow_name=self.workflow_name, append=append, base=base, telemetry=self._telemetry,
                settings=settings,
            ))
            Flowcept._active.append(self)
            Flowcept.current_workflow_id = self.current_workflow_id
            Flowcept.campaign_id = self.campaign_id
            Flowcept.bundle_exec_id = self.bundle_exec_id
            Flowcept.is_started = True
            self.is_started = True  # type: ignore[misc]
        if self._should_save_workflow and self._coordinator.is_root:
            self._save_workflow_start(settings)
        return self

    def _ensure_pipeline(self, settings: Settings) -> Pipeline:
        config = _pipeline_config(settings)
        existing = get_pipeline(create=False)
        if existing is not None and getattr(existing, "config", None) != config and not Flowcept._active:
            shutdown_pipeline()  # settings changed between runs: new files, new daemon address
        set_pipeline_factory(lambda: _build_pipeline(settings))
        pipeline = get_pipeline()
        if not Flowcept._active:
            pipeline.reset_inline()  # a slow filesystem in an earlier run may be fast again
        return pipeline

    def _build_telemetry(self, settings: Settings) -> Any:
        try:
            from flowcept.telemetry import build_capture

            return build_capture(settings)
        except Exception as error:
            logger.warning("telemetry disabled: %s", error)
            return None

    def _save_workflow_start(self, settings: Settings) -> None:
        placement = current_placement()
        workflow = WorkflowObject(workflow_id=self.current_workflow_id, name=self.workflow_name,
                                  used=self.workflow_args)
        workflow.campaign_id = self.campaign_id
        workflow.bundle_exec_id = self.bundle_exec_id
        workflow.parent_workflow_id = self.parent_workflow_id
        workflow.subtype = self.workflow_subtype
        workflow.agent_id = self.agent_id
        workflow.status = Status.RUNNING
        workflow.started_at = time.time()
        workflow.interceptor_ids = [i if isinstance(i, str) else type(i).__name__ for i in self.interceptors]
        workflow.flowcept_version = __version__
        workflow.flowcept_settings = _redacted(settings.as_dict())
        workflow.user = settings["experiment.user"] or placement.user
        workflow.hostname = placement.hostname
        workflow.job_id = placement.job_id
        workflow.step_id = placement.step_id
        workflow.world_size = self._coordinator.size if self._coordinator else 1
        workflow.hosts = self._coordinator.gather_hosts() if self._coordinator else [placement.hostname]
        workflow.utc_timestamp = workflow.started_at
        if settings["telemetry_capture.machine_info"]:
            try:
                from flowcept.telemetry import machine_info

                workflow.machine_info = machine_info(settings)
            except Exception as error:
                logger.warning("machine info unavailable: %s", error)
        self._workflow = workflow
        pipeline = get_pipeline(create=False)
        if pipeline is not None and self.enabled:
            # Padded so that stop() can merge the end into this line in place (see consolidation).
            pipeline.append_line(self.current_workflow_id, workflow_start_line(workflow.to_dict()))

    def _emit(self, record: dict) -> None:
        pipeline = get_pipeline(create=False)
        if pipeline is not None and self.enabled:
            pipeline.append(record)

    def stop(self) -> None:
        """Send the end record, flush, wait for the other ranks (MPI), and consolidate on the root."""
        if not self.is_started:
            logger.warning("Flowcept is already stopped or was never started")
            return
        settings = self.settings
        assert settings is not None
        ended_at = time.time()
        workflow_end = ({"type": "workflow", "workflow_id": self.current_workflow_id, "status": "FINISHED",
                         "ended_at": ended_at, "utc_timestamp": ended_at} if self._workflow is not None else None)
        with Flowcept._lock:
            if self in Flowcept._active:
                Flowcept._active.remove(self)
            if Flowcept._active:
                outer = Flowcept._active[-1]
                capture.publish(outer._run_state())
                Flowcept.current_workflow_id = outer.current_workflow_id
                Flowcept.campaign_id = outer.campaign_id
                Flowcept.bundle_exec_id = outer.bundle_exec_id
            else:
                capture.publish(capture.IDLE)
                Flowcept.is_started = False
            self.is_started = False  # type: ignore[misc]
        if self._telemetry is not None and not any(a._telemetry is self._telemetry for a in Flowcept._active):
            stop_telemetry = getattr(self._telemetry, "stop", None)
            if stop_telemetry is not None:
                stop_telemetry()
        loops = sys.modules.get("flowcept.instrumentation.flowcept_loop")  # loaded only if loops were used
        if loops is not None:  # a loop advanced by hand and not finished: record what it started
            loops.close_open_loops(self.current_workflow_id)
        pipeline = get_pipeline(create=False)
        if pipeline is not None:
            pipeline.close_workflow(self.current_workflow_id)
        self._finish_across_ranks(settings, pipeline, workflow_end)

    def _run_state(self) -> capture.RunState:
        pipeline = get_pipeline()
        base = {k: v for k, v in current_placement().fields.items() if v is not None}
        return capture.RunState(capturing=self.enabled, workflow_id=self.current_workflow_id,
                                campaign_id=self.campaign_id, workflow_name=self.workflow_name,
                                append=pipeline.append, base=base, telemetry=self._telemetry,
                                settings=self.settings)

    def _send_workflow_end(self, pipeline: Optional[Pipeline], workflow_end: Optional[dict]) -> None:
        """Write the end record to this process's file (when no consolidation here merges it)."""
        if workflow_end is None or pipeline is None or not self.enabled:
            return
        pipeline.append(workflow_end)
        pipeline.close_workflow(self.current_workflow_id)

    def _finish_across_ranks(self, settings: Settings, pipeline: Optional[Pipeline],
                             workflow_end: Optional[dict] = None) -> None:
        coordinator = self._coordinator or Coordinator()
        through_daemon = pipeline is not None and type(pipeline.transport).__name__ == "DaemonLink"
        will_merge = (settings["project.consolidate_on_stop"] and coordinator.is_root and not through_daemon
                      and coordinator.can_synchronise and pipeline is not None
                      and settings["project.dump_buffer.enabled"])
        if not will_merge:
            self._send_workflow_end(pipeline, workflow_end)
        elif workflow_end is not None:
            pipeline.view.add(self.current_workflow_id, [orjson.dumps(workflow_end)])
        if through_daemon:
            pipeline.flush(durable=True)
        timeout_s = settings["launch.finish_timeout_s"]
        synchronised = coordinator.barrier(timeout_s)
        if not settings["project.consolidate_on_stop"] or not coordinator.is_root:
            coordinator.barrier(timeout_s)
            return
        if through_daemon or not coordinator.can_synchronise:
            # The launcher's rank 0 (or `flowcept consolidate`) merges once every rank is done.
            coordinator.barrier(timeout_s)
            return
        if not synchronised:
            # A rank failed or is late (bounded wait over): merge what the others left; a late
            # rank's file is still locked by its writer, so it is kept for a later consolidation.
            logger.warning("consolidating workflow %s without every rank", self.current_workflow_id)
        try:
            known = pipeline.known_file(self.current_workflow_id)  # our file, as we wrote it: not read back
            report = consolidate(settings["project.dump_buffer.path"], self.current_workflow_id,
                                 output_format=settings["project.output_format"],
                                 cleanup_files=settings["project.cleanup_files"], workflow_update=workflow_end,
                                 parse_worker=settings["project.hdf5_parse_worker"],
                                 known_files={known[0]: known[1:]} if known else None)
            self.last_consolidation = report
            self.output_path = report.output_path
            path_for = getattr(pipeline.transport, "path_for", None)
            if path_for is not None and os.path.exists(path_for(self.current_workflow_id)):
                # Our file outlives the merge (cleanup off, or kept): it must hold the end too,
                # so a later consolidation from the files gives the same workflow record.
                self._send_workflow_end(pipeline, workflow_end)
        except FileNotFoundError:
            logger.debug("nothing to consolidate for workflow %s", self.current_workflow_id)
            self._send_workflow_end(pipeline, workflow_end)
        except Exception:
            logger.exception("consolidation of workflow %s failed; its files are kept",
                             self.current_workflow_id)
            self._send_workflow_end(pipeline, workflow_end)
        finally:
            coordinator.barrier(timeout_s)
        if settings["databases.mongodb.enabled"] and self.start_persistence:
            try:  # no daemon wrote MongoDB live: the root loads the workflow's files
                from flowcept.sinks.mongodb import load_workflow

                load_workflow(settings["project.dump_buffer.path"], self.current_workflow_id, settings)
            except Exception as error:
                logger.error("loading workflow %s into MongoDB failed: %s", self.current_workflow_id,
                             type(error).__name__)

    def __enter__(self) -> Flowcept:
        return self.start()

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.stop()

    # -- the buffer ---------------------------------------------------------------------------
    def get_buffer(self, return_df: bool = False) -> Any:
        """The records of this run (also after stop()).

        Kept in memory up to ``project.buffer_view_max_records`` records; past that cap the
        records are read back from the workflow's files, so the answer stays complete.
        """
        pipeline = get_pipeline(create=False)
        records: Optional[List[dict]] = None
        if pipeline is not None:
            if self.is_started:
                pipeline.drain()
            records = pipeline.view.get(self.current_workflow_id)
        if records is None or (pipeline is None and self.current_workflow_id):
            records = self._records_from_files()
        records = _one_record_per_workflow(records)
        if return_df:
            return _to_dataframe(records, normalize=True)
        return records

    def _records_from_files(self) -> List[dict]:
        base = (self.settings or load_settings())["project.dump_buffer.path"]
        workflow_id = self.current_workflow_id or ""
        sources = find_sources(base, workflow_id)
        hdf5_output = consolidated_path(base, workflow_id, "hdf5")
        if os.path.exists(hdf5_output):  # an HDF5 consolidation removed the JSONL it came from
            sources.insert(0, hdf5_output)
        out: List[dict] = []
        for path in sources:
            out.extend(r for r in read_records(path) if r.get("workflow_id") == self.current_workflow_id)
        return _dedup(out)

    def dump_buffer(self, path: Optional[str] = None) -> None:
        """Write this run's records to ``path`` (default: project.dump_buffer.path), overwriting it."""
        settings = self.settings or load_settings()
        path = path or settings["project.dump_buffer.path"]
        from flowcept.serialization import dumps_line

        records = self.get_buffer()
        tmp = f"{path}.{os.getpid()}.tmp"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as handle:
            for record in records:
                handle.write(dumps_line(record))
        os.replace(tmp, path)
        logger.info("dumped %d records to %s", len(records), path)

    def save_workflow(self, interceptor: str = "instrumentation", interceptor_instance: Any = None) -> None:
        """Send this run's workflow record now (start() does it unless save_workflow=False)."""
        if not self.is_started:
            raise RuntimeError("start Flowcept before saving its workflow")
        if self._workflow is None:
            self._save_workflow_start(self.settings or load_settings())

    # -- files ----------------------------------------------------------------------------------
    @staticmethod
    def read_buffer_file(file_path: Optional[str] = None, return_df: bool = False, normalize_df: bool = False,
                         consolidate: bool = False, workflow_id: Optional[str] = None,
                         cleanup_files: bool = True) -> Any:
        """Read a Flowcept JSONL (or HDF5) file, optionally consolidating a workflow first.

        With no ``file_path`` the base path of the settings is used: with ``consolidate=True``
        every file of ``workflow_id`` (default: the current or last workflow) is merged into
        ``<stem>_<workflow_id>.jsonl`` which is then read; without it, that workflow's
        consolidated file if present, else its per-process files merged in memory, else the
        base path itself. A torn or corrupt line is skipped and reported.
        """
        settings = _current_settings()
        base = settings["project.dump_buffer.path"]
        workflow_id = workflow_id or Flowcept.current_workflow_id
        records: Optional[List[dict]] = None
        if consolidate:
            if workflow_id is None:
                raise ValueError("workflow_id must be provided when consolidate=True "
                                 "(no Flowcept run in this process to take it from)")
            report = _consolidate_into(file_path or base, workflow_id, cleanup_files)
            path = report.output_path
        elif file_path is not None:
            path = file_path
        else:
            assert base, "Please indicate file_path either in the argument or in the settings."
            path = base
            if workflow_id:
                merged = consolidated_path(base, workflow_id)
                if os.path.exists(merged):
                    path = merged
                else:
                    sources = find_sources(base, workflow_id)
                    if sources:
                        records = _dedup([r for s in sources for r in read_jsonl(s)
                                          if r.get("workflow_id") == workflow_id])
        if records is None:
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"Flowcept buffer file '{path}' was not found. Check project.dump_buffer.path in "
                    f"your settings and that a Flowcept run wrote there.")
            records = read_records(path)
        if return_df:
            return _to_dataframe(records, normalize=normalize_df)
        return records

    @staticmethod
    def delete_buffer_file(path: Optional[str] = None) -> None:
        """Delete the buffer file at ``path`` (default: project.dump_buffer.path) if it exists."""
        if path is None:
            path = (_current_settings())["project.dump_buffer.path"]
        try:
            os.remove(path)
            logger.info("buffer file %s removed", path)
        except FileNotFoundError:
            logger.debug("buffer file %s not found", path)

    # -- services ---------------------------------------------------------------------------------
    @staticmethod
    def services_alive() -> bool:
        """True when every configured service answers: the node daemon and MongoDB, if enabled.

        With the embedded default (files only) there is nothing to be down, so it is True.
        """
        settings = _current_settings()
        alive = True
        address = settings["daemon.address"]
        if address:
            try:
                from flowcept.daemon_link import ping

                alive = ping(address, timeout_s=2.0) and alive
            except Exception as error:
                logger.error("node daemon at %s is not reachable: %s", address, error)
                alive = False
        if settings["databases.mongodb.enabled"]:
            try:
                alive = bool(Flowcept.db.liveness_test()) and alive
            except Exception as error:
                logger.error("MongoDB is not reachable: %s", error)
                alive = False
        return alive

    @staticmethod
    def start_consumption_services(bundle_exec_id: Optional[str] = None, check_safe_stops: bool = False,
                                   consumers: Optional[List] = None) -> None:
        """Kept for compatibility: in this design there is no consumer to start.

        Records flow from the in-process buffer to the node daemon (started by flowcept-launch
        or ``flowcept daemon start``) or to files; the daemon writes MongoDB when it is enabled.
        This makes sure this process's pipeline exists and reports what will consume records.
        """
        if consumers is not None and len(consumers) > 1:
            raise NotImplementedError("only one consumer type is supported")
        settings = _current_settings()
        Flowcept._settings = settings
        set_pipeline_factory(lambda: _build_pipeline(settings))
        get_pipeline()
        logger.info("records are consumed by %s", settings["daemon.address"] or "per-process files")

    @staticmethod
    def generate_report(report_type: str = "provenance_card", format: str = "markdown",
                        print_markdown: bool = False, output_path: Optional[str] = None,
                        input_jsonl_path: Optional[str] = None, records: Optional[List[Dict[str, Any]]] = None,
                        workflow_id: Optional[str] = None, campaign_id: Optional[str] = None) -> Dict[str, Any]:
        """Generate a provenance card (markdown) or report (PDF); see flowcept.report."""
        from flowcept.report import generate_report

        return generate_report(report_type=report_type, format=format, print_markdown=print_markdown,
                               output_path=output_path, input_jsonl_path=input_jsonl_path, records=records,
                               workflow_id=workflow_id, campaign_id=campaign_id)

    @staticmethod
    def get_current_instance() -> Optional[Flowcept]:
        return Flowcept._active[-1] if Flowcept._active else None


def _current_settings() -> Settings:
    """The active run's settings, else read afresh (a finished run's may be stale: env changed)."""
    active = Flowcept._active
    if active and active[-1].settings is not None:
        return active[-1].settings
    return load_settings()


def _redacted(tree: Dict[str, Any]) -> Dict[str, Any]:
    """Settings as stored on the workflow record: credentials in URIs never leave the process."""
    import re

    mongo = tree.get("databases", {}).get("mongodb", {})
    if isinstance(mongo.get("uri"), str):
        mongo["uri"] = re.sub(r"//[^@/]*@", "//***@", mongo["uri"])
    return tree


def _consolidate_into(base: str, workflow_id: str, cleanup_files: bool) -> Any:
    pipeline = get_pipeline(create=False)
    if pipeline is not None:
        pipeline.flush()
    return consolidate(base, workflow_id, output_format="jsonl", cleanup_files=cleanup_files)


def _dedup(records: List[dict]) -> List[dict]:
    seen = set()
    out = []
    workflows: Dict[Any, dict] = {}
    for record in records:
        if record.get("type") == "workflow":
            merged = workflows.setdefault(record.get("workflow_id"), {})
            merged.update({k: v for k, v in record.items() if v is not None})
            continue
        key = record.get("task_id") or record.get("telemetry_id")
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        out.append(record)
    return out + list(workflows.values())


def _one_record_per_workflow(records: List[dict]) -> List[dict]:
    """A workflow's start and end records merged into one, placed last as consolidation writes it."""
    workflows: Dict[Any, List[dict]] = {}
    for record in records:
        if record.get("type") == "workflow":
            workflows.setdefault(record.get("workflow_id"), []).append(record)
    if all(len(group) == 1 for group in workflows.values()):
        return records
    out = [r for r in records if r.get("type") != "workflow" or len(workflows[r.get("workflow_id")]) == 1]
    out.extend(merge_workflow_records(group) for group in workflows.values() if len(group) > 1)
    return out


def _to_dataframe(records: List[dict], normalize: bool) -> Any:
    try:
        import pandas as pd
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("pandas is required when return_df=True: pip install 'flowcept[dataframe]'") \
            from error
    # Both modes give dotted columns for nested fields (generated.attention), as documented.
    return pd.json_normalize(records, sep=".")
