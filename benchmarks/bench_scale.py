"""Scale benchmark on the namespace cluster rig: many nodes, many ranks, millions of tasks.

Brings up an N-node Slurm cluster in network namespaces (tests/cluster/rig.py, its own tag 1 and base
/tmp/flowcept-nscluster-bench, so it never touches the tests' rig; root, Slurm and
iproute2 needed), runs ``srun -N NODES --ntasks-per-node=R flowcept-launch --no-consolidate --
python scale_app.py`` with T tasks per rank, then consolidates the workflow in a separate process
(as ``flowcept consolidate`` after a job) to time it and read its peak memory. A second, 10x
smaller consolidation of the same shape shows whether memory stays flat as the input grows.

Prints: capture rate per rank (median, min), daemon ingest per node (records written by each
node's daemon over the span its ranks were producing, and whether any rank spilled to its own
file), job wall time, consolidation rate and peak RSS for both sizes, and output size.

Usage: python benchmarks/bench_scale.py [--nodes 16] [--ranks-per-node 8] [--tasks 100000]
       (the default is the issue's aim: 128 ranks on 16 nodes, 12.8 M tasks; --quick: 4x2x20k)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from cluster.rig import NamespaceCluster, missing_requirements  # noqa: E402

from flowcept.consolidation import consolidated_path  # noqa: E402

APP = REPO / "benchmarks" / "scale_app.py"
WORK_TASK = b'"activity_id":"work"'  # how scale_app.py's tasks serialize (orjson: no spaces)
# its own rig, never the tests' (tag 0, /tmp/flowcept-nscluster): the two may run at the same time
RIG_TAG = 1
RIG_BASE = Path("/tmp/flowcept-nscluster-bench")
CONSOLIDATE_TIMEOUT_S = 3600


def _count_lines(path: str) -> int:
    count = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            count += chunk.count(b"\n")
    return count


def _count_bytes(path: str, needle: bytes) -> int:
    """Occurrences of ``needle`` in a file, read in blocks (one that straddles two blocks counted once)."""
    count, tail = 0, b""
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            block = tail + chunk
            count += block.count(needle)
            # keep what could start a match that ends in the next block, but never a whole match
            tail = block[-(len(needle) - 1):] if len(needle) > 1 else b""
    return count


def _hdf5_rows(path: str) -> dict:
    """Rows per group of a consolidated HDF5 file, from the datasets' shapes (nothing is read)."""
    import h5py

    from flowcept.hdf5_store import GROUPS

    with h5py.File(path, "r") as handle:
        return {g: handle[g]["seq"].shape[0] for g in GROUPS if g in handle and "seq" in handle[g]}


