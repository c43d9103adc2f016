"""Capture cost per task, measured up to the end of stop(), against a plain call in the same run.

Runs under whichever ``flowcept`` the interpreter imports: this project or the reference
package (1.0.3). ``--compare PYTHON`` runs the same script under another interpreter (e.g. a
venv with ``flowcept==1.0.3``) in the same invocation and prints the ratios reference / ours.

    python benchmarks/bench_capture.py                       # ours only
    python benchmarks/bench_capture.py --compare /tmp/refvenv/bin/python

Figures: wall time per task for ``with FlowceptTask(...) as t: t.end(generated=...)``, an
``@flowcept_task`` call and a ``FlowceptLoop`` iteration, each timed from the first capture to
the end of ``stop()`` (so deferred serialisation, file writes and consolidation count); the
median ``import flowcept`` time in fresh interpreters; resident memory growth per captured record.
Each repeat's output files are deleted after it (untimed, for both packages; see ``remove_outputs``).
Targets (issue #2): 2 µs, 2.5 µs, 1 µs, 30 ms.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS_US = {"task_us": 2.0, "decorator_us": 2.5, "loop_us": 1.0, "import_ms": 30.0}

REFERENCE_SETTINGS = """\
log: {log_file_level: disable, log_stream_level: disable}
project: {dump_buffer: {enabled: true, path: flowcept_buffer.jsonl}, enrich_messages: false}
telemetry_capture: {}
instrumentation: {enabled: true}
experiment: {}
mq: {enabled: false}
kv_db: {enabled: false}
web_server: {max_label_length: 30}
sys_metadata: {}
extra_metadata: {}
db_buffer: {}
databases: {mongodb: {enabled: false}, lmdb: {enabled: false}}
adapters: {}
agent: {}
"""


def which_flowcept() -> str:
    """'ours' when this project's core is importable, else 'reference'."""
    return "ours" if importlib.util.find_spec("flowcept.buffer") is not None else "reference"


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def plain(a, b=2):
    return a * b


def bench_plain(n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        plain(i)
    return (time.perf_counter() - start) / n * 1e6


def _flowcept(name: str):
    from flowcept import Flowcept

    return Flowcept(workflow_name=name).start()


def bench_task(n: int) -> float:
    from flowcept import FlowceptTask

    fc = _flowcept("bench_task")
    start = time.perf_counter()
    for i in range(n):
        with FlowceptTask(activity_id="step", used={"i": i}) as task:
            task.end(generated={"y": i})
    fc.stop()
    return (time.perf_counter() - start) / n * 1e6


def bench_decorator(n: int) -> float:
    from flowcept import flowcept_task

    @flowcept_task
    def solve(a, b=2):
        return a * b

    fc = _flowcept("bench_decorator")
    start = time.perf_counter()
    for i in range(n):
        solve(i)
    fc.stop()
    return (time.perf_counter() - start) / n * 1e6


def bench_loop(n: int) -> float:
    from flowcept.instrumentation.flowcept_loop import FlowceptLoop

    fc = _flowcept("bench_loop")
    start = time.perf_counter()
    for _ in FlowceptLoop(range(n), loop_name="epochs"):
        pass
    fc.stop()
    return (time.perf_counter() - start) / n * 1e6


def bench_memory(n: int) -> float:
    """RSS growth per captured record while the run is still open (what the buffer holds)."""
    import gc

    from flowcept import FlowceptTask

    fc = _flowcept("bench_memory")
    gc.collect()
    before = rss_bytes()
    for i in range(n):
        FlowceptTask(activity_id="m", used={"i": i}, generated={"y": i})
    if which_flowcept() == "ours":
        from flowcept.buffer import get_pipeline

        get_pipeline().drain()  # what is still queued is counted too; this only settles the flusher
    gc.collect()
    grown = rss_bytes() - before
    fc.stop()
    return grown / n


def bench_import(python: str, repeats: int, cwd: str, env: dict, what: str = "import flowcept") -> float:
    code = f"import time; t = time.perf_counter(); {what}; print(time.perf_counter() - t)"
    # Bytecode as an installed package has it: PYTHONDONTWRITEBYTECODE (set in some shells)
    # would recompile every module on every import, which no pip-installed user pays. One
    # untimed import fills a scratch bytecode cache used by both packages alike.
    env = dict(env)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(cwd, "pycache")
    subprocess.run([python, "-c", code], capture_output=True, cwd=cwd, env=env, timeout=120, check=True)
    times = []
    for _ in range(repeats):
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                             timeout=120, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]) * 1e3)
    return statistics.median(times)


