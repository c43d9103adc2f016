"""Jobs the multi-node tests run on the rig: the launcher's command line and a job paused mid-way.

A paused job runs ``tests/launch_apps/instrumented.py --pause``: every rank captures its first
tasks, makes them durable, writes ``<handshake>/ready-<rank>`` (its daemon's address) and waits
for ``<handshake>/go``. The test looks at, or disturbs, the running job in between.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
INSTRUMENTED = str(REPO / "tests" / "launch_apps" / "instrumented.py")
_script = Path(sys.executable).with_name("flowcept-launch")
LAUNCH: List[str] = [str(_script)] if _script.exists() else [PY, "-m", "flowcept.launch"]


class PausedJob:
    """The running job while paused; its outcome once the ``with`` block has let it finish."""

    def __init__(self, process: subprocess.Popen, handshake: Path):
        self.process = process
        self.handshake = handshake
        self.stdout = self.stderr = ""
        self.returncode: Optional[int] = None

    def ready(self) -> Dict[int, str]:
        """What each paused rank wrote: its daemon's address."""
        return {int(p.name.split("-")[1]): p.read_text() for p in self.handshake.glob("ready-*")}


@contextmanager
def paused_launch(cluster, out: Path, handshake: Path, tasks: int, nodes: int = 4, per_node: int = 2,
                  env: Optional[Dict[str, str]] = None) -> Iterator[PausedJob]:
    """``srun -N nodes flowcept-launch`` of the pausing app; yields once every rank is paused.

    Leaving the block releases the ranks and waits (bounded) for the job; a job still running
    then, or after an error in the block, is killed.
    """
    args = ["srun", "-N", str(nodes), f"--ntasks-per-node={per_node}", *LAUNCH, "--output-dir", str(out), "--",
            PY, INSTRUMENTED, "--tasks", str(tasks), "--pause", str(handshake)]
    process = cluster.popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = PausedJob(process, handshake)
    try:
        ranks = nodes * per_node
        wait_for(lambda: len(list(handshake.glob("ready-*"))) == ranks or process.poll() is not None, 60,
                 "every rank to pause")
        assert process.poll() is None, process.communicate()
        yield job
        (handshake / "go").write_text("")
        job.stdout, job.stderr = process.communicate(timeout=120)
        job.returncode = process.returncode
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
