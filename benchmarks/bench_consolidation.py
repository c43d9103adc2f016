"""Consolidation speed and memory, against ``cat`` of the same files in the same run.

    python benchmarks/bench_consolidation.py [--small] [--files 16] [--records 100000] [--no-mpi]

1. 16 per-process files x N task records: ``cat`` of them into one file (baseline), then
   JSONL and HDF5 consolidation in a child process each: records/s and the ratio to ``cat``.
2. Peak memory (VmHWM of the child) of JSONL and HDF5 consolidation at N/10 and N records
   per file: flat memory means the 10x input barely moves it.
3. ``stop()`` of a real ``mpirun -np 4`` job: the time stop() takes on rank 0 beyond the
   consolidation itself (barriers, flushes, file handling).
Targets: JSONL >= 1/3 of cat's records/s, HDF5 >= 500,000 records/s, stop() overhead <= 50 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = "bench-wf-0001"

# Peak memory is the child's own VmHWM: ru_maxrss would also count the parent's pages at fork
# (Linux keeps the pre-exec high-water mark), and the parent holds the generated data.
_CHILD = r"""
import sys, time, orjson
from flowcept.consolidation import consolidate
began = time.perf_counter()
report = consolidate(sys.argv[1], sys.argv[2], output_format=sys.argv[3], cleanup_files=False)
elapsed = time.perf_counter() - began
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(orjson.dumps({"elapsed": elapsed, "records": report.records_out, "maxrss_kib": hwm}).decode())
"""


def make_files(directory: Path, files: int, records: int) -> int:
    """Write ``files`` per-process files of ``records`` realistic task lines; returns total bytes."""
    total = 0
    for number in range(files):
        prefix = f"{number + 1:016x}"
        host = f"node{number // 4}"
        template = {"type": "task", "task_id": "", "workflow_id": WORKFLOW, "campaign_id": "camp-1",
                    "activity_id": "step", "started_at": 0.0, "parent_task_id": None, "hostname": host,
                    "node_name": host, "pid": 1000 + number, "rank": number, "local_rank": number % 4,
                    "login_name": "user", "used": {"i": 0, "x": 1.5}, "ended_at": 0.0, "status": "FINISHED",
                    "generated": {"v": 0}}
        chunks = []
        for i in range(1, records + 1):
            template["task_id"] = f"{prefix}.{i}"
            template["started_at"] = 1.7e9 + i * 1e-3
            template["ended_at"] = 1.7e9 + i * 1e-3 + 5e-4
            template["used"]["i"] = i
            template["generated"]["v"] = i * 2
            chunks.append(orjson.dumps(template))
        data = b"\n".join(chunks) + b"\n"
        (directory / f"flowcept_buffer_{WORKFLOW}_{host}_{1000 + number}.jsonl").write_bytes(data)
        total += len(data)
    return total


def run_child(base: str, fmt: str) -> dict:
    """Consolidate in a child; returns its elapsed time, record count and peak RSS (VmHWM, KiB)."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, base, WORKFLOW, fmt], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=str(ROOT))
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"consolidation child failed: {err.decode()}")
    result = orjson.loads(out.splitlines()[-1])
    result.setdefault("maxrss_kib", usage.ru_maxrss)
    return result


def time_cat(directory: Path) -> float:
    sources = sorted(str(p) for p in directory.glob(f"flowcept_buffer_{WORKFLOW}_*.jsonl"))
    target = directory / "cat_out.jsonl"
    began = time.perf_counter()
    with open(target, "wb") as handle:
        subprocess.run(["cat", *sources], stdout=handle, check=True)
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - began
    target.unlink()
    return elapsed


