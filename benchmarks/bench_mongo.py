"""MongoDB sink throughput against plain pymongo, and task_query latency by workflow id.

    python benchmarks/bench_mongo.py [--records 50000] [--query-tasks 200000] [--uri mongodb://...]
                                     [--embedded-tasks 1000000] [--skip-mongo]

Without ``--uri`` it starts ``secantusd-py`` (in-memory) on a free loopback port and stops it at the
end. Figures: records/s of ``MongoSink`` (batches of 1000 records from the caller, as the node
daemon writes them, until ``flush()`` returns) against ``insert_many(ordered=False)`` of the same
documents into a collection with the same indexes, in the same run; then the latency of
``Flowcept.db.task_query({"workflow_id": W})`` for a workflow of 1000 tasks among
``--query-tasks`` tasks.

The embedded (file) backend answers the same query from one consolidated JSONL file per
workflow (1000 tasks each), at ``--query-tasks`` and at ``--embedded-tasks`` tasks, against
reading and parsing that workflow's file with orjson (the floor); a filter without a workflow id
(a full scan of every file) is timed once for scale. ``--skip-mongo`` runs only this part.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server() -> tuple:
    if not shutil.which("secantusd-py"):
        sys.exit("no server: pip install secantusdb, or pass --uri")
    port = _free_port()
    process = subprocess.Popen(["secantusd-py", "--host", "127.0.0.1", "--port", str(port),
                                "--storage-path", ":memory:"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                sys.exit("server did not start")
            time.sleep(0.05)
    return process, f"mongodb://127.0.0.1:{port}"


def _tasks(n: int, workflows: int, prefix: str) -> List[dict]:
    return [{"type": "task", "task_id": f"{prefix}{i}", "workflow_id": f"wf{i % workflows}", "campaign_id": "c",
             "activity_id": f"act{i % 7}", "status": "FINISHED", "started_at": 1.7e9 + i, "ended_at": 1.7e9 + i + 0.5,
             "used": {"x": i, "lr": 0.01}, "generated": {"loss": 1.0 / (i + 1)}, "hostname": "node1",
             "pid": 1234, "rank": i % 4} for i in range(n)]


def _median_ms(samples: List[float]) -> str:
    return f"{statistics.median(samples) * 1000:.1f} ms"


def bench_embedded(n: int, per_workflow: int = 1000) -> None:
    """task_query by workflow id from the files: one consolidated JSONL per workflow."""
    import orjson

    from flowcept.consolidation import consolidated_path
    from flowcept.flowcept_api.db_api import DBAPI

    directory = tempfile.mkdtemp(prefix="fc-bench-files-")
    base = os.path.join(directory, "flowcept_buffer.jsonl")
    saved = {k: os.environ.get(k) for k in ("FLOWCEPT_DATABASES_MONGODB_ENABLED", "FLOWCEPT_PROJECT_DUMP_BUFFER_PATH")}
    try:
        workflows = max(1, n // per_workflow)
        started = time.perf_counter()
        template = _tasks(per_workflow, 1, "x")
        for w in range(workflows):
            wf = f"wf{w}"
            lines = [orjson.dumps({"type": "workflow", "workflow_id": wf, "name": "bench", "status": "FINISHED",
                                   "started_at": 1.7e9, "ended_at": 1.8e9})]
            lines += [orjson.dumps(dict(d, task_id=f"{wf}-{j}", workflow_id=wf)) for j, d in enumerate(template)]
            with open(consolidated_path(base, wf), "wb") as handle:
                handle.write(b"\n".join(lines) + b"\n")
        write_s = time.perf_counter() - started
        os.environ["FLOWCEPT_DATABASES_MONGODB_ENABLED"] = "false"
        os.environ["FLOWCEPT_PROJECT_DUMP_BUFFER_PATH"] = base
        db = DBAPI()
        db.task_query({"workflow_id": "wf0"}, limit=1)
        times, one, floor = [], [], []
        for k in range(7):
            wf = f"wf{k * 37 % workflows}"
            t0 = time.perf_counter()
            found = db.task_query({"workflow_id": wf})
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            db.task_query({"workflow_id": wf}, projection=["task_id"], limit=1)
            one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with open(consolidated_path(base, wf), "rb") as handle:
                parsed = [orjson.loads(line) for line in handle]
            floor.append(time.perf_counter() - t0)
        assert len(found) == per_workflow and len(parsed) == per_workflow + 1
        t0 = time.perf_counter()
        scanned = db.task_query({"activity_id": "act3", "used.x": {"$lt": 70}}, projection=["task_id"])
        scan_s = time.perf_counter() - t0
        assert len(scanned) == workflows * 10
        print(f"embedded task_query by workflow_id on {n:,} tasks ({workflows:,} files written in {write_s:.1f} s): "
              f"{len(found)} tasks in {_median_ms(times)} median (orjson parse of that file "
              f"{_median_ms(floor)}, ratio {statistics.median(times) / statistics.median(floor):.2f}); "
              f"first match {_median_ms(one)}; full scan without workflow id {scan_s:.2f} s")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=50000)
    parser.add_argument("--query-tasks", type=int, default=200000)
    parser.add_argument("--embedded-tasks", type=int, default=1000000)
    parser.add_argument("--skip-mongo", action="store_true", help="only the embedded (file) query figures")
    parser.add_argument("--uri")
    args = parser.parse_args()
    os.environ["FLOWCEPT_LOG_LOG_STREAM_LEVEL"] = "error"
    if args.skip_mongo:
        for n in sorted({args.query_tasks, args.embedded_tasks}):
            bench_embedded(n)
        return
    process, uri = (None, args.uri) if args.uri else _start_server()
    os.environ.update({"FLOWCEPT_DATABASES_MONGODB_ENABLED": "true", "FLOWCEPT_DATABASES_MONGODB_URI": uri,
                       "FLOWCEPT_LOG_LOG_STREAM_LEVEL": "error"})
    import pymongo

    from flowcept.flowcept_api.db_api import DBAPI
    from flowcept.settings import load_settings
    from flowcept.sinks.mongodb import MongoSink, ensure_indexes

    client = pymongo.MongoClient(uri)
    spool = tempfile.mkdtemp(prefix="fc-bench-spool-")
    try:
        n = args.records
        # Baseline: plain pymongo into a collection with the sink's indexes.
        base_db = client["bench_baseline"]
        ensure_indexes(base_db)
        docs = _tasks(n, 100, "b")
        started = time.perf_counter()
        for i in range(0, n, 10000):
            base_db.tasks.insert_many(docs[i:i + 10000], ordered=False)
        baseline = n / (time.perf_counter() - started)

        os.environ["FLOWCEPT_DATABASES_MONGODB_DB"] = "bench_sink"
        sink = MongoSink(load_settings(), batch_size=10000, spool_dir=spool)
        ensure_indexes(client["bench_sink"])
        docs = _tasks(n, 100, "s")
        started = time.perf_counter()
        for i in range(0, n, 1000):
            sink.write(docs[i:i + 1000])
        assert sink.flush(timeout_s=600), "sink did not drain"
        sink_rate = n / (time.perf_counter() - started)
        sink.close()
        assert client["bench_sink"].tasks.count_documents({}) == n
        print(f"write {n} tasks: MongoSink {sink_rate:,.0f} rec/s, pymongo insert_many {baseline:,.0f} rec/s, "
              f"ratio {sink_rate / baseline:.2f} (target >= 0.8)")

        # Query latency by workflow id.
        q = args.query_tasks
        os.environ["FLOWCEPT_DATABASES_MONGODB_DB"] = "bench_query"
        query_db = client["bench_query"]
        ensure_indexes(query_db)
        started = time.perf_counter()
        workflows = max(1, q // 1000)
        for i in range(0, q, 20000):
            query_db.tasks.insert_many([dict(d, task_id=f"q{i + j}", workflow_id=f"wf{(i + j) % workflows}")
                                        for j, d in enumerate(_tasks(min(20000, q - i), 1, "x"))], ordered=False)
        load_s = time.perf_counter() - started
        db = DBAPI()
        db.task_query({"workflow_id": "wf0"}, limit=1)
        times, one = [], []
        for k in range(7):
            t0 = time.perf_counter()
            found = db.task_query({"workflow_id": f"wf{k * 3 % workflows}"})
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            db.task_query({"workflow_id": f"wf{k * 5 % workflows}"}, projection=["task_id"], limit=1)
            one.append(time.perf_counter() - t0)
        assert len(found) == q // workflows
        raw = []
        for k in range(7):
            t0 = time.perf_counter()
            list(query_db.tasks.find({"workflow_id": f"wf{k * 3 % workflows}"}, {"_id": 0}))
            raw.append(time.perf_counter() - t0)
        print(f"MongoDB task_query by workflow_id on {q:,} tasks (loaded in {load_s:.1f} s): "
              f"{len(found)} tasks in {statistics.median(times) * 1000:.1f} ms median "
              f"(plain pymongo find {statistics.median(raw) * 1000:.1f} ms, ratio "
              f"{statistics.median(times) / statistics.median(raw):.2f}); "
              f"first match {statistics.median(one) * 1000:.2f} ms")
        db.close()
    finally:
        client.close()
        shutil.rmtree(spool, ignore_errors=True)
        if process is not None:
            process.terminate()
            process.wait(30)
    for n in sorted({args.query_tasks, args.embedded_tasks}):
        bench_embedded(n)


if __name__ == "__main__":
    main()
