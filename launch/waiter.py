"""The end of a rank, with the standard library only: wait for the command, record it, say done.

Used in two ways. A rank with nothing else to do while its command runs (not global rank 0,
not its node's daemon starter: at scale, nearly every rank) replaces its launcher process with
``python -I -S waiter.py SPEC`` once the command has started (same pid, so the command is still
its child): a bare interpreter of ~10 MiB waits for the command instead of a launcher of ~22 MiB
with settings, placement, protocol and their imports loaded. The other ranks call the same
functions in-process. Either way the rank's process task is written the same way.

``SPEC`` is a JSON object: ``child_pid``, ``record`` (the process task without its outcome),
``rank_file``, ``fsync``, ``bye_path`` (or null), ``marker_dir``, ``rank``.
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


def touch(path: str) -> None:
    """The bye file in the node's runtime directory (the starter counts them)."""
    try:
        with open(path, "w"):
            pass
    except OSError:
        pass


def main(spec: dict) -> int:
    """Wait for the command, write its task, say goodbye and done; return its exit code."""
    pid = spec["child_pid"]
    exited_at = []

    def forward(signum, frame):
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
    try:
        record = complete_record(spec["record"], generated, ended_at)
        write_atomic(spec["rank_file"], dumps(record), spec["fsync"])
    except Exception as error:
        sys.stderr.write(f"flowcept-launch: could not record rank {spec['rank']}'s process: {error}\n")
    if spec.get("bye_path"):
        touch(spec["bye_path"])
    write_marker(spec["marker_dir"], spec["rank"], generated["exit_code"])
    return generated["exit_code"]


if __name__ == "__main__":
    sys.stdout.flush()
    sys.exit(main(json.loads(sys.argv[1])))
