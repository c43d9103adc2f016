"""The end of a rank, with the standard library only: wait for the command, record it, say done.

Used in two ways. A rank with nothing else to do while its command runs (not global rank 0,
not its node's daemon starter: at scale, nearly every rank) replaces its launcher process with
``python -I -S waiter.py SPEC`` once the command has started (same pid, so the command is still
its child): a bare interpreter of ~10 MiB waits for the command instead of a launcher of ~22 MiB
with settings, placement, protocol and their imports loaded. The other ranks call the same
functions in-process. Either way the rank's process task is written the same way.

Where it goes (:func:`finish_rank`). With a node daemon, the shared filesystem must see files
per node, not per rank (10,000 nodes x 64 ranks would be 1.28 M creates at one moment): the rank
writes its records and exit code to ``bye-<rank>`` in the node-local runtime directory and waits
on the node starter's lock; the starter moves every ``bye-`` of its node into one
``<stem>_<wf>_ranks-<node>.jsonl`` and writes one node marker. A rank that finds the lock free
and its ``bye-`` still there (the starter died, or finished before this rank) collects what is
left itself (:func:`collect_node`); a rank still waiting after ``hold_s`` writes its own file.
Without a daemon each rank writes its own file and ``rank-<N>.done`` as before.

``SPEC`` is a JSON object: ``child_pid``, ``record`` (the process task without its outcome),
``rank``, ``workflow_id``, ``rank_file``, ``fsync``, ``marker_dir``, and with a node daemon
``node_dir``, ``node``, ``node_ranks_path``, ``node_marker``, ``hold_s`` (else ``node_dir`` null).
Forwarded signals are blocked across the ``exec`` and unblocked once the handlers are in place,
so a SIGTERM that arrives meanwhile still reaches the command.
"""

import json
import os
import signal
import sys
import time

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def outcome_fields(status: int, usage, error=None) -> dict:
    """exit_code (128+N for signal N, as a shell says), signal, CPU and peak RSS of the command."""
    code = os.waitstatus_to_exitcode(status)
    sig = -code if code < 0 else None
    fields = {"exit_code": 128 + sig if sig else code, "signal": sig, "user_cpu_s": 0.0, "sys_cpu_s": 0.0,
              "max_rss_bytes": 0}
    if usage is not None:
        fields.update(user_cpu_s=usage.ru_utime, sys_cpu_s=usage.ru_stime,
                      max_rss_bytes=usage.ru_maxrss * 1024)  # kilobytes on Linux
    return fields


def complete_record(record: dict, generated: dict, ended_at: float, error=None) -> dict:
    """Fill the outcome into a process task made by ``rank_record.process_record``."""
    failed = generated["exit_code"] != 0 or generated["signal"] is not None
    record["ended_at"] = ended_at
    record["status"] = "ERROR" if failed else "FINISHED"
    record["generated"] = generated
    if error:
        record["stderr"] = error
    record["utc_timestamp"] = time.time()
    return record


