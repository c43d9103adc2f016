"""Writes tasks while its output filesystem is full, then after the test frees space.

Usage: python disk_full_app.py HANDSHAKE_DIR N. Runs N tasks, flushes (the writes fail: the disk
is full), writes HANDSHAKE_DIR/ready, waits for a line on stdin (the test frees space first; the
wait is bounded by an alarm), runs N more tasks and stops (consolidation). Prints the workflow id.
"""

import os
import signal
import sys

from flowcept import Flowcept, FlowceptTask
from flowcept.buffer import get_pipeline

handshake, count = sys.argv[1], int(sys.argv[2])
with Flowcept(workflow_name="disk-full") as run:
    for i in range(count):
        with FlowceptTask(activity_id="before", used={"i": i, "pad": "x" * 200}) as task:
            task.end(generated={"i": i})
    get_pipeline().flush()
    open(os.path.join(handshake, "ready"), "w").close()
    signal.alarm(60)  # a test that never says go ends this process instead of hanging it
    sys.stdin.readline()
    signal.alarm(0)
    for i in range(count):
        with FlowceptTask(activity_id="after", used={"i": i}) as task:
            task.end(generated={"i": i})
print(run.current_workflow_id)
