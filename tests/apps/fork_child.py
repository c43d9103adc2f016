"""os.fork() inside a run with records still queued (long flush interval).

argv: workflow_id out_file. The parent captures 5 tasks (queued), forks; the child captures 3
tasks, stops, and leaves with os._exit (no atexit), after Flowcept.stop() flushed; the parent
captures 2 more, waits for the child, stops. out_file gets "<parent pid> <child pid>".
"""

import os
import sys

from flowcept import Flowcept, FlowceptTask


def main() -> None:
    workflow_id, out = sys.argv[1], sys.argv[2]
    flowcept = Flowcept(workflow_id=workflow_id, workflow_name="fork").start()
    for i in range(5):
        FlowceptTask(activity_id="parent_before", used={"i": i}, generated={"ok": 1})
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            for i in range(3):
                FlowceptTask(activity_id="child", used={"i": i}, generated={"ok": 1})
            # Records must reach the child's own file without stop(): flush as a killed-at-exit
            # child would (exit hooks), then leave without running the parent's atexit.
            from flowcept.buffer import flush_pipeline

            flush_pipeline(durable=True)
        except BaseException:
            code = 3
        os._exit(code)
    for i in range(2):
        FlowceptTask(activity_id="parent_after", used={"i": i}, generated={"ok": 1})
    _, status = os.waitpid(pid, 0)
    flowcept.stop()
    with open(out, "w") as handle:
        handle.write(f"{os.getpid()} {pid} {status}")


if __name__ == "__main__":
    main()