def bench_merge(files: int, records: int) -> None:
    print(f"== consolidation of {files} files x {records:,} records")
    rows = {}
    for scale, per_file in (("1/10", max(1, records // 10)), ("1", records)):
        with tempfile.TemporaryDirectory(prefix="fc-bench-") as tmp:
            directory = Path(tmp)
            size = make_files(directory, files, per_file)
            base = str(directory / "flowcept_buffer.jsonl")
            total = files * per_file
            cat_s = min(time_cat(directory) for _ in range(2))
            jsonl = run_child(base, "jsonl")
            # Again, with the output beside its sources: every record twice, all deduplicated
            # (the path a spilled batch or a re-run takes; no copy as it is).
            again = run_child(base, "jsonl")
            (directory / f"flowcept_buffer_{WORKFLOW}.jsonl").unlink()
            hdf5 = run_child(base, "hdf5")
            assert jsonl["records"] == total and hdf5["records"] == total and again["records"] == total
            rows[scale] = (jsonl, hdf5, again)
            print(f"  input x{scale}: {total:,} records, {size / 2**20:.0f} MiB")
            print(f"    cat          {total / cat_s:>12,.0f} records/s  ({cat_s:.3f} s)   [baseline]")
            print(f"    JSONL        {total / jsonl['elapsed']:>12,.0f} records/s  ({jsonl['elapsed']:.3f} s)"
                  f"   {cat_s / jsonl['elapsed']:.2f} x cat (target >= 0.33)")
            print(f"    HDF5         {total / hdf5['elapsed']:>12,.0f} records/s  ({hdf5['elapsed']:.3f} s)"
                  f"   {cat_s / hdf5['elapsed']:.2f} x cat (target >= 500,000 records/s)")
            print(f"    JSONL dedup  {2 * total / again['elapsed']:>12,.0f} records/s  ({again['elapsed']:.3f} s)"
                  f"   {cat_s / again['elapsed']:.2f} x cat (input: output + sources, every record twice)")
    print("  peak memory of the consolidating child (VmHWM) as the input grows 10x:")
    for index, name in enumerate(("JSONL", "HDF5", "JSONL dedup")):
        small, large = rows["1/10"][index], rows["1"][index]
        print(f"    {name:<11} {small['maxrss_kib'] / 1024:7.1f} MiB -> {large['maxrss_kib'] / 1024:7.1f} MiB "
              f"(x{large['maxrss_kib'] / small['maxrss_kib']:.2f} for 10x input)")


def bench_stop(tasks: int) -> None:
    if shutil.which("mpirun") is None:
        print("== stop() of a 4-rank job: skipped (no mpirun)")
        return
    env = dict(os.environ)
    env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_oob_tcp_if_include": "lo",
                "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_btl": "self,vader"})
    overheads = []
    for _ in range(3):
        with tempfile.TemporaryDirectory(prefix="fc-stop-") as tmp:
            env["FLOWCEPT_PROJECT_DUMP_BUFFER_PATH"] = os.path.join(tmp, "flowcept_buffer.jsonl")
            subprocess.run(["mpirun", "-np", "4", sys.executable, str(ROOT / "tests/mpi_apps/mpi_app.py"), tmp,
                            "ok", str(tasks)], env=env, check=True, capture_output=True, timeout=300)
            root = orjson.loads(Path(tmp, "rank0.json").read_bytes())
            overheads.append((root["stop_s"], root["consolidation_s"]))
    print(f"== stop() of a 4-rank mpirun job ({tasks:,} tasks per rank), rank 0, 3 runs")
    for stop_s, merge_s in overheads:
        print(f"    stop() {stop_s * 1e3:7.1f} ms = consolidation {merge_s * 1e3:7.1f} ms "
              f"+ {(stop_s - merge_s) * 1e3:6.1f} ms beyond it (target <= 50 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="16 x 10,000 records: a quick run")
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--no-mpi", action="store_true", help="skip the mpirun stop() measurement")
    args = parser.parse_args()
    records = args.records or (10_000 if args.small else 100_000)
    bench_merge(args.files, records)
    if not args.no_mpi:
        bench_stop(500 if args.small else 5000)


if __name__ == "__main__":
    main()
