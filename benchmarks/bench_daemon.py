"""Node daemon speed, as ratios against baselines measured in the same run.

1. Ingest: records/s from 1, 2 and 4 client processes (the real DaemonLink, acknowledged
   batches) into one daemon writing JSONL, against raw pyzmq PUSH/PULL of the same batches to a
   receiver that only counts them. Targets: >= 0.5x raw and >= 1 M records/s. Same records,
   batches and header frames on both sides; both get the same untimed warm-up (a node daemon is
   long-lived: its receive buffers are already faulted in, ~3 us per page on this VM); each
   figure is the median of ``--repeat`` interleaved runs. The daemon writes a real file on the
   working directory's file system; the previous run's file is removed just before the timed
   part, so its page cache is recycled as on a long-running node (see ``ingest_link``).
2. Per-task cost of FlowceptTask in a client with the daemon link vs the per-process file.
3. Daemon CPU when idle with 1 Hz telemetry sampling (% of one core). Target <= 0.2%.

Usage: python benchmarks/bench_daemon.py [--records 1000000] [--batch 1000] [--repeat 5] [--warm 0.25]
       [--idle-seconds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import orjson

CTX = mp.get_context("fork")


def make_payload(batch: int, worker: int) -> bytes:
    now = time.time()
    lines = []
    for i in range(batch):
        lines.append(orjson.dumps({
            "type": "task", "task_id": f"{worker:016x}.{i}", "workflow_id": "wf-bench", "campaign_id": "c",
            "activity_id": "step", "used": {"i": i, "x": 1.5}, "generated": {"y": 3.0}, "status": "FINISHED",
            "started_at": now, "ended_at": now + 0.001, "hostname": "node01", "pid": 4242, "rank": worker,
        }, option=orjson.OPT_APPEND_NEWLINE))
    return b"".join(lines)


def link_client(address: str, base: str, batches: int, warm: int, batch: int, worker: int, go, ready,
                results) -> None:
    from flowcept.daemon_link import DaemonLink
    from flowcept.transport import FileTransport

    payload = make_payload(batch, worker)
    link = DaemonLink(address, fallback=FileTransport(base, "bench"), ack_timeout_s=30)
    for _ in range(max(1, warm)):  # connect, register and warm up outside the timed part
        link.send("wf-bench", payload, batch)
    link.flush(durable=True)
    warmed = link.records_acked
    ready.put(worker)
    go.wait()
    start = time.perf_counter()
    for _ in range(batches):
        link.send("wf-bench", payload, batch)
    link.flush(durable=True)
    end = time.perf_counter()
    results.put((start, end, link.records_acked - warmed, link.records_spilled))
    link.close()


def raw_client(address: str, batches: int, warm: int, batch: int, worker: int, go, results) -> None:
    import zmq

    payload = make_payload(batch, worker)
    header = b'{"v":1,"k":"batch","s":1,"w":"wf-bench","n":%d}' % batch  # the daemon's header size
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 1000)
    push.connect(address)
    for _ in range(max(1, warm)):
        push.send_multipart([header, payload])
    go.wait()
    start = time.perf_counter()
    for _ in range(batches):
        push.send_multipart([header, payload])
    results.put((start, None, batches * batch, 0))
    push.close(linger=-1)
    context.term()


def raw_receiver(address: str, warm_messages: int, messages: int, bound, warmed, results) -> None:
    import zmq

    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 10000)
    pull.bind(address)
    bound.set()
    for _ in range(warm_messages):
        pull.recv_multipart()
    warmed.set()
    for _ in range(messages):
        pull.recv_multipart()
    results.put(("receiver", time.perf_counter()))
    pull.close(linger=0)
    context.term()


def start_daemon(workdir: str, *extra: str) -> tuple:
    runtime = os.path.join(workdir, "rt")
    process = subprocess.Popen([sys.executable, "-m", "flowcept.daemon", "--runtime-dir", runtime, "--no-gpu",
                                "--base-path", os.path.join(workdir, "buf.jsonl"), *extra],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    from flowcept import protocol

    deadline = time.monotonic() + 30
    while True:
        ready = protocol.read_ready(runtime)
        if ready and ready.get("pid") == process.pid:
            return process, ready["address"]
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit("daemon did not start: " + process.stderr.read().decode())
        time.sleep(0.01)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)


_STALE_OUTPUTS: list = []  # the previous daemon run's files, removed just before the next timed part


def _remove_stale_outputs() -> None:
    while _STALE_OUTPUTS:
        try:
            os.unlink(_STALE_OUTPUTS.pop())
        except FileNotFoundError:
            pass


def ingest_link(workdir: str, clients: int, total: int, batch: int, warm: int) -> float:
    """Records/s through the real DaemonLink into a daemon writing JSONL to ``workdir`` (ext4 here)."""
    workdir = tempfile.mkdtemp(dir=workdir)
    process, address = start_daemon(workdir, "--no-telemetry")
    try:
        batches = max(1, total // clients // batch)
        go, ready, results = CTX.Event(), CTX.Queue(), CTX.Queue()
        procs = [CTX.Process(target=link_client, args=(address, os.path.join(workdir, "buf.jsonl"), batches, warm,
                                                        batch, w, go, ready, results)) for w in range(clients)]
        for proc in procs:
            proc.start()
        for _ in procs:  # every client connected, registered and warmed up (acknowledged)
            ready.get(timeout=120)
        _remove_stale_outputs()
        go.set()
        rows = [results.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(30)
        spilled = sum(r[3] for r in rows)
        acked = sum(r[2] for r in rows)
        if spilled:
            print(f"  warning: {spilled} records spilled to files")
        return acked / (max(r[1] for r in rows) - min(r[0] for r in rows))
    finally:
        stop(process)
        # This run's output goes just before the next run's timed part, so that part writes into
        # page cache freed a moment ago, as on a long-running node whose page cache is recycled.
        # (On this VM, pages free for more than ~2 s go back to the host through the balloon and
        # cost a host fault each when written again: writes then run at ~0.5 GB/s, not ~5 GB/s.)
        _STALE_OUTPUTS.extend(os.path.join(workdir, name) for name in os.listdir(workdir)
                              if name.startswith("buf_") and name.endswith(".jsonl"))


def ingest_raw(workdir: str, clients: int, total: int, batch: int, warm: int) -> float:
    """Records/s of the same batches over plain PUSH/PULL to a receiver that only receives them."""
    address = "ipc://" + os.path.join(workdir, "raw.sock")
    batches = max(1, total // clients // batch)
    go, results, bound, warmed = CTX.Event(), CTX.Queue(), CTX.Event(), CTX.Event()
    receiver = CTX.Process(target=raw_receiver, args=(address, max(1, warm) * clients, batches * clients, bound,
                                                      warmed, results))
    receiver.start()
    bound.wait(30)
    procs = [CTX.Process(target=raw_client, args=(address, batches, warm, batch, w, go, results))
             for w in range(clients)]
    for proc in procs:
        proc.start()
    warmed.wait(120)  # every client connected and its warm-up received
    go.set()
    rows = [results.get(timeout=120) for _ in range(clients + 1)]
    for proc in [*procs, receiver]:
        proc.join(30)
    end = [r[1] for r in rows if r[0] == "receiver"][0]
    start = min(r[0] for r in rows if r[0] != "receiver")
    return batches * clients * batch / (end - start)


TASK_LOOP = r"""
import os, sys, time
from flowcept import Flowcept, FlowceptTask
n = int(sys.argv[1])
with Flowcept(workflow_id="wf-task-" + str(os.getpid())):
    for i in range(2000):
        with FlowceptTask(activity_id="warm", used={"i": i}) as t:
            t.end(generated={"y": i})
    best = None
    for _ in range(3):
        start = time.perf_counter()
        for i in range(n):
            with FlowceptTask(activity_id="step", used={"i": i}) as t:
                t.end(generated={"y": i})
        elapsed = (time.perf_counter() - start) / n
        best = elapsed if best is None else min(best, elapsed)
