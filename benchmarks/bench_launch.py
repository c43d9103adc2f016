"""Launcher overhead: `srun -n 4 flowcept-launch true` against `srun -n 4 true`, same run.

Prints median wall times, the added seconds (target: at most 0.3 s) and the ratio to the
baseline, with and without the node daemon, plus the peak RSS of one launcher process.
Needs a running Slurm (scripts/slurm-up.sh). Usage: python benchmarks/bench_launch.py [repeats]
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List


def _wall(command: List[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - start


def _launcher_rss_bytes(cwd: str) -> int:
    """Peak RSS of one launcher process (its `true` child is far smaller)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "flowcept.launch", "--no-daemon", "-q", "true"], cwd=cwd, check=True,
                   timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(before, after) * 1024


def main() -> None:
    if shutil.which("srun") is None:
        sys.exit("needs srun and a running Slurm (bash scripts/slurm-up.sh)")
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    launch = shutil.which("flowcept-launch") or "flowcept-launch"
    variants: Dict[str, List[str]] = {
        "srun -n 4 true": ["srun", "-n", "4", "true"],
        "srun -n 4 flowcept-launch --no-daemon true": ["srun", "-n", "4", launch, "--no-daemon", "-q", "true"],
        "srun -n 4 flowcept-launch true (daemon)": ["srun", "-n", "4", launch, "-q", "true"],
    }
    times: Dict[str, List[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as cwd:
        for command in variants.values():  # warm-up (page cache, Slurm)
            _wall(command, cwd)
        for _ in range(repeats):  # interleaved so drift hits every variant alike
            for name, command in variants.items():
                times[name].append(_wall(command, cwd))
        rss = _launcher_rss_bytes(cwd)
    base = statistics.median(times["srun -n 4 true"])
    print(f"cpus={os.cpu_count()} repeats={repeats}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:45s} median {median:6.3f} s  added {median - base:+6.3f} s  ratio {median / base:5.2f}x")
    print(f"launcher peak RSS per rank: {rss / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