def _consolidate(workflow_id: str, buffer_path: str, fmt: str = "jsonl") -> dict:
    """Run consolidation in a child process; its wall time and peak RSS.

    The peak is the child's own VmHWM (high-water mark of its address space after exec): wait4's
    ru_maxrss is not, because Linux carries the pre-exec high-water mark across execve, and a
    vfork()ed child's pre-exec memory is this script's, so it would report at least our own peak.
    """
    code = ("import sys; from flowcept.consolidation import consolidate, consolidated_path; "
            "consolidate(sys.argv[2], sys.argv[1], output_format=sys.argv[3], cleanup_files=False); "
            "print(consolidated_path(sys.argv[2], sys.argv[1], sys.argv[3])); "
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))")
    # the child's output goes to files, not pipes: nobody reads a pipe while wait4 waits, so a child
    # writing more than a pipe holds (64 KiB) would block for ever
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, workflow_id, buffer_path, fmt], stdout=out, stderr=err)
        pidfd = os.pidfd_open(proc.pid)
        try:
            exited = select.select([pidfd], [], [], CONSOLIDATE_TIMEOUT_S)[0]
        finally:
            os.close(pidfd)
        if not exited:
            proc.kill()
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it here, so its rusage is ours to read
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read()[-2000:].decode(errors="replace")
    if not exited:
        raise SystemExit(f"consolidation did not finish within {CONSOLIDATE_TIMEOUT_S} s: {stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"consolidation failed ({proc.returncode}): {stderr}")
    *_, output, hwm_kib = stdout.strip().splitlines()
    if fmt == "jsonl":
        records, work_tasks = _count_lines(output), _count_bytes(output, WORK_TASK)
    else:
        rows = _hdf5_rows(output)
        records, work_tasks = sum(rows.values()), rows.get("tasks", 0)
    return {"seconds": wall, "peak_rss_mib": int(hwm_kib) / 1024, "wait4_maxrss_mib": usage.ru_maxrss / 1024,
            "records": records,
            "work_tasks": work_tasks, "bytes": os.path.getsize(output), "path": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks per rank")
    parser.add_argument("--quick", action="store_true", help="4 nodes x 2 ranks x 20k tasks")
    parser.add_argument("--keep", action="store_true", help="keep the output directory")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.ranks_per_node, args.tasks = 4, 2, 20_000
    missing = missing_requirements()
    if missing:
        sys.exit(f"needs: {', '.join(missing)}")
    ranks = args.nodes * args.ranks_per_node
    work = Path(tempfile.mkdtemp(prefix="flowcept-scale-"))
    out, results = work / "out", work / "results"
    out.mkdir()
    results.mkdir()
    launch = Path(sys.executable).with_name("flowcept-launch")
    launch_cmd = [str(launch)] if launch.exists() else [sys.executable, "-m", "flowcept.launch"]
    cluster = NamespaceCluster(nodes=args.nodes, cpus_per_node=max(4, args.ranks_per_node), tag=RIG_TAG,
                               base=RIG_BASE)
    print(f"machine: {os.cpu_count()} CPUs; {args.nodes} nodes x {args.ranks_per_node} ranks = {ranks} ranks, "
          f"{args.tasks:,} tasks each = {ranks * args.tasks:,} tasks")
    up_s = cluster.up()
    print(f"rig up in {up_s:.1f} s")
    try:
        env = {**os.environ, "FLOWCEPT_PROJECT_DUMP_BUFFER_PATH": str(out / "flowcept_buffer.jsonl")}
        start = time.perf_counter()
        proc = cluster.run(["srun", "-N", str(args.nodes), f"--ntasks-per-node={args.ranks_per_node}", *launch_cmd,
                            "--no-consolidate", "--keep-files", "-q", "--output-dir", str(out), "--",
                            sys.executable, str(APP), str(results), str(args.tasks)],
                           env=env, timeout=3600, check=False)
        job_s = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"job failed ({proc.returncode}): {proc.stderr[-3000:]}")
    finally:
        cluster.down()

    rank_results = [json.loads(p.read_text()) for p in results.glob("rank*.json")]
    assert len(rank_results) == ranks, f"{len(rank_results)} of {ranks} ranks reported"
    rates = sorted(r["tasks"] / r["capture_s"] for r in rank_results)
    print(f"job wall time {job_s:.1f} s; {ranks * args.tasks / job_s:,.0f} tasks/s for the whole machine")
    cpu = sorted(r["capture_cpu_s"] / r["tasks"] * 1e6 for r in rank_results)
    print(f"capture CPU per task (process time of each rank, flusher thread included): median "
          f"{statistics.median(cpu):.2f} us, max {cpu[-1]:.2f} us; a rank on a core of its own would capture "
          f"{1e6 / statistics.median(cpu):,.0f} tasks/s")
    print(f"capture per rank: median {statistics.median(rates):,.0f} tasks/s "
          f"({1e6 / statistics.median(rates):.2f} us/task), slowest {rates[0]:,.0f}, fastest {rates[-1]:,.0f}; "
          f"stop() median {statistics.median(r['stop_s'] for r in rank_results) * 1e3:.1f} ms")

    node_files = sorted(glob.glob(str(out / "flowcept_buffer_*_node-*.jsonl")))
    workflow_id = Path(node_files[0]).name.split("_")[2]
    per_node = []
    for path in node_files:
        node = path.rsplit("_node-", 1)[1].removesuffix(".jsonl")
        mine = [r for r in rank_results if r["node"] == node]
        span = max(r["ended_at"] for r in mine) - min(r["began_at"] for r in mine)
        records = _count_lines(path)
        per_node.append((node, records, records / span if span > 0 else 0.0))
    # A rank's own file (<stem>_<wf>_<host>_<pid>.jsonl) holding tasks is a spill: its daemon did not
    # take them. Node files (_node-), rank records (_ranks-) and the consolidated output are not.
    per_process = re.compile(rf"^flowcept_buffer_{re.escape(workflow_id)}_.+_\d+\.jsonl$")
    consolidated = Path(consolidated_path(str(out / "flowcept_buffer.jsonl"), workflow_id)).name
    spilled = [p for p in glob.glob(str(out / "flowcept_buffer_*.jsonl"))
               if per_process.match(Path(p).name) and "_node-" not in p and "_ranks-" not in p
               and Path(p).name != consolidated and _count_bytes(p, WORK_TASK) > 0]
    shared_files = sum(len(files) for _, _, files in os.walk(out))
    print(f"files the job left on the output filesystem: {shared_files} for {args.nodes} nodes and {ranks} ranks")
    node_rates = sorted(rate for _, _, rate in per_node)
    print(f"daemon ingest per node: median {statistics.median(node_rates):,.0f} records/s over the ranks' span "
          f"(min {node_rates[0]:,.0f}, max {node_rates[-1]:,.0f}); {len(node_files)} node files, "
          f"{sum(r for _, r, _ in per_node):,} records; per-process files with spilled tasks: {len(spilled)}")

    full = _consolidate(workflow_id, str(out / "flowcept_buffer.jsonl"))
    expected_tasks = ranks * args.tasks
    print(f"consolidation (full): {full['records']:,} records, {full['bytes'] / 2**20:,.0f} MiB in "
          f"{full['seconds']:.1f} s = {full['records'] / full['seconds']:,.0f} records/s; "
          f"peak RSS {full['peak_rss_mib']:.0f} MiB")
    # count the app's tasks themselves: telemetry and other lines must not hide a missing task
    verdict = "all present, each once" if full["work_tasks"] == expected_tasks else (
        f"WARNING: {expected_tasks - full['work_tasks']:,} missing" if full["work_tasks"] < expected_tasks
        else f"WARNING: {full['work_tasks'] - expected_tasks:,} too many (duplicates)")
    print(f"tasks in the consolidated output: {full['work_tasks']:,} of {expected_tasks:,} "
          f"({ranks} ranks x {args.tasks:,}): {verdict}")

    # a 10x smaller input of the same shape: the first tenth of each node file
    small_dir = work / "small"
    small_dir.mkdir()
    for path in node_files:
        keep = _count_lines(path) // 10
        with open(path, "rb") as src, open(small_dir / Path(path).name, "wb") as dst:
            for i, line in enumerate(src):
                if i >= keep:
                    break
                dst.write(line)
    small = _consolidate(workflow_id, str(small_dir / "flowcept_buffer.jsonl"))
    print(f"consolidation (1/10 input): {small['records']:,} records in {small['seconds']:.1f} s = "
          f"{small['records'] / small['seconds']:,.0f} records/s; peak RSS {small['peak_rss_mib']:.0f} MiB "
          f"(full/small peak RSS ratio {full['peak_rss_mib'] / small['peak_rss_mib']:.2f} for 10x the input)")
    try:
        import h5py  # noqa: F401

        h5 = _consolidate(workflow_id, str(small_dir / "flowcept_buffer.jsonl"), "hdf5")
        print(f"consolidation to HDF5 (1/10 input): {h5['records']:,} rows ({h5['work_tasks']:,} tasks; JSONL had "
              f"{small['work_tasks']:,}) in {h5['seconds']:.1f} s = {h5['records'] / h5['seconds']:,.0f} records/s; "
              f"peak RSS {h5['peak_rss_mib']:.0f} MiB; {h5['bytes'] / 2**20:,.0f} MiB")
    except ImportError:
        print("h5py not installed: HDF5 consolidation skipped")
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(this script's own peak RSS: {self_rss:.0f} MiB)")
    if args.keep:
        print(f"output kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
