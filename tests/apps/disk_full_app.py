"""Writes tasks while its output filesystem is full, then after the test frees space.

Usage: python disk_full_app.py HANDSHAKE_DIR N. Runs N tasks, flushes (the writes fail: the disk
is full), writes HANDSHAKE_DIR/ready, waits (bounded) for HANDSHAKE_DIR/go, runs N more tasks and
stops (consolidation). Prints the workflow id.
"""

import os
import sys
import time

from flowcept import Flowcept, FlowceptTask
from flowcept.buffer import get_pipeline

handshake, count = sys.argv[1], int(sys.argv[2])
with Flowcept(workflow_name="disk-full") as run:
    for i in range(count):
        with FlowceptTask(activity_id="before", used={"i": i, "pad": "x" * 200}) as task:
            task.end(generated={"i": i})
    get_pipeline().flush()
    open(os.path.join(handshake, "ready"), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(handshake, "go")):
        if time.monotonic() > deadline:
            sys.exit("timed out waiting for go")
        time.sleep(0.01)  # polling the test's file with a deadline
    for i in range(count):
        with FlowceptTask(activity_id="after", used={"i": i}) as task:
            task.end(generated={"i": i})
print(run.current_workflow_id)
