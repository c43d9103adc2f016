"""multiprocessing (fork) children capture tasks and return normally; none may be lost.

argv: workflow_id n_children n_tasks
"""

import multiprocessing as mp
import sys

from flowcept import Flowcept, FlowceptTask


def child(index: int, n_tasks: int) -> None:
    for i in range(n_tasks):
        FlowceptTask(activity_id="mp_child", used={"child": index, "i": i}, generated={"ok": 1})


def main() -> None:
    workflow_id, n_children, n_tasks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ctx = mp.get_context("fork")
    with Flowcept(workflow_id=workflow_id, workflow_name="mp_fork"):
        FlowceptTask(activity_id="parent", used={"x": 1}, generated={"ok": 1})
        procs = [ctx.Process(target=child, args=(k, n_tasks)) for k in range(n_children)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
            if proc.exitcode != 0:
                sys.exit(f"child exit code {proc.exitcode}")


if __name__ == "__main__":
    main()
