"""One rank of ``flowcept-launch``: wire the command to Flowcept, run it, record it, finish the job.

Every rank runs this (``srun``, ``mpirun``/``mpiexec`` or alone). The added wall time is what
matters (``benchmarks/bench_launch.py``), so the launcher process stays small:

- it imports only settings, placement and id derivation before the command starts (no psutil,
  no zmq outside the node's daemon starter, no Flowcept pipeline or controller);
- the command is started with ``posix_spawn`` as soon as its ``FLOWCEPT_*`` variables are known;
  the node daemon is started beside it, and nobody waits for the daemon before the command runs
  (its address is known in advance; the application's link waits for it, or spills to files);
- the rank's process task (and, on global rank 0, the workflow record) is one JSON line written
  to this launcher's own per-process file, where consolidation finds it like any other source.

Ranks never talk to each other: they agree on ids through the job's environment and meet through
files: with a node daemon, each rank leaves its records and exit code in the node-local runtime
directory and the node's starter moves them into one file per node on the shared filesystem, with
one done-marker per node (``launch/waiter.py``); without one, each rank writes its own file and
marker. Markers are keyed by workflow id, so a rank that dies cannot hang the others for longer
than ``launch.finish_timeout_s``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional

from flowcept.launch.ids import agree_ids

from flowcept.placement import Placement, detect

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
MARKER_DIR_PREFIX = ".flowcept_launch_"
_POLL_FIRST_S = 0.001
_POLL_MAX_S = 0.02  # longest sleep between two looks at a file, for the first fraction of a second
_POLL_SLOW_MAX_S = 0.2  # longest sleep of a long wait on the shared filesystem (rank 0's markers)


class LaunchOptions:
    """What the command line asked for (see ``flowcept-launch --help``)."""

    __slots__ = ("command", "workflow_name", "output_dir", "output_format", "telemetry_interval_s", "daemon",
                 "consolidate", "settings_file", "keep_files", "quiet")

    def __init__(self, command: List[str], workflow_name: Optional[str] = None, output_dir: Optional[str] = None,
                 output_format: Optional[str] = None, telemetry_interval_s: Optional[float] = None,
                 daemon: bool = True, consolidate: bool = True, settings_file: Optional[str] = None,
                 keep_files: bool = False, quiet: bool = False):
        self.command = command
        self.workflow_name = workflow_name
        self.output_dir = output_dir
        self.output_format = output_format
        self.telemetry_interval_s = telemetry_interval_s
        self.daemon = daemon
        self.consolidate = consolidate
        self.settings_file = settings_file
        self.keep_files = keep_files
        self.quiet = quiet


class RankOutcome:
    """How the rank's child ended; ``exit_code`` is what the launcher exits with."""

    def __init__(self, started_at: float):
        self.exit_code = 0
        self.signal: Optional[int] = None
        self.user_cpu_s = 0.0
        self.sys_cpu_s = 0.0
        self.max_rss_bytes = 0
        self.started_at = started_at
        self.ended_at = started_at
        self.error: Optional[str] = None
        self.child_pid: Optional[int] = None


_TRACE = os.environ.get("FLOWCEPT_LAUNCH_TRACE")


def trace(event: str) -> None:
    """With FLOWCEPT_LAUNCH_TRACE=<file>: append ``<time> <pid> <event>`` (where the time goes)."""
    if _TRACE:
        with open(_TRACE, "a") as handle:
            handle.write(f"{time.time():.6f} {os.getpid()} {event}\n")


def _say(message: str) -> None:
    """One line on stderr, prefixed so it is recognisable among the application's output."""
    sys.stderr.write(f"flowcept-launch: {message}\n")
    sys.stderr.flush()


