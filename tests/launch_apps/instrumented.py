"""An application instrumented with Flowcept, run under flowcept-launch by the launcher tests.

It configures nothing: the workflow, output path and daemon come from the launcher's FLOWCEPT_*
variables. ``--tasks N`` tasks per rank; ``--exit-rank R --code C`` makes rank R exit with C;
``--hang DIR``: after the tasks are flushed, write DIR/ready-<rank> and wait (bounded) to be
signalled, as an application killed at its time limit. ``--pause DIR``: write DIR/ready-<rank>,
wait (bounded) for DIR/go, then run as many tasks again (``app_step_after``).
"""

import argparse
import os
import sys
import time

from flowcept import Flowcept, FlowceptTask
from flowcept.buffer import get_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--tasks", type=int, default=3)
parser.add_argument("--exit-rank", type=int, default=-1)
parser.add_argument("--code", type=int, default=3)
parser.add_argument("--hang", default=None)
parser.add_argument("--pause", default=None, help="write DIR/ready-<rank> (the daemon address), wait for DIR/go")
args = parser.parse_args()
rank = int(os.environ.get("FLOWCEPT_RANK", "0"))

with Flowcept(workflow_name="instrumented-app"):
    for i in range(args.tasks):
        with FlowceptTask(activity_id="app_step", used={"i": i, "rank": rank}) as task:
            task.end(generated={"square": i * i})
    if args.pause:
        get_pipeline().flush(durable=True)
        with open(os.path.join(args.pause, f"ready-{rank}"), "w") as handle:
            handle.write(os.environ.get("FLOWCEPT_DAEMON_ADDRESS", ""))
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(args.pause, "go")) and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(args.tasks):
            with FlowceptTask(activity_id="app_step_after", used={"i": i, "rank": rank}) as task:
                task.end(generated={"square": i * i})
    if args.hang:
        get_pipeline().flush(durable=True)
        with open(os.path.join(args.hang, f"ready-{rank}"), "w") as handle:
            handle.write(os.environ.get("FLOWCEPT_WORKFLOW_ID", ""))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # killed by the test's SIGTERM long before
            time.sleep(0.05)
if rank == args.exit_rank:
    sys.exit(args.code)
