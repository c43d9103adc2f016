"""One rank of ``flowcept-launch``: wire the command to Flowcept, run it, record it, finish the job.

Every rank runs this (``srun``, ``mpirun``/``mpiexec`` or alone). The order keeps the added wall
time small: ids are derived and the child started first, and the library (settings, pipeline,
the rank's process task) is started while the child runs. Ranks never talk to each other: they
agree on ids through the job's environment and meet through files in the output directory
(one done-marker per rank, keyed by workflow id), so a rank that dies cannot hang the others
for longer than ``launch.finish_timeout_s``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from flowcept.launch.ids import agree_ids

from flowcept.placement import Placement, detect, reset_placement

logger = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
MARKER_DIR_PREFIX = ".flowcept_launch_"


@dataclass
class LaunchOptions:
    """What the command line asked for (see ``flowcept-launch --help``)."""

    command: List[str]
    workflow_name: Optional[str] = None
    output_dir: Optional[str] = None
    output_format: Optional[str] = None
    telemetry_interval_s: Optional[float] = None
    daemon: bool = True
    consolidate: bool = True
    settings_file: Optional[str] = None
    keep_files: bool = False
    quiet: bool = False


@dataclass
class RankOutcome:
    """How the rank's child ended; ``exit_code`` is what the launcher exits with."""

    exit_code: int
    signal: Optional[int] = None
    user_cpu_s: float = 0.0
    sys_cpu_s: float = 0.0
    max_rss_bytes: int = 0
    started_at: float = 0.0
    ended_at: float = 0.0
    error: Optional[str] = None
    extra: Dict[str, object] = field(default_factory=dict)


def _say(message: str) -> None:
    """One line on stderr, prefixed so it is recognisable among the application's output."""
    sys.stderr.write(f"flowcept-launch: {message}\n")
    sys.stderr.flush()


def marker_dir(base_path: str, workflow_id: str) -> str:
    """Directory of the per-rank done markers of one workflow (beside the buffer files)."""
    return os.path.join(os.path.dirname(base_path), MARKER_DIR_PREFIX + workflow_id)