def poll_until(ready: Any, timeout_s: float, slow: bool = False) -> bool:
    """Call ``ready()`` until it is true or ``timeout_s`` passed; sleeps grow from 1 ms to 20 ms.

    Used for files other processes (maybe on other nodes, on a shared filesystem) create, where
    there is nothing to block on; the short first sleeps keep the common case (already there, or
    there within milliseconds) cheap. With ``slow`` the longest sleep then grows with the time
    already waited (a tenth of it, up to 0.2 s): a long wait lists a shared directory a few times
    a second, not fifty, and ends at most ~10% later than it could have.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    delay = _POLL_FIRST_S
    while True:
        if ready():
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(delay, deadline - now))  # polling another process's file, bounded by the deadline
        longest = min(_POLL_SLOW_MAX_S, max(_POLL_MAX_S, (now - start) / 10)) if slow else _POLL_MAX_S
        delay = min(delay * 2, longest)


def marker_dir(base_path: str, workflow_id: str) -> str:
    """Directory of the per-rank done markers of one workflow (beside the buffer files)."""
    return os.path.join(os.path.dirname(base_path), MARKER_DIR_PREFIX + workflow_id)


def node_marker_path(directory: str, node: str, collector_pid: Optional[int] = None) -> str:
    """``node-<node>.done`` (the node's starter) or ``node-<node>-<pid>.done`` (a later collector)."""
    from flowcept.transport import safe_name

    suffix = "" if collector_pid is None else f"-{collector_pid}"
    return os.path.join(directory, f"node-{safe_name(node)}{suffix}.done")


class DoneRanks:
    """Which ranks are done, from the markers: ``rank-<N>.done`` and ``node-*.done`` (JSON, many ranks).

    Each marker is read once (they are renamed into place whole); a rank two markers name (a
    collector that took over from a starter that died) counts once.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.seen: set = set()
        self.exit_codes: Dict[int, Any] = {}

    def count(self) -> int:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return len(self.exit_codes)
        for name in names:
            if not name.endswith(".done") or name in self.seen:
                continue
            path = os.path.join(self.directory, name)
            try:
                if name.startswith("rank-"):
                    with open(path) as handle:
                        text = handle.read().strip()
                    self.exit_codes[int(name[5:-5])] = int(text) if text.lstrip("-").isdigit() else None
                elif name.startswith("node-"):
                    import json

                    with open(path, "rb") as handle:
                        ranks = json.loads(handle.read())["ranks"]
                    self.exit_codes.update((int(rank), code) for rank, code in ranks.items())
            except (OSError, ValueError, KeyError, AttributeError):
                continue  # not readable yet: looked at again next time
            self.seen.add(name)
        return len(self.exit_codes)


def wait_for_markers(directory: str, count: int, timeout_s: float) -> int:
    """Wait (deadline-bounded, polls slowing down as the wait grows) until ``count`` ranks are done."""
    done = DoneRanks(directory)
    poll_until(lambda: done.count() >= count, timeout_s, slow=True)
    return done.count()


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
        self.started_at = time.time()
        self.env = os.environ if env is None else env
        self.placement: Placement = detect(self.env)
        self.rank = self.placement.rank or 0
        self.size = self.placement.world_size or 1
        self.local_rank = self.placement.local_rank if self.placement.local_rank is not None else self.rank
        self.child_pid: Optional[int] = None
        self.child_done = False
        self.child_exited_at: Optional[float] = None
        self.pending_signals: List[int] = []
        self.received_signal: Optional[int] = None
        self.daemon: Any = None
        self.settings: Any = None
        self.base_path = ""
        self.output_format = "jsonl"
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
        if self.child_pid is None or self.child_done:
            self.pending_signals.append(signum)
            return
        try:
            os.kill(self.child_pid, signum)
        except ProcessLookupError:
            pass

    def _on_child_signal(self, signum: int, frame: object) -> None:
        """Note when the command ended, even while rank 0 is busy writing the workflow record.

        ``WNOWAIT`` only looks: the child stays a zombie for ``wait4`` to collect its usage.
        SIGCHLD also comes for the daemon and for helpers of the machine probe, hence the check.
        """
        if self.child_pid is None or self.child_exited_at is not None:
            return
        try:
            if os.waitid(os.P_PID, self.child_pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                self.child_exited_at = time.time()
        except ChildProcessError:
            pass

    def _install_signal_handlers(self) -> None:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGCHLD, self._on_child_signal)

    # -- the child ---------------------------------------------------------------------------
    def _start_child(self) -> RankOutcome:
        """posix_spawn (no copy of this interpreter's memory, no exec helper): the cheapest start."""
        outcome = RankOutcome(started_at=time.time())
        command = self.options.command
        try:
            self.child_pid = os.posix_spawnp(command[0], command, self.env)
        except OSError as error:  # not found, not executable: like a shell, 127/126
            outcome.exit_code = 127 if isinstance(error, FileNotFoundError) else 126
            outcome.error = f"cannot run {command[0]!r}: {error}"
            outcome.ended_at = time.time()
            _say(outcome.error)
            return outcome
        outcome.child_pid = self.child_pid
        self._on_child_signal(signal.SIGCHLD, None)  # it may have ended before its pid was stored
        for signum in self.pending_signals:
            os.kill(self.child_pid, signum)
        self.pending_signals.clear()
        return outcome

    def _wait_child(self, outcome: RankOutcome) -> None:
        """Block in wait4 (signal handlers run and forward meanwhile); keep the child's usage."""
        assert self.child_pid is not None
        try:
            _, status, usage = os.wait4(self.child_pid, 0)
        except ChildProcessError:  # reaped elsewhere: no usage to report
            status, usage = 0, None
        self.child_done = True
        code = os.waitstatus_to_exitcode(status)
        outcome.ended_at = self.child_exited_at or time.time()
        if code < 0:
            outcome.signal = -code
            outcome.exit_code = 128 + outcome.signal
        else:
            outcome.exit_code = code
        if usage is not None:
            outcome.user_cpu_s = usage.ru_utime
            outcome.sys_cpu_s = usage.ru_stime
            outcome.max_rss_bytes = usage.ru_maxrss * 1024  # kilobytes on Linux

    # -- the whole rank ----------------------------------------------------------------------
    def run(self) -> int:
        """Run the command for this rank; return the exit code to leave with."""
        trace("run")
        self._install_signal_handlers()
        self._prepare_environment()
        trace(f"ids rank={self.rank} local={self.local_rank}")
        try:
            if self.options.daemon:
                from flowcept.launch.node_daemon import attach_node_daemon

                self.daemon = attach_node_daemon(self, True)  # starts, never waits
            else:
                self.env.pop("FLOWCEPT_DAEMON_ADDRESS", None)
        except Exception as error:  # the command runs and its records go to files all the same
            _say(f"no node daemon ({error}); each rank writes its own file")
            self.env.pop("FLOWCEPT_DAEMON_ADDRESS", None)
        trace("daemon planned")
        outcome = self._start_child()
        trace("child started")
        workflow = None
        try:
            if self.rank == 0:  # while the command runs (and the daemon starts)
                from flowcept.launch.rank_record import workflow_record

                workflow = workflow_record(self)
                if self.options.consolidate:
                    import flowcept.consolidation  # noqa: F401 - loaded now, not at the end of the job
                trace("workflow record")
            if self.daemon is not None:
                self.daemon.join(self)  # the starter registers the workflow while the command runs
        except Exception as error:
            _say(f"provenance capture incomplete ({error}); running the command anyway")
        if (self.child_pid is not None and self.child_exited_at is None and self.rank != 0 and sys.executable
                and (self.daemon is None or not self.daemon.is_starter)):  # (an ended command: reap it here)
            self._hand_over(outcome)  # returns only if the exec failed
        if self.child_pid is not None:
            self._wait_child(outcome)
        trace("child reaped")
        data = b""
        try:
            from flowcept.launch.rank_record import rank_records

            data = rank_records(self, outcome, workflow)
        except Exception as error:
            _say(f"could not record rank {self.rank}'s process: {error}")
        trace("rank records")
        self._finish(outcome, data)
        if _TRACE:
            import resource

            me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            trace(f"end cpu_self={me.ru_utime + me.ru_stime:.3f} cpu_children={kids.ru_utime + kids.ru_stime:.3f} "
                  f"rss_self={me.ru_maxrss / 1024:.1f}MiB")
        return outcome.exit_code

    def _hand_over(self, outcome: RankOutcome) -> None:
        """Replace this process by the bare waiter (``launch/waiter.py``): same pid, a third of the memory.

        Nothing is left for this rank to do but wait for its command and write what the waiter
        writes. Forwarded signals (and SIGCHLD) are blocked across the exec; the waiter unblocks
        them once its handlers are in place, so none is lost.
        """
        import json

        from flowcept.launch import rank_record

        spec = self._end_spec()
        spec.update(child_pid=self.child_pid, exited_at=self.child_exited_at,
                    record=rank_record.process_record(self, outcome.started_at, self.child_pid))
        argv = [sys.executable, "-I", "-S", os.path.join(os.path.dirname(os.path.abspath(__file__)), "waiter.py"),
                json.dumps(spec, default=str)]
        blocked = (*FORWARDED_SIGNALS, signal.SIGCHLD)
        trace("hand over to the waiter")
        sys.stdout.flush()
        sys.stderr.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            os.execv(sys.executable, argv)
        except OSError as error:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            _say(f"could not start the waiter ({error}); waiting in the launcher")

    def _end_spec(self) -> Dict[str, Any]:
        """Where this rank's records and done state go (``waiter.finish_rank``; the waiter gets it as JSON)."""
        from flowcept.launch import rank_record

        workflow_id = self.ids["workflow_id"]
        markers = marker_dir(self.base_path, workflow_id)
        spec: Dict[str, Any] = {"rank": self.rank, "workflow_id": workflow_id,
                                "rank_file": rank_record.rank_file_path(self),
                                "fsync": self.settings["project.dump_buffer.fsync"] != "never",
                                "marker_dir": markers, "node_dir": None}
        if self.daemon is not None:
            pid = os.getpid()  # the waiter keeps it: a later collector's names are fixed now
            spec.update(node_dir=self.daemon.directory, node=self.placement.node_name,
                        node_ranks_path=rank_record.node_ranks_path(self, pid),
                        node_marker=node_marker_path(markers, self.placement.node_name, pid),
                        hold_s=self.settings["launch.collect_wait_s"])
        return spec

    def _load_into_mongodb(self, workflow_id: str) -> None:
        """With MongoDB on, load what went to files (rank and workflow records, spilled batches).

        Records the daemons already streamed are merged, not doubled.
        """
        try:
            from flowcept.sinks.mongodb import load_workflow

            loaded = load_workflow(self.base_path, workflow_id, self.settings)
        except Exception as error:  # the files are complete; the database can be loaded later
            _say(f"loading workflow {workflow_id} into MongoDB failed ({error}); "
                 f"run: flowcept consolidate --mongodb --workflow-id {workflow_id} --path {self.base_path}")
            return
        trace(f"mongodb load: {loaded} records")

    def _finish(self, outcome: RankOutcome, data: bytes) -> None:
        """Leave the records and say done (node starter: for the whole node); rank 0 then waits and consolidates."""
        workflow_id = self.ids["workflow_id"]
        markers = marker_dir(self.base_path, workflow_id)
        interrupted = self.received_signal is not None
        spec = self._end_spec()
        if interrupted and "hold_s" in spec:
            from flowcept.launch.waiter import INTERRUPTED_HOLD_S

            spec["hold_s"] = min(spec["hold_s"], INTERRUPTED_HOLD_S)
        if self.daemon is not None and self.daemon.is_starter and self.daemon.pid is not None:
            self.daemon.finish_node(self, spec, data, outcome.exit_code, interrupted)
        else:
            from flowcept.launch.waiter import finish_rank

            finish_rank(spec, data, outcome.exit_code)
        trace("goodbye")
        if self.rank != 0:
            return
        timeout = self.settings["launch.finish_timeout_s"]
        if interrupted:
            timeout = min(timeout, 3.0)  # a time limit's SIGKILL follows soon: do not start long work
        done = wait_for_markers(markers, self.size, timeout)
        trace("all ranks done")
        if self.daemon is not None:
            self.daemon.forget_step(self)  # the step's daemons have exited (or died): its keys go
        if done < self.size:
            _say(f"{self.size - done} of {self.size} rank(s) did not finish within {timeout:g}s")
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
        if self.settings["databases.mongodb.enabled"]:
            self._load_into_mongodb(workflow_id)
        if not self.options.quiet:
            sys.stdout.flush()
            sys.stdout.write(f"flowcept: workflow {workflow_id}: {report.records_out} records -> "
                             f"{report.output_path}\n")
            sys.stdout.flush()
