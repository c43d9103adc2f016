"""The node daemon's life under the launcher: started by the node's first rank, never waited for.

Every rank computes the same runtime directory (``flowcept.protocol.runtime_dir``: per user, per
node name, per launch) and so the same ``ipc://`` address, which it hands to its command at once.
The first rank of the node to get there (the *starter*, elected by an exclusive ``flock`` on a
file in that directory) spawns ``python -m flowcept.daemon`` there just before its own command;
no rank waits for the daemon before its command runs. An application whose first batch comes
before the daemon is bound waits (bounded) for the connection inside its daemon link, or spills
to its per-process file: nothing is lost either way, consolidation merges both kinds.

While its command runs, the starter waits (bounded by ``launch.ready_timeout_s``) for the
daemon's ready file and registers the workflow with it, so the node's telemetry is recorded for
the workflow even when the application itself is not instrumented. A daemon that never gets
ready is stopped and reported once per node.

At the end each rank leaves ``bye-<rank>`` in the runtime directory once its command has exited
(its records are acknowledged or spilled by then): a header with its exit code, then its own
process task (``launch/waiter.py``). The starter waits (bounded) for all of its node's ranks, moves
every ``bye-`` into one ``<stem>_<wf>_ranks-<node>.jsonl`` on the shared filesystem and lets go of
its lock (the node's ranks, blocked on it, then exit), says goodbye to the daemon (which samples
the node once more), sends SIGTERM (the daemon drains, flushes and exits 0) and waits for the
exit. Only then does it write the node's one done marker (its ranks and their exit codes), so
global rank 0 never consolidates before every node's daemon has flushed. The shared filesystem
sees two files per node (the daemon's and the ranks') and one marker, however many ranks.

Everything node-local (runtime directory, socket, bye files) is keyed by node name and launch,
never by a path or pid space the nodes may share.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from typing import Any, Dict, List, Mapping, Optional

from flowcept import protocol

_STOP_TIMEOUT_S = 20.0
_PONG_TIMEOUT_S = 2.0
# The launchers stop their daemon themselves; the idle exit only guards against an orphan, so it
# waits long enough for a slow rank to register after a fast one said goodbye.
_IDLE_GRACE_S = 5.0
# Bye files older than this before the launcher started belong to an earlier launch that used the
# same directory (same node, job and step: a requeued job that crashed); they are not counted.
_STALE_S = 60.0


def _say(message: str) -> None:
    sys.stderr.write(f"flowcept-launch: {message}\n")
    sys.stderr.flush()


def local_size(env: Mapping[str, str], placement: Any) -> int:
    """How many ranks of this launch run on this node (for the daemon's goodbye count)."""
    if placement.local_size:
        return int(placement.local_size)
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PALS_LOCAL_SIZE"):
        if env.get(name, "").isdigit():
            return int(env[name])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = []
        for part in spec.split(","):  # e.g. "2(x3),1"
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not match:
                break
            counts.extend([int(match.group(1))] * int(match.group(2) or 1))
        node = placement.node_id or 0
        if 0 <= node < len(counts):
            return counts[node]
    return placement.world_size or 1


def daemon_available() -> Optional[str]:
    """None when a node daemon can run here, else why not (every rank reaches the same verdict)."""
    import importlib.util

    for module in ("zmq", "flowcept.daemon.server"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        except (ImportError, ValueError) as error:
            return f"{module} cannot be imported ({error})"
    return None


def _poll(ready: Any, timeout_s: float) -> bool:
    from flowcept.launch.launcher import poll_until

    return poll_until(ready, timeout_s)


class NodeDaemon:
    """The launcher's view of its node's daemon (one object per rank)."""

    def __init__(self, directory: str, is_starter: bool, local_ranks: int, env: Dict[str, str]):
        self.directory = directory
        self.env = env
        self.is_starter = is_starter
        self.local_ranks = local_ranks
        self.address = protocol.ipc_address(directory)
        self.pid: Optional[int] = None
        self.exit_status: Optional[int] = None
        self.ready: Optional[Dict[str, Any]] = None
        self._socket: Any = None
        self._context: Any = None
        self._leader_fd: Optional[int] = None

    # -- the starter ------------------------------------------------------------------------------
    def elect(self) -> bool:
        """Become the node's starter if no rank of this launch is: the first to lock ``leader``.

        The first rank to get here wins (not local rank 0: ranks start one after another, and
        whoever is first starts the daemon soonest). The lock is held until this launcher exits
        (a lock of a dead launcher is free again); the directory is per node, so ranks of other
        nodes never compete even when /tmp is shared.
        """
        import fcntl

        protocol.make_private_dir(self.directory)
        fd = os.open(os.path.join(self.directory, "leader"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._leader_fd = fd
        self.is_starter = True
        return True

    def spawn(self, launcher: Any) -> None:
        """Start the daemon in the runtime directory; returns at once.

        Its own session: a Ctrl-C meant for the application does not cut its flush short.
        """
        protocol.make_private_dir(self.directory)
        # A previous daemon's files: its readiness and socket. Bye files are never removed here:
        # the node's other ranks may already have finished (nobody waits for the daemon).
        for path in (protocol.ready_path(self.directory), protocol.socket_path(self.directory)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        command = [sys.executable, "-m", "flowcept.daemon", "--node", launcher.placement.node_name,
                   "--output", launcher.base_path, "--runtime-dir", self.directory, "--exit-when-idle",
                   "--idle-grace", str(_IDLE_GRACE_S)]
        interval = launcher.options.telemetry_interval_s
        if interval is not None:
            command += ["--telemetry-interval", str(interval)]
        command += self._remote_status_options(launcher)
        log = os.path.join(self.directory, "daemon.log")
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                   (os.POSIX_SPAWN_DUP2, 1, 2)]
        self.pid = os.posix_spawn(sys.executable, command, self.env, file_actions=actions, setsid=True)

    def _job_dir(self, launcher: Any) -> Optional[str]:
        job = launcher.placement.job_id or self.env.get("FLOWCEPT_JOB_ID")
        if not job or not launcher.settings["launch.remote_status"]:
            return None
        from flowcept.job_registry import job_dir

        try:
            return job_dir(str(job), launcher.settings["daemon.jobs_dir"])
        except ValueError:
            return None

    def forget_step(self, launcher: Any) -> None:
        """At the end of the step (global rank 0): remove its keys and node entries.

        Also when some node's daemon died without unregistering (its entry would stay forever);
        other steps of the job keep their own directories.
        """
        directory = self._job_dir(launcher)
        if directory is not None:
            from flowcept.job_registry import remove_step, step_dir

            remove_step(step_dir(directory, self._step(launcher)))

    def _step(self, launcher: Any) -> str:
        """The step's label in the job directory, with the cluster's name when Slurm gives one.

        Two clusters sharing a home directory (and a job id) then never share a step's keys.
        """
        step = launcher.placement.step_id
        label = "0" if step is None else str(step)
        cluster = self.env.get("SLURM_CLUSTER_NAME")
        return f"{cluster}-{label}" if cluster else label

    def _remote_status_options(self, launcher: Any) -> List[str]:
        """TCP + CURVE and a job-directory entry, so every node of the job can be watched from any host.

        The keys are made by the first daemon of the job (the launcher stays free of zmq).
        """
        directory = self._job_dir(launcher)
        if directory is None:
            return []
        return ["--tcp-port", "-1", "--job-dir", directory, "--job-step", self._step(launcher)]

    def alive(self) -> bool:
        """Reap the daemon if it exited (it is our child); True while it runs."""
        if self.pid is None or self.exit_status is not None:
            return False
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.exit_status = -1
            return False
        if pid == 0:
            return True
        self.exit_status = os.waitstatus_to_exitcode(status)
        return False

    def _check_ready(self) -> bool:
        if not self.alive():
            return True  # nothing more to wait for
        ready = protocol.read_ready(self.directory)
        if ready is not None and ready.get("pid") in (None, self.pid):
            self.ready = ready
            return True
        return False

    def join(self, launcher: Any) -> None:
        """Starter, while its command runs: wait (bounded) for readiness, then register the workflow."""
        if not self.is_starter or self.pid is None:
            return
        timeout = launcher.settings["launch.ready_timeout_s"]
        import zmq  # noqa: F401 - loaded while the daemon starts, not after

        _poll(lambda: self._check_ready() or launcher.received_signal is not None, timeout)
        if self.ready is None:
            why = (f"exited with status {self.exit_status}" if self.exit_status is not None
                   else f"not ready within {timeout:g}s")
            _say(f"node daemon in {self.directory} {why} (log: {self.directory}/daemon.log); "
                 f"the node's ranks write their own files")
            self.stop()
            return
        from flowcept.launch.launcher import trace

        trace("daemon ready")
        try:
            self._register(launcher)
        except Exception as error:  # no telemetry for an uninstrumented command; records are unaffected
            _say(f"could not register with the node daemon ({error})")
            self._close_socket()

    def _register(self, launcher: Any) -> None:
        import zmq

        self._context = zmq.Context()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect((self.ready or {}).get("address") or self.address)
        self._socket = sock
        placement = launcher.placement
        info = {"host": placement.hostname, "pid": os.getpid(), "rank": launcher.rank,
                "local_rank": launcher.local_rank, "node": placement.node_name, "job": placement.job_id,
                "step": placement.step_id, "base": launcher.base_path, "w": [launcher.ids["workflow_id"]]}
        sock.send_multipart(protocol.encode_hello(info))

    def _say_bye(self) -> None:
        """Goodbye (the daemon samples the node for the workflow), then a ping.

        The pong says the goodbye was handled before we ask the daemon to stop.
        """
        sock = self._socket
        if sock is None:
            return
        try:
            sock.send_multipart(protocol.encode_bye(pid=os.getpid()))
            sock.send_multipart(protocol.encode_ping(1))
            deadline = time.monotonic() + _PONG_TIMEOUT_S
            while self.alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sock.poll(int(min(remaining, 0.1) * 1000) + 1):
                    if remaining <= 0:
                        break
                    continue
                reply = protocol.decode(sock.recv_multipart(), 1 << 20, kinds=protocol.DAEMON_KINDS)
                if reply.kind == "pong":
                    break
        except Exception as error:
            _say(f"goodbye to the node daemon failed ({error})")
        finally:
            self._close_socket()

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None

    # -- the end of the node ----------------------------------------------------------------------
    def finish_node(self, launcher: Any, spec: Dict[str, Any], data: bytes, exit_code: int,
                    interrupted: bool) -> None:
        """Starter: wait for the node's ranks, move their records to one shared file, stop the daemon, mark.

        ``spec`` is this rank's ``RankLauncher._end_spec()`` (the collector file names of a rank
        that is not the starter carry its pid; the starter's do not).
        """
        from flowcept.launch import rank_record, waiter
        from flowcept.launch.launcher import node_marker_path, trace

        workflow_id = spec["workflow_id"]
        try:
            protocol.make_private_dir(self.directory)
            waiter.write_bye(self.directory, launcher.rank, workflow_id, exit_code, data)
        except OSError as error:
            _say(f"rank {launcher.rank}: node directory unusable ({error}); writing its own file")
            waiter.finish_rank(dict(spec, node_dir=None), data, exit_code)
        timeout = min(launcher.settings["launch.finish_timeout_s"], 3.0 if interrupted else 1e9)
        since = launcher.started_at - _STALE_S
        _poll(lambda: self._byes(since) >= self.local_ranks, timeout)
        trace("node ranks done")
        ranks, body, paths = waiter.gather(self.directory, workflow_id)
        try:
            if body:
                waiter.write_atomic(rank_record.node_ranks_path(launcher), body, spec["fsync"])
            waiter.remove_all(paths)
        except OSError as error:  # left in the node directory: a rank still waiting collects them
            _say(f"could not move the node's rank records to the output directory ({error})")
            ranks = {}
        self._release()  # the node's ranks were waiting for this: they exit now
        trace("node records moved")
        self._say_bye()
        trace("daemon said bye")
        self.stop()
        trace("daemon stopped")
        if ranks:
            waiter.write_node_marker(node_marker_path(spec["marker_dir"], launcher.placement.node_name),
                                     launcher.placement.node_name, ranks)
        self._clean_up()

    def _release(self) -> None:
        """Let go of the node lock: ranks blocked on it look whether their records were moved."""
        if self._leader_fd is not None:
            os.close(self._leader_fd)
            self._leader_fd = None

    def _byes(self, since: float) -> int:
        """How many of the node's ranks said goodbye (in this launch)."""
        count = 0
        try:
            names = os.listdir(self.directory)
        except OSError:
            return self.local_ranks
        for name in names:
            if name.startswith("bye-"):
                try:
                    if os.stat(os.path.join(self.directory, name)).st_mtime >= since:
                        count += 1
                except FileNotFoundError:
                    pass
        return count

    def _clean_up(self) -> None:
        """The daemon is gone: remove the goodbyes and, when nothing else is left, the directory."""
        try:
            for name in os.listdir(self.directory):
                path = os.path.join(self.directory, name)
                if name.startswith("bye-") or name == "leader" or (name == "daemon.log"
                                                                   and os.path.getsize(path) == 0):
                    os.unlink(path)
            os.rmdir(self.directory)
        except OSError:
            pass  # a non-empty log stays for the user to read

    def stop(self) -> None:
        """SIGTERM (drain, flush, exit 0), then wait for the exit, bounded; SIGKILL as a last resort."""
        self._close_socket()
        if not self.alive():
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if not _poll(lambda: not self.alive(), _STOP_TIMEOUT_S):
            _say(f"node daemon (pid {self.pid}) did not exit within {_STOP_TIMEOUT_S:g}s; killing it")
            os.kill(self.pid, signal.SIGKILL)
            _poll(lambda: not self.alive(), 5.0)


def attach_node_daemon(launcher: Any, enabled: bool) -> Optional[NodeDaemon]:
    """Plan this node's daemon and export its address; the starter spawns it. None: per-process files."""
    env = launcher.env
    env.pop("FLOWCEPT_DAEMON_ADDRESS", None)
    if not enabled or env.get("FLOWCEPT_NO_DAEMON"):
        return None
    why = daemon_available()
    if why is not None:
        _say(f"no node daemon ({why}); each rank writes its own file")
        return None
    from flowcept.launch.ids import launch_key

    daemon_env = dict(env)
    if protocol.job_key(daemon_env) == "nojob":
        # mpirun without a batch system: the daemon's directory is keyed by this launch instead.
        daemon_env["FLOWCEPT_JOB_ID"] = launch_key(launcher.placement, env) or f"pid{os.getpid()}"
    try:
        directory = protocol.runtime_dir(launcher.settings["daemon.runtime_dir"],
                                         node=launcher.placement.node_name, env=daemon_env)
        daemon = NodeDaemon(directory, is_starter=False, local_ranks=local_size(env, launcher.placement),
                            env=daemon_env)
        if daemon.elect():
            try:
                daemon.spawn(launcher)
            except BaseException:
                daemon._release()  # the node's other ranks collect their records themselves
                raise
    except (OSError, ValueError) as error:
        _say(f"node daemon unavailable ({error}); each rank writes its own file")
        return None
    env["FLOWCEPT_DAEMON_ADDRESS"] = daemon.address
    return daemon