def dumps(record: dict) -> bytes:
    """One JSON line; compact, so a task line starts ``{"type":"task","task_id":"`` (consolidation's fast path)."""
    return (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()


def write_atomic(path: str, data: bytes, fsync: bool) -> None:
    """Write to ``<path>.tmp`` and rename: readers (consolidation) see the whole file or none."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_marker(directory: str, rank: int, exit_code: int) -> None:
    """Say this rank is done: written to a temp name and renamed, so a marker is never partial."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"rank-{rank}.done")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        handle.write(f"{exit_code}\n")
    os.replace(tmp, path)


BYE_PREFIX = "bye-"
LEADER = "leader"  # the node starter holds an exclusive flock on it for as long as it collects
_DAEMON_STOP_S = 20.0
INTERRUPTED_HOLD_S = 10.0  # the starter waits 3 s for its ranks after a SIGTERM, then moves them


def write_bye(directory: str, rank: int, workflow_id: str, exit_code, data: bytes) -> None:
    """A rank's done state in the node-local directory: a header line, then its records (maybe none).

    Written to a temp name (not counted: it does not start with ``bye-``) and renamed.
    """
    header = json.dumps({"rank": rank, "exit_code": exit_code, "workflow_id": workflow_id},
                        separators=(",", ":")).encode() + b"\n"
    path = os.path.join(directory, f"{BYE_PREFIX}{rank}")
    tmp = os.path.join(directory, f".tmp-{BYE_PREFIX}{rank}-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, header + data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class _HoldTimeout(Exception):
    pass


def _raise_timeout(signum, frame):
    raise _HoldTimeout()


def hold(directory: str, rank: int, timeout_s: float):
    """Wait until the node's starter is done with its node (its lock on ``leader`` is free).

    Returns ``(state, fd)``: ``collected`` (our ``bye-`` was moved to the shared filesystem),
    ``orphaned`` (the lock is ours and our ``bye-`` is still there: nobody collected it; ``fd``
    holds the lock), or ``timeout`` (the starter is still busy after ``timeout_s``). A blocking
    flock wakes the moment the starter lets go (or dies); SIGALRM bounds it.
    """
    import fcntl

    bye = os.path.join(directory, f"{BYE_PREFIX}{rank}")
    try:
        fd = os.open(os.path.join(directory, LEADER), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return ("timeout" if os.path.exists(bye) else "collected"), None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        previous = signal.signal(signal.SIGALRM, _raise_timeout)
        signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 0.001))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except (_HoldTimeout, OSError):
            os.close(fd)
            return ("timeout" if os.path.exists(bye) else "collected"), None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if os.path.exists(bye):
        return "orphaned", fd
    os.close(fd)
    return "collected", None


def gather(directory: str, workflow_id: str):
    """Every ``bye-`` of this workflow in the node directory: ({rank: exit code}, records, paths)."""
    ranks, parts, paths = {}, [], []
    try:
        names = os.listdir(directory)
    except OSError:
        return ranks, b"", paths
    for name in names:
        if not name.startswith(BYE_PREFIX):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as handle:
                content = handle.read()
        except OSError:
            continue
        head, _, body = content.partition(b"\n")
        try:
            header = json.loads(head)
        except ValueError:
            continue
        if not isinstance(header, dict) or header.get("workflow_id") != workflow_id:
            continue  # an earlier launch's (same node, job and step): not ours to move
        ranks[int(header["rank"])] = header.get("exit_code")
        if body:
            parts.append(body if body.endswith(b"\n") else body + b"\n")
        paths.append(path)
    return ranks, b"".join(parts), paths


def write_node_marker(path: str, node: str, ranks: dict) -> None:
    """One marker for the ranks a node collector moved: ``{"node", "ranks": {rank: exit code}}``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump({"node": node, "ranks": {str(r): code for r, code in sorted(ranks.items())}}, handle)
    os.replace(tmp, path)


def remove_all(paths) -> None:
    """Unlink what was collected (already gone is fine)."""
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def _daemon_running(pid: int, directory: str) -> bool:
    """True while ``pid`` is this directory's node daemon and not a zombie (pids may be reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return b"flowcept.daemon" in cmdline and directory.encode() in cmdline and state != b"Z"


def stop_orphan_daemon(directory: str) -> None:
    """The node's daemon, when its starter is gone: SIGTERM (drain, flush, exit), wait, bounded."""
    try:
        with open(os.path.join(directory, "ready.json"), "rb") as handle:
            pid = int(json.loads(handle.read())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not _daemon_running(pid, directory):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + _DAEMON_STOP_S
    delay = 0.001
    while _daemon_running(pid, directory) and time.monotonic() < deadline:
        time.sleep(delay)  # not our child: nothing to block on; bounded by the deadline
        delay = min(delay * 2, 0.05)


def collect_node(spec: dict, lock_fd) -> None:
    """Move what is left of the node's ranks to the shared filesystem (we hold the node lock).

    One records file and one marker for everything collected; the daemon (if an orphan still
    runs) is stopped before the marker, so a marker still implies its records are flushed.
    """
    ranks, data, paths = gather(spec["node_dir"], spec["workflow_id"])
    try:
        if data:
            write_atomic(spec["node_ranks_path"], data, spec["fsync"])
        remove_all(paths)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    stop_orphan_daemon(spec["node_dir"])
    if ranks:
        write_node_marker(spec["node_marker"], spec["node"], ranks)


def finish_rank(spec: dict, data: bytes, exit_code: int) -> None:
    """Leave this rank's records and done state where they belong (see the module docstring)."""
    rank = spec["rank"]
    node_dir = spec.get("node_dir")
    if node_dir:
        try:
            os.makedirs(node_dir, mode=0o700, exist_ok=True)
            write_bye(node_dir, rank, spec["workflow_id"], exit_code, data)
        except OSError as error:
            sys.stderr.write(f"flowcept-launch: rank {rank}: node directory unusable ({error}); "
                             f"writing its own file\n")
            node_dir = None
    if node_dir:
        state, fd = hold(node_dir, rank, spec["hold_s"])
        if state == "collected":
            return
        if state == "orphaned":
            collect_node(spec, fd)
            return
        # The starter is still busy (its own command runs on): this rank's records go to a file of
        # its own, and its bye- stays as a record-less token so the starter still counts it.
        if data:
            write_atomic(spec["rank_file"], data, spec["fsync"])
        try:
            write_bye(node_dir, rank, spec["workflow_id"], exit_code, b"")
        except OSError:
            pass
        return
    if data:
        write_atomic(spec["rank_file"], data, spec["fsync"])
    write_marker(spec["marker_dir"], rank, exit_code)


def main(spec: dict) -> int:
    """Wait for the command, write its task, say goodbye and done; return its exit code."""
    pid = spec["child_pid"]
    exited_at = []
    signalled = []

    def forward(signum, frame):
        signalled.append(signum)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def child_signal(signum, frame):
        if not exited_at:
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    exited_at.append(time.time())
            except ChildProcessError:
                pass

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    signal.signal(signal.SIGCHLD, child_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (*FORWARDED_SIGNALS, signal.SIGCHLD))
    try:
        _, status, usage = os.wait4(pid, 0)
    except ChildProcessError:
        status, usage = 0, None
    ended_at = spec.get("exited_at") or (exited_at[0] if exited_at else time.time())
    generated = outcome_fields(status, usage)
    data = b""
    try:
        data = dumps(complete_record(spec["record"], generated, ended_at))
    except Exception as error:
        sys.stderr.write(f"flowcept-launch: could not record rank {spec['rank']}'s process: {error}\n")
    if signalled:  # a time limit's SIGKILL follows: do not wait long for the starter
        spec["hold_s"] = min(spec.get("hold_s") or 0.0, INTERRUPTED_HOLD_S)
    finish_rank(spec, data, generated["exit_code"])
    return generated["exit_code"]


if __name__ == "__main__":
    sys.stdout.flush()
    sys.exit(main(json.loads(sys.argv[1])))
