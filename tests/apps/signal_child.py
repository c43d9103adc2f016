"""Capture N tasks, tell the parent through a ready file, then wait to be signalled.

argv: workflow_id n ready_file mode, where mode is `plain` (default handlers) or `own`
(the application installs its own SIGTERM/SIGINT handler, which writes <ready_file>.handler and
exits with code 7), or `busy-task` / `busy-loop`: default handlers, and after the ready file it
keeps capturing (tasks, or loop iterations) until the signal comes, so that the signal lands
in the middle of the flushes the capturing thread makes itself.
"""

import os
import signal
import sys

from flowcept import Flowcept, FlowceptTask


def main() -> None:
    workflow_id, n, ready, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if mode == "own":
        def handler(signum, frame):
            with open(ready + ".handler", "w") as out:
                out.write(str(signum))
            sys.exit(7)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
    signal.alarm(60)  # never outlive a test that forgot us
    flowcept = Flowcept(workflow_id=workflow_id, workflow_name="signals").start()
    for i in range(n):
        FlowceptTask(activity_id="step", used={"i": i}, generated={"sq": i * i})
    tmp = ready + ".tmp"
    with open(tmp, "w") as out:
        out.write(str(os.getpid()))
    os.replace(tmp, ready)
    if mode == "busy-task":
        i = n
        while True:
            FlowceptTask(activity_id="step", used={"i": i}, generated={"sq": i * i})
            i += 1
    if mode == "busy-loop":
        from flowcept.instrumentation.flowcept_loop import FlowceptLoop

        for _ in FlowceptLoop(range(10**9), loop_name="busy", item_name="x"):
            pass
    while True:
        signal.pause()
    flowcept.stop()  # unreachable: the signal ends the process


if __name__ == "__main__":
    main()