def measure(n: int, repeats: int, memory_n: int) -> dict:
    """Run every case in this interpreter (already inside a scratch directory)."""
    import flowcept

    results = {"package": which_flowcept(), "version": getattr(flowcept, "__version__", "?"), "n": n}
    results["memory_bytes_per_record"] = bench_memory(memory_n)  # first: a fresh heap
    for name, func in (("plain_us", bench_plain), ("task_us", bench_task), ("decorator_us", bench_decorator),
                       ("loop_us", bench_loop)):
        times = []
        for _ in range(repeats):
            times.append(func(n))
            remove_outputs()
        results[name] = min(times)
    results["memory_n"] = memory_n
    return results


def remove_outputs() -> None:
    """Delete the files a timed run left in the scratch directory (untimed, both packages alike).

    Without this, every repeat writes its tens of MB into page-cache pages the VM has never
    touched (first-touch faults cost ~10x a recycled page here), so figures would depend on
    the machine's memory history more than on the code measured.
    """
    for name in os.listdir("."):
        if name.startswith("flowcept_buffer") and os.path.isfile(name):
            os.unlink(name)


def run_child(python: str, args: argparse.Namespace) -> dict:
    """Run this script under ``python`` in a scratch directory with offline settings; return its figures."""
    with tempfile.TemporaryDirectory(prefix="flowcept-bench-") as scratch:
        env = dict(os.environ)
        for name in list(env):
            if name.startswith("FLOWCEPT_"):
                del env[name]
        settings = os.path.join(scratch, "settings.yaml")
        with open(settings, "w") as handle:
            handle.write(REFERENCE_SETTINGS)
        env["FLOWCEPT_SETTINGS_PATH"] = settings
        env["FLOWCEPT_PROJECT_DUMP_BUFFER_PATH"] = os.path.join(scratch, "flowcept_buffer.jsonl")
        env["FLOWCEPT_LOG_LOG_STREAM_LEVEL"] = "disable"
        env.pop("PYTHONPATH", None)
        cmd = [python, os.path.abspath(__file__), "--child", "--n", str(args.n), "--repeats", str(args.repeats),
               "--memory-n", str(args.memory_n)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=scratch, env=env, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"benchmark under {python} failed:\n{out.stderr[-4000:]}")
        results = json.loads(out.stdout.strip().splitlines()[-1])
        results["import_ms"] = bench_import(python, args.import_repeats, scratch, env)
        results["import_api_ms"] = bench_import(
            python, args.import_repeats, scratch, env,
            "from flowcept import Flowcept, FlowceptTask, flowcept_task; "
            "from flowcept.instrumentation.flowcept_loop import FlowceptLoop")
        results["python"] = python
        return results


def report(runs: list) -> None:
    rows = [("plain call (µs)", "plain_us", None), ("FlowceptTask (µs/task)", "task_us", "task_us"),
            ("@flowcept_task (µs/call)", "decorator_us", "decorator_us"),
            ("FlowceptLoop (µs/iter)", "loop_us", "loop_us"), ("import flowcept (ms)", "import_ms", "import_ms"),
            ("import public API (ms)", "import_api_ms", "import_ms"),
            ("RSS per record (bytes)", "memory_bytes_per_record", None)]
    header = f"{'':28s}" + "".join(f"{r['package'] + ' ' + r['version']:>22s}" for r in runs)
    if len(runs) == 2:
        header += f"{'ref/ours':>10s}"
    header += f"{'target':>9s}"
    print(header)
    for label, key, target_key in rows:
        line = f"{label:28s}" + "".join(f"{r[key]:22.3f}" for r in runs)
        if len(runs) == 2:
            ours, ref = runs[0][key], runs[1][key]
            line += f"{(ref / ours if ours else float('nan')):10.2f}"
        if target_key:
            line += f"{TARGETS_US[target_key]:9.1f}"
        print(line)
    print(f"(n={runs[0]['n']} per case, best of repeats; memory over {runs[0]['memory_n']} records; "
          f"per-task times include stop())")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="tasks per case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-n", type=int, default=100_000)
    parser.add_argument("--import-repeats", type=int, default=7)
    parser.add_argument("--compare", metavar="PYTHON", help="interpreter with the reference flowcept")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.n, args.repeats, args.memory_n)))
        return
    runs = [run_child(sys.executable, args)]
    if args.compare:
        runs.append(run_child(args.compare, args))
    report(runs)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(runs, handle, indent=2)


if __name__ == "__main__":
    main()
