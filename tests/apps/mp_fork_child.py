"""multiprocessing (fork) children capture tasks and return normally; none may be lost.

argv: workflow_id n_children n_tasks [pool ROUNDS]
With ``pool``: ROUNDS times ``with Pool(n_children) as pool: pool.map(work, ...)``; leaving the
``with`` terminates the pool, i.e. SIGTERMs workers that may already be closing their pipelines.
"""

import multiprocessing as mp
import sys

from flowcept import Flowcept, FlowceptTask, flowcept_task


@flowcept_task
def work(round_index: int, i: int) -> int:
    return i


def work_item(args: tuple) -> int:
    return work(*args)


def child(index: int, n_tasks: int) -> None:
    for i in range(n_tasks):
        FlowceptTask(activity_id="mp_child", used={"child": index, "i": i}, generated={"ok": 1})


def main() -> None:
    workflow_id, n_children, n_tasks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ctx = mp.get_context("fork")
    with Flowcept(workflow_id=workflow_id, workflow_name="mp_fork"):
        FlowceptTask(activity_id="parent", used={"x": 1}, generated={"ok": 1})
        if sys.argv[4:5] == ["pool"]:
            for round_index in range(int(sys.argv[5])):
                with ctx.Pool(n_children) as pool:
                    pool.map(work_item, [(round_index, i) for i in range(n_tasks)])
            return
        procs = [ctx.Process(target=child, args=(k, n_tasks)) for k in range(n_children)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
            if proc.exitcode != 0:
                sys.exit(f"child exit code {proc.exitcode}")


if __name__ == "__main__":
    main()
