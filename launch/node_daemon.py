"""The node daemon's life under the launcher: started by local rank 0, awaited by the others.

Every rank computes the same runtime directory (``flowcept.protocol.runtime_dir``: per user, per
node, per launch). Local rank 0 starts ``python -m flowcept.daemon`` there; every rank waits
(bounded by ``launch.ready_timeout_s``) for the daemon's ready file and then hands its address to
the child and to its own records. No ready file in time, or no daemon available: the rank says so
once on stderr and every record goes to per-process files instead (nothing is lost, consolidation
merges both kinds).

At the end each rank leaves a ``bye-<rank>`` file in the runtime directory after its records are
flushed; local rank 0 waits (bounded) for all of its node's ranks, then sends SIGTERM (the daemon
drains, flushes and exits 0) and waits for the exit. Only then does it write its own done marker,
so global rank 0 never consolidates before every node's daemon has flushed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Mapping, Optional

from flowcept import protocol

_STOP_TIMEOUT_S = 20.0
# The launchers stop their daemon themselves; the idle exit only guards against an orphan, so it
# waits long enough for a slow rank to register after a fast one said goodbye.
_IDLE_GRACE_S = 5.0


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
    """None when a node daemon can run here, else why not."""
    for module in ("zmq", "flowcept.daemon.server"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        except (ImportError, ValueError) as error:
            return f"{module} cannot be imported ({error})"
    return None


class NodeDaemon:
    """The launcher's view of its node's daemon (one object per rank)."""

    def __init__(self, directory: str, is_starter: bool, local_ranks: int, env: Dict[str, str]):
        self.directory = directory
        self.env = env
        self.is_starter = is_starter
        self.local_ranks = local_ranks
        self.process: Optional[subprocess.Popen] = None
        self.address: Optional[str] = None
        self.ready: Optional[Dict[str, Any]] = None

    def start(self, launcher: Any) -> None:
        """Local rank 0 only: start the daemon in the runtime directory, detached from our signals."""
        protocol.make_private_dir(self.directory)
        stale_files = [os.path.join(self.directory, name) for name in os.listdir(self.directory)
                       if name.startswith("bye-")]
        for stale in [protocol.ready_path(self.directory), protocol.socket_path(self.directory), *stale_files]:
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        settings = launcher.settings
        command = [sys.executable, "-m", "flowcept.daemon", "--node", launcher.placement.node_name,
                   "--output", launcher.base_path, "--exit-when-idle", "--idle-grace", str(_IDLE_GRACE_S)]
        if settings["daemon.runtime_dir"]:
            command += ["--runtime-dir", settings["daemon.runtime_dir"]]
        interval = launcher.options.telemetry_interval_s
        if interval is not None:
            command += ["--telemetry-interval", str(interval)]
        log = open(os.path.join(self.directory, "daemon.log"), "ab")
        try:
            # A new session: a Ctrl-C meant for the application does not cut the daemon's flush short.
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            env=self.env, start_new_session=True)
        finally:
            log.close()

    def wait_ready(self, timeout_s: float) -> bool:
        """Poll for the ready file (deadline-bounded); False if it never came or the daemon died."""
        deadline = time.monotonic() + timeout_s
        delay = 0.002
        while True:
            ready = protocol.read_ready(self.directory)
            if ready is not None and (not self.is_starter or self.process is None
                                      or ready.get("pid") in (None, self.process.pid)):
                self.ready = ready
                self.address = ready.get("address") or protocol.ipc_address(self.directory)
                return True
            if self.process is not None and self.process.poll() is not None:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)  # polling the daemon's ready file, bounded by the deadline
            delay = min(delay * 2, 0.05)

    def goodbye(self, launcher: Any, interrupted: bool) -> None:
        """Say this rank is flushed; the starter then stops the daemon and waits."""
        path = os.path.join(self.directory, f"bye-{launcher.rank}")
        try:
            with open(path, "w"):
                pass
        except OSError:
            pass
        if not self.is_starter or self.process is None:
            return
        timeout = min(launcher.settings["launch.finish_timeout_s"], 3.0 if interrupted else 1e9)
        deadline = time.monotonic() + timeout
        delay = 0.002
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                byes = sum(1 for name in os.listdir(self.directory) if name.startswith("bye-"))
            except OSError:
                break
            if byes >= self.local_ranks:
                break
            time.sleep(delay)  # polling for the node's ranks, bounded by the deadline
            delay = min(delay * 2, 0.05)
        self.stop()

    def stop(self) -> None:
        """SIGTERM (drain, flush, exit 0), then wait for the exit, bounded; SIGKILL as a last resort."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _say(f"node daemon (pid {process.pid}) did not exit within {_STOP_TIMEOUT_S:g}s; killing it")
            process.kill()
            process.wait(timeout=5)

    def wait_flushed(self, launcher: Any, timeout_s: float) -> None:
        """Nothing left to wait for: every node's starter stopped its daemon before its done marker."""


def attach_node_daemon(launcher: Any, enabled: bool) -> Optional[NodeDaemon]:
    """Start or join this node's daemon and export its address; None means per-process files."""
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
    directory = protocol.runtime_dir(launcher.settings["daemon.runtime_dir"], node=launcher.placement.node_name,
                                     env=daemon_env)
    daemon = NodeDaemon(directory, is_starter=launcher.local_rank == 0,
                        local_ranks=local_size(env, launcher.placement), env=daemon_env)
    try:
        if daemon.is_starter:
            daemon.start(launcher)
        ok = daemon.wait_ready(launcher.settings["launch.ready_timeout_s"])
    except (OSError, ValueError) as error:
        _say(f"node daemon unavailable ({error}); each rank writes its own file")
        daemon.stop()
        return None
    if not ok:
        _say(f"node daemon in {directory} not ready within {launcher.settings['launch.ready_timeout_s']:g}s; "
             f"each rank writes its own file")
        daemon.stop()
        return None
    env["FLOWCEPT_DAEMON_ADDRESS"] = daemon.address or ""
    return daemon
