"""An MPI application instrumented on every rank; writes what it captured to RESULT_DIR.

Usage: python mpi_app.py RESULT_DIR [ok|raise|die] [tasks]
- ok:    every rank runs the workflow inside ``with Flowcept(...)``.
- raise: rank 2 raises inside its ``with`` block (its stop() still runs through __exit__).
- die:   rank 3 starts Flowcept, captures, then raises without ever calling stop(), so the
         others' barrier must time out instead of hanging (mpi4py finalizes it at exit).
"""

import os
import sys
import time

import orjson
from mpi4py import MPI

from flowcept import Flowcept, FlowceptLoop, FlowceptTask, flowcept_task

result_dir = sys.argv[1]
mode = sys.argv[2] if len(sys.argv) > 2 else "ok"
count = int(sys.argv[3]) if len(sys.argv) > 3 else 5
comm = MPI.COMM_WORLD
rank = comm.Get_rank()


@flowcept_task
def solve(a, b=2):
    return a * b


def work(flowcept):
    for i in range(count):
        with FlowceptTask(activity_id="step", used={"i": i, "r": rank}) as task:
            task.end(generated={"v": i * rank})
    solve(rank)
    for _ in FlowceptLoop(range(3), loop_name="epochs"):
        pass
    return [r["task_id"] for r in flowcept.get_buffer() if r.get("type") == "task"]


def report(flowcept, task_ids, stop_s=None, error=None):
    out = {"rank": rank, "size": comm.Get_size(), "workflow_id": flowcept.current_workflow_id,
           "campaign_id": flowcept.campaign_id, "bundle_exec_id": flowcept.bundle_exec_id,
           "task_ids": task_ids, "output_path": flowcept.output_path, "stop_s": stop_s, "error": error}
    report_consolidation = flowcept.last_consolidation
    if report_consolidation is not None:
        out["consolidation_s"] = getattr(report_consolidation, "elapsed_s", None)
    tmp = os.path.join(result_dir, f".rank{rank}.json.tmp")
    with open(tmp, "wb") as handle:
        handle.write(orjson.dumps(out))
    os.replace(tmp, os.path.join(result_dir, f"rank{rank}.json"))


if mode == "die":
    flowcept = Flowcept(workflow_name="mpi-app").start()
    ids = work(flowcept)
    if rank == 3:
        report(flowcept, ids)
        raise RuntimeError("rank 3 failed on purpose, before stop()")
    began = time.perf_counter()
    flowcept.stop()
    report(flowcept, ids, time.perf_counter() - began)
    sys.exit(0)

class TimedFlowcept(Flowcept):
    """Measures stop() (for benchmarks/bench_consolidation.py)."""

    stop_s = None

    def stop(self):
        began = time.perf_counter()
        super().stop()
        self.stop_s = time.perf_counter() - began


flowcept = TimedFlowcept(workflow_name="mpi-app")
ids = []
error = None
try:
    with flowcept:
        ids = work(flowcept)
        if mode == "raise" and rank == 2:
            raise RuntimeError("rank 2 failed on purpose")
except RuntimeError as exc:
    error = str(exc)
report(flowcept, ids, flowcept.stop_s, error=error)
if error:
    sys.exit(3)
