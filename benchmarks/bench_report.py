"""Report speed and memory: provenance card and PDF of a large workflow (default 1 M tasks, 64 ranks).

Each measurement runs in its own child process so its peak RSS is its own. Figures are printed as
ratios against baselines measured in the same run on the same file:

- time baseline: parsing every line of the file with orjson and doing nothing else;
- memory baseline: ``Flowcept.read_buffer_file`` (the whole file as a list of dicts).

Usage: ``python benchmarks/bench_report.py [--small] [--tasks N] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import orjson

CHILD = r'''
import json, resource, sys, time
what, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
if what == "parse":
    import orjson
    n = 0
    with open(path, "rb") as f:
        for line in f:
            orjson.loads(line); n += 1
elif what == "read_all":
    from flowcept import Flowcept
    n = len(Flowcept.read_buffer_file(path))
elif what == "card":
    from flowcept.report import generate_report
    n = generate_report(input_jsonl_path=path, output_path=out)["tasks"]
elif what == "pdf":
    from flowcept.report import generate_report
    n = generate_report("provenance_report", "pdf", input_jsonl_path=path, output_path=out)["tasks"]
elif what == "prov":
    from flowcept.report.prov import export_prov_json
    n = export_prov_json(output_path=out, input_jsonl_path=path)["activities"]
seconds = time.perf_counter() - t
print(json.dumps({"what": what, "seconds": seconds, "n": n,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def write_workflow(path: str, n_tasks: int, ranks: int = 64, hosts: int = 8, seconds: int = 600) -> int:
    """Write a realistic consolidated workflow file (tasks with placement, used/generated, telemetry)."""
    rnd = random.Random(0)
    t0 = 1.7e9
    wid = "bench-wf"
    activities = ["load", "compute", "exchange", "reduce", "checkpoint"]
    clock = [t0] * ranks
    mean = seconds * ranks * 0.8 / max(n_tasks, 1)
    dumps = orjson.dumps
    with open(path, "wb") as f:
        f.write(dumps({"type": "workflow", "workflow_id": wid, "name": "bench", "status": "FINISHED",
                       "started_at": t0, "ended_at": t0 + seconds, "world_size": ranks, "user": "bench",
                       "hosts": [f"node{h:03d}" for h in range(hosts)], "job_id": "123456"}) + b"\n")
        buf = []
        for i in range(n_tasks):
            rank = i % ranks
            duration = rnd.expovariate(1 / mean)
            start = clock[rank]
            clock[rank] = start + duration * 1.2
            task = {"type": "task", "task_id": f"0a1b2c3d4e5f{rank:04x}.{i}", "workflow_id": wid,
                    "campaign_id": "bench", "activity_id": activities[(i // ranks) % 5], "started_at": start,
                    "parent_task_id": None, "hostname": f"node{rank % hosts:03d}",
                    "node_name": f"node{rank % hosts:03d}",
                    "pid": 40000 + rank, "rank": rank, "local_rank": rank // hosts, "job_id": "123456",
                    "step_id": "0", "login_name": "bench", "used": {"i": i, "dt": 0.01},
                    "ended_at": start + duration, "status": "ERROR" if i % 100003 == 7 else "FINISHED",
                    "generated": {"residual": duration}}
            if task["status"] == "ERROR":
                task["stderr"] = "RuntimeError: diverged"
            buf.append(dumps(task))
            if len(buf) >= 10000:
                f.write(b"\n".join(buf) + b"\n")
                buf.clear()
        for k in range(seconds):
            for h in range(hosts):
                buf.append(dumps({"type": "telemetry", "telemetry_id": f"n{h}.{k}", "kind": "node",
                                  "hostname": f"node{h:03d}", "timestamp": t0 + k, "cpu_percent": rnd.uniform(10, 99),
                                  "memory_used_bytes": (40 + h) * 2**30, "memory_percent": 35.0}))
                for g in range(4):
                    buf.append(dumps({"type": "telemetry", "telemetry_id": f"g{h}.{g}.{k}", "kind": "gpu",
                                      "hostname": f"node{h:03d}", "gpu_index": g, "timestamp": t0 + k,
                                      "gpu_utilization_percent": rnd.uniform(0, 100),
                                      "gpu_memory_used_bytes": rnd.uniform(1, 70) * 2**30,
                                      "gpu_power_watts": rnd.uniform(90, 700)}))
        if buf:
            f.write(b"\n".join(buf) + b"\n")
    return os.path.getsize(path)


def measure(what: str, path: str, out: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, what, path, out], capture_output=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr.decode()}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="100k tasks instead of 1 M")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--keep", default=None, help="directory to keep the input and outputs in")
    parser.add_argument("--skip-read-all", action="store_true", help="skip the read_buffer_file memory baseline")
    args = parser.parse_args()
    n = args.tasks or (100_000 if args.small else 1_000_000)
    directory = args.keep or tempfile.mkdtemp(prefix="bench_report_")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "workflow.jsonl")
    t = time.perf_counter()
    size = write_workflow(path, n)
    print(f"input: {n} tasks, {size / 2**20:.0f} MiB, written in {time.perf_counter() - t:.1f} s")
    parse = measure("parse", path, "")
    read_all = None if args.skip_read_all else measure("read_all", path, "")
    card = measure("card", path, os.path.join(directory, "card.md"))
    pdf = measure("pdf", path, os.path.join(directory, "report.pdf"))
    print(f"baseline parse only (orjson per line): {parse['seconds']:.2f} s, peak {parse['peak_rss_mib']:.0f} MiB")
    if read_all:
        print(f"baseline read_buffer_file (all in memory): {read_all['seconds']:.2f} s, "
              f"peak {read_all['peak_rss_mib']:.0f} MiB")
    for name, r, target in (("card", card, 10.0), ("pdf", pdf, 60.0)):
        ratio_t = r["seconds"] / parse["seconds"]
        mem = f"peak {r['peak_rss_mib']:.0f} MiB"
        if read_all:
            mem += f" = {r['peak_rss_mib'] / read_all['peak_rss_mib']:.2f}x read_buffer_file"
        print(f"{name}: {r['seconds']:.2f} s = {ratio_t:.2f}x parse-only (target {target:.0f} s at 1 M tasks), {mem}")
    if not args.keep:
        for name in ("workflow.jsonl", "card.md", "report.pdf"):
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:
                pass
        os.rmdir(directory)


if __name__ == "__main__":
    main()