print(best * 1e6)
"""


def per_task_us(workdir: str, address: str, n: int) -> float:
    env = dict(os.environ, FLOWCEPT_PROJECT_DUMP_BUFFER_PATH=os.path.join(workdir, "tasks.jsonl"),
               FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP="false")
    env.pop("FLOWCEPT_DAEMON_ADDRESS", None)
    if address:
        env["FLOWCEPT_DAEMON_ADDRESS"] = address
    out = subprocess.run([sys.executable, "-c", TASK_LOOP, str(n)], env=env, capture_output=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(out.stderr.decode())
    return float(out.stdout.decode().strip().splitlines()[-1])


def _cpu_seconds(pid: int) -> float:
    """On-CPU time of a process in seconds (schedstat has ns resolution; psutil ticks are 10 ms)."""
    try:
        with open(f"/proc/{pid}/schedstat") as handle:
            return int(handle.read().split()[0]) / 1e9
    except OSError:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return times.user + times.system


def idle_cpu(workdir: str, seconds: float) -> float:
    process, _ = start_daemon(workdir, "--telemetry-interval", "1")
    try:
        time.sleep(1.5)  # past start-up and the first samples
        before = _cpu_seconds(process.pid)
        start = time.monotonic()
        time.sleep(seconds)
        used = _cpu_seconds(process.pid) - before
        return used / (time.monotonic() - start) * 100
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000000, help="Records per ingest run.")
    parser.add_argument("--batch", type=int, default=1000, help="Records per message.")
    parser.add_argument("--repeat", type=int, default=5, help="Ingest runs per figure (the median is shown).")
    parser.add_argument("--warm", type=float, default=0.25,
                        help="Untimed warm-up before each ingest run, as a fraction of --records (raw and "
                             "daemon alike): a node daemon is long-lived, its buffers already faulted in.")
    parser.add_argument("--tasks", type=int, default=20000, help="Tasks per per-task cost run.")
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="fcb-")
    try:
        record_bytes = len(make_payload(args.batch, 0)) / args.batch
        warm = int(args.records * args.warm) // args.batch
        print(f"ingest: {args.records} records per run ({record_bytes:.0f} bytes each), {args.batch} per "
              f"message, {os.cpu_count()} cores; after a warm-up of {args.warm:g}x that; median of {args.repeat} "
              f"alternating runs each; the daemon counts lines with "
              f"{'numpy' if importlib.util.find_spec('numpy') else 'bytes.count (numpy missing: slower)'}")
        print(f"{'clients':>8} {'daemon rec/s':>14} {'raw PUSH/PULL rec/s':>20} {'ratio':>7}")
        for clients in (1, 2, 4):
            sub = tempfile.mkdtemp(dir=workdir)
            raws, daemons = [], []
            for _ in range(args.repeat):  # interleaved, so background load hits both alike
                raws.append(ingest_raw(sub, clients, args.records, args.batch, warm))
                daemons.append(ingest_link(sub, clients, args.records, args.batch, warm))
            raw, daemon = statistics.median(raws), statistics.median(daemons)
            print(f"{clients:>8} {daemon:>14,.0f} {raw:>20,.0f} {daemon / raw:>7.2f}")
        sub = tempfile.mkdtemp(dir=workdir)
        process, address = start_daemon(sub, "--no-telemetry")
        try:
            file_us = min(per_task_us(sub, "", args.tasks) for _ in range(2))
            link_us = min(per_task_us(sub, address, args.tasks) for _ in range(2))
        finally:
            stop(process)
        print(f"per task: file transport {file_us:.2f} us, daemon link {link_us:.2f} us, "
              f"difference {link_us - file_us:+.2f} us (ratio {link_us / file_us:.2f})")
        cpu = idle_cpu(tempfile.mkdtemp(dir=workdir), args.idle_seconds)
        print(f"idle daemon with 1 Hz sampling: {cpu:.3f}% of one core")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
