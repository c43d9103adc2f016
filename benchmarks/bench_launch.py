"""Launcher overhead: `srun -n 4 flowcept-launch true` against `srun -n 4 true`, same run.

Prints median (and minimum) wall times, the added seconds (target: at most 0.3 s) and the ratio
to the baseline, with and without the node daemon; then the peak RSS of one launcher process run
alone (global rank 0's work included) and the resident memory of each launcher of a two-rank job
while its command runs (what the launcher costs a node for the length of the job).
``--ref REV`` also runs the launcher as it was at git revision REV (its ``launch/`` files,
extracted to a temporary directory, with today's library), interleaved with the others, so a
before/after comparison shares one run and one machine load.

Needs a running Slurm (scripts/slurm-up.sh).
Usage: python benchmarks/bench_launch.py [repeats] [--ref REV]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent

# Runs a launcher whose files lie in the folder given first, as `flowcept.launch`.
_RUN_REF = """import importlib.util, sys
folder = sys.argv.pop(1)
spec = importlib.util.spec_from_file_location("flowcept.launch", folder + "/__init__.py",
                                              submodule_search_locations=[folder])
module = importlib.util.module_from_spec(spec)
sys.modules["flowcept.launch"] = module
spec.loader.exec_module(module)
from flowcept.launch.__main__ import main
sys.exit(main())
"""


def _wall(command: List[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - start


def _rss_bytes(command: List[str], cwd: str) -> int:
    """Peak RSS of one launcher process (its `true` child is far smaller)."""
    script = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", script, *command], cwd=cwd, check=True, capture_output=True,
                         text=True, timeout=60)
    return int(out.stdout.split()[-1]) * 1024


def _vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _steady_rss(launch: List[str], cwd: str, daemon: bool) -> Dict[str, int]:
    """Resident memory of each launcher of a 2-rank job while its command (`sleep`) runs.

    Both ranks are started directly (Slurm's variables faked, one job step) so their pids are
    ours to read in /proc; sampled 0.8 s into a 1.5 s command, once each launcher is settled.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FLOWCEPT_"))}
    job = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": f"bench{os.getpid()}", "SLURM_STEP_ID": str(int(time.time()))}
    flags = [] if daemon else ["--no-daemon"]
    procs = {}
    for rank in (0, 1):
        env = dict(base, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), **job)
        procs[rank] = subprocess.Popen([*launch, *flags, "-q", "sleep", "1.5"], cwd=cwd, env=env)
    try:
        time.sleep(0.8)  # a benchmark's fixed sampling point, not synchronisation
        return {f"rank {rank}": _vm_rss(proc.pid) for rank, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.wait(timeout=60)


def _extract(rev: str, into: str) -> str:
    """The launch/ files of ``rev`` in ``into``; returns that folder."""
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "launch/"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    folder = os.path.join(into, "launch")
    os.makedirs(folder)
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=REPO, check=True, capture_output=True,
                                  text=True).stdout
            Path(folder, os.path.basename(name)).write_text(text)
    runner = os.path.join(into, "run_ref.py")
    Path(runner).write_text(_RUN_REF)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repeats", nargs="?", type=int, default=5)
    parser.add_argument("--ref", default=None, help="also time the launcher of this git revision")
    args = parser.parse_args()
    if shutil.which("srun") is None:
        sys.exit("needs srun and a running Slurm (bash scripts/slurm-up.sh)")
    # The script beside this interpreter, not a wrapper found first on PATH (a pyenv shim is a bash
    # script that runs `pyenv exec`: ~0.1 s per process, which is not the launcher's cost).
    beside = os.path.join(os.path.dirname(sys.executable), "flowcept-launch")
    launch = [beside] if os.access(beside, os.X_OK) else [shutil.which("flowcept-launch") or "flowcept-launch"]
    with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryDirectory() as refdir:
        variants: Dict[str, List[str]] = {
            "srun -n 4 true": ["srun", "-n", "4", "true"],
            "flowcept-launch --no-daemon true": ["srun", "-n", "4", *launch, "--no-daemon", "-q", "true"],
            "flowcept-launch true (daemon)": ["srun", "-n", "4", *launch, "-q", "true"],
        }
        rss_of = {"flowcept-launch": [*launch, "--no-daemon", "-q", "true"]}
        if args.ref:
            folder = _extract(args.ref, refdir)
            ref = [sys.executable, os.path.join(refdir, "run_ref.py"), folder]
            variants[f"{args.ref} --no-daemon true"] = ["srun", "-n", "4", *ref, "--no-daemon", "-q", "true"]
            variants[f"{args.ref} true (daemon)"] = ["srun", "-n", "4", *ref, "-q", "true"]
            rss_of[args.ref] = [*ref, "--no-daemon", "-q", "true"]
        times: Dict[str, List[float]] = {name: [] for name in variants}
        for command in variants.values():  # warm-up (page cache, Slurm)
            _wall(command, cwd)
        for _ in range(args.repeats):  # interleaved so drift hits every variant alike
            for name, command in variants.items():
                times[name].append(_wall(command, cwd))
        rss = {name: _rss_bytes(command, cwd) for name, command in rss_of.items()}
        steady = {("flowcept-launch", daemon): _steady_rss(launch, cwd, daemon) for daemon in (False, True)}
        if args.ref:
            steady.update({(args.ref, daemon): _steady_rss(ref, cwd, daemon) for daemon in (False, True)})
    base = statistics.median(times["srun -n 4 true"])
    base_min = min(times["srun -n 4 true"])
    print(f"cpus={os.cpu_count()} repeats={args.repeats} load={os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:40s} median {median:6.3f} s  added {median - base:+6.3f} s  ratio {median / base:5.2f}x"
              f"   min {min(values):6.3f} s  added {min(values) - base_min:+6.3f} s")
    for name, value in rss.items():
        print(f"peak RSS of one launcher process, alone ({name}): {value / 2**20:.1f} MiB")
    for (name, daemon), values in steady.items():
        text = ", ".join(f"{rank} {value / 2**20:.1f} MiB" for rank, value in values.items())
        print(f"RSS while the command runs, 2 ranks{' + daemon' if daemon else ''} ({name}): {text}")


if __name__ == "__main__":
    main()
