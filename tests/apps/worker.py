"""Capture N tasks into workflow WF (argv: workflow_id n [tag]); consolidation on stop per env."""

import sys

from flowcept import Flowcept, FlowceptTask, flowcept_task


@flowcept_task
def work(i, tag="w"):
    return {"double": 2 * i}


def main() -> None:
    workflow_id, n = sys.argv[1], int(sys.argv[2])
    tag = sys.argv[3] if len(sys.argv) > 3 else "w"
    with Flowcept(workflow_id=workflow_id, workflow_name="mp"):
        for i in range(n):
            with FlowceptTask(activity_id="manual", used={"i": i, "tag": tag}) as task:
                task.end(generated={"i": i})
            work(i, tag=tag)


if __name__ == "__main__":
    main()