def write_marker(directory: str, rank: int, outcome: RankOutcome) -> None:
    """Say this rank is done: written to a temp name and renamed, so a marker is never partial."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"rank-{rank}.done")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        handle.write(f"{outcome.exit_code}\n")
    os.replace(tmp, path)


def wait_for_markers(directory: str, count: int, timeout_s: float) -> int:
    """Poll (deadline-bounded) until ``count`` ranks are done; return how many were."""
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while True:
        try:
            done = sum(1 for name in os.listdir(directory) if name.endswith(".done"))
        except FileNotFoundError:
            done = 0
        if done >= count or time.monotonic() >= deadline:
            return done
        time.sleep(delay)  # polling a shared filesystem, bounded by the deadline
        delay = min(delay * 2, 0.1)


def _remove_markers(directory: str) -> None:
    try:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)
    except OSError:
        pass


class RankLauncher:
    """Runs the command once for this rank; ``run()`` returns the exit code."""

    def __init__(self, options: LaunchOptions, env: Optional[Dict[str, str]] = None):
        self.options = options
        self.env = os.environ if env is None else env
        self.placement: Placement = detect(self.env)
        self.rank = self.placement.rank or 0
        self.size = self.placement.world_size or 1
        self.local_rank = self.placement.local_rank if self.placement.local_rank is not None else self.rank
        self.child: Optional[subprocess.Popen] = None
        self.pending_signals: List[int] = []
        self.received_signal: Optional[int] = None
        self.daemon = None
        self.base_path = ""
        self.ids: Dict[str, str] = {}

    # -- environment -------------------------------------------------------------------------
    def _prepare_environment(self) -> Dict[str, str]:
        """Settings and ids as FLOWCEPT_* variables, for this process and the child alike."""
        env = self.env
        opts = self.options
        if opts.settings_file:
            env["FLOWCEPT_SETTINGS_PATH"] = os.path.abspath(opts.settings_file)
        from flowcept.settings import load_settings

        settings = load_settings(env)
        self.settings = settings
        configured = settings["project.dump_buffer.path"]
        directory = opts.output_dir or os.path.dirname(configured) or os.getcwd()
        self.base_path = os.path.abspath(os.path.join(directory, os.path.basename(configured)))
        self.output_format = opts.output_format or settings["project.output_format"]
        self.ids = agree_ids(self.placement, env, opts.workflow_name)
        values = {
            "FLOWCEPT_WORKFLOW_ID": self.ids["workflow_id"],
            "FLOWCEPT_CAMPAIGN_ID": self.ids["campaign_id"],
            "FLOWCEPT_BUNDLE_EXEC_ID": self.ids["bundle_exec_id"],
            "FLOWCEPT_PROJECT_DUMP_BUFFER_PATH": self.base_path,
            "FLOWCEPT_PROJECT_OUTPUT_FORMAT": self.output_format,
            # The launcher's rank 0 consolidates once every rank is done, never an application.
            "FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP": "false",
            "FLOWCEPT_RANK": str(self.rank),
            "FLOWCEPT_WORLD_SIZE": str(self.size),
            "FLOWCEPT_LOCAL_RANK": str(self.local_rank),
            "FLOWCEPT_NODE_NAME": self.placement.node_name,
        }
        for name, value in (("FLOWCEPT_LOCAL_SIZE", self.placement.local_size),
                            ("FLOWCEPT_NODE_ID", self.placement.node_id),
                            ("FLOWCEPT_JOB_ID", self.placement.job_id),
                            ("FLOWCEPT_STEP_ID", self.placement.step_id)):
            if value is not None:
                values[name] = str(value)
        if opts.telemetry_interval_s is not None:
            values["FLOWCEPT_DAEMON_TELEMETRY_INTERVAL_S"] = str(opts.telemetry_interval_s)
        env.update(values)
        return values

    # -- signals -----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: object) -> None:
        self.received_signal = signum
        child = self.child
        if child is None or child.returncode is not None:
            self.pending_signals.append(signum)
            return
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    def _install_signal_handlers(self) -> None:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._on_signal)

    # -- the child ---------------------------------------------------------------------------
    def _start_child(self) -> RankOutcome:
        outcome = RankOutcome(exit_code=0, started_at=time.time())
        try:
            self.child = subprocess.Popen(self.options.command, env=dict(self.env))
        except OSError as error:  # not found, not executable: like a shell, 127/126
            outcome.exit_code = 127 if isinstance(error, FileNotFoundError) else 126
            outcome.error = f"cannot run {self.options.command[0]!r}: {error}"
            outcome.ended_at = time.time()
            _say(outcome.error)
            return outcome
        for signum in self.pending_signals:
            os.kill(self.child.pid, signum)
        self.pending_signals.clear()
        return outcome

    def _wait_child(self, outcome: RankOutcome) -> None:
        child = self.child
        assert child is not None
        while True:
            try:
                _, status, usage = os.wait4(child.pid, 0)
                break
            except ChildProcessError:  # reaped elsewhere: no usage to report
                status, usage = 0, None
                break
        child.returncode = os.waitstatus_to_exitcode(status)
        outcome.ended_at = time.time()
        if child.returncode < 0:
            outcome.signal = -child.returncode
            outcome.exit_code = 128 + outcome.signal
        else:
            outcome.exit_code = child.returncode
        if usage is not None:
            outcome.user_cpu_s = usage.ru_utime
            outcome.sys_cpu_s = usage.ru_stime
            outcome.max_rss_bytes = usage.ru_maxrss * 1024  # kilobytes on Linux

    # -- the rank's record -------------------------------------------------------------------
    def _start_flowcept(self) -> object:
        from flowcept.flowcept_api.flowcept_controller import Flowcept

        reset_placement()
        return Flowcept(workflow_name=self.options.workflow_name, workflow_id=self.ids["workflow_id"],
                        campaign_id=self.ids["campaign_id"], bundle_exec_id=self.ids["bundle_exec_id"],
                        workflow_subtype="flowcept-launch",
                        workflow_args={"command": self.options.command, "world_size": self.size},
                        save_workflow=self.rank == 0).start()

    def _record_process(self, outcome: RankOutcome) -> None:
        from flowcept.instrumentation.task_capture import FlowceptTask
        from flowcept.records import Status

        command = self.options.command
        generated = {
            "exit_code": outcome.exit_code,
            "signal": outcome.signal,
            "user_cpu_s": outcome.user_cpu_s,
            "sys_cpu_s": outcome.sys_cpu_s,
            "max_rss_bytes": outcome.max_rss_bytes,
        }
        failed = outcome.exit_code != 0 or outcome.signal is not None
        FlowceptTask(activity_id=os.path.basename(command[0]) if command else "process",
                     subtype="rank_process",
                     used={"command": command, "cwd": os.getcwd(), "rank": self.rank,
                           "world_size": self.size, "node_name": self.placement.node_name},
                     started_at=outcome.started_at, ended_at=outcome.ended_at, generated=generated,
                     stderr=outcome.error, status=Status.ERROR if failed else Status.FINISHED,
                     custom_metadata={"launcher_pid": os.getpid()})

    # -- the whole rank ----------------------------------------------------------------------
    def run(self) -> int:
        """Run the command for this rank; return the exit code to leave with."""
        self._install_signal_handlers()
        self._prepare_environment()
        from flowcept.launch.node_daemon import attach_node_daemon

        self.daemon = attach_node_daemon(self, self.options.daemon)
        outcome = self._start_child()
        flowcept = None
        try:
            flowcept = self._start_flowcept()  # while the child runs
        except Exception as error:
            _say(f"provenance capture unavailable ({error}); running the command anyway")
        if self.child is not None:
            self._wait_child(outcome)
        if flowcept is not None:
            try:
                self._record_process(outcome)
                flowcept.stop()  # type: ignore[attr-defined]
            except Exception as error:
                _say(f"could not record rank {self.rank}'s process: {error}")
        self._finish(outcome)
        return outcome.exit_code

    def _finish(self, outcome: RankOutcome) -> None:
        """Say goodbye (daemon, marker); global rank 0 then waits and consolidates."""
        workflow_id = self.ids["workflow_id"]
        markers = marker_dir(self.base_path, workflow_id)
        interrupted = self.received_signal is not None
        if self.daemon is not None:
            self.daemon.goodbye(self, interrupted)
        write_marker(markers, self.rank, outcome)
        if self.rank != 0:
            return
        timeout = self.settings["launch.finish_timeout_s"]
        if interrupted:
            timeout = min(timeout, 3.0)  # a time limit's SIGKILL follows soon: do not start long work
        done = wait_for_markers(markers, self.size, timeout)
        if done < self.size:
            _say(f"{self.size - done} of {self.size} rank(s) did not finish within {timeout:g}s")
        if self.daemon is not None:
            self.daemon.wait_flushed(self, timeout)
        if not self.options.consolidate or done < self.size:
            _say(f"workflow {workflow_id}: not consolidated; run: flowcept consolidate --workflow-id "
                 f"{workflow_id} --path {self.base_path}")
            return
        from flowcept.consolidation import consolidate

        try:
            report = consolidate(self.base_path, workflow_id, output_format=self.output_format,
                                 cleanup_files=not self.options.keep_files
                                 and self.settings["project.cleanup_files"])
        except Exception as error:
            _say(f"consolidation of workflow {workflow_id} failed ({error}); files are kept")
            return
        _remove_markers(markers)
        if not self.options.quiet:
            sys.stdout.flush()
            sys.stdout.write(f"flowcept: workflow {workflow_id}: {report.records_out} records -> "
                             f"{report.output_path}\n")
            sys.stdout.flush()
