"""A rank streaming numbered tasks through the real library (FLOWCEPT_DAEMON_ADDRESS set by the test).

argv: workflow_id n [pause_at paused_file resume_file]
Runs tasks 0..pause_at-1, makes them durable (acknowledged or spilled), touches paused_file,
waits (bounded) for resume_file, then runs the rest. Prints the link counters as JSON at the end.
"""

import json
import os
import sys
import time

from flowcept import Flowcept, FlowceptTask
from flowcept.buffer import get_pipeline


def wait_for_file(path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.005)  # polling a file the test creates, with a deadline


def main() -> None:
    workflow_id, n = sys.argv[1], int(sys.argv[2])
    pause_at = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    with Flowcept(workflow_id=workflow_id, workflow_name="daemon-test"):
        for i in range(n):
            if i == pause_at:
                get_pipeline().flush(durable=True)
                with open(sys.argv[4], "w"):
                    pass
                wait_for_file(sys.argv[5])
            with FlowceptTask(activity_id="numbered", used={"i": i, "pid": os.getpid()}) as task:
                task.end(generated={"twice": 2 * i})
        pipeline = get_pipeline()
        transport = pipeline.transport
    print(json.dumps({"transport": type(transport).__name__, "counters": pipeline.counters()}))


if __name__ == "__main__":
    main()
