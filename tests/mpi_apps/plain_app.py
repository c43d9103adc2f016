"""A rank of a job launched without MPI in the application (e.g. ``srun python app.py``).

Usage: python plain_app.py RESULT_DIR [tasks]. Placement comes from the environment the test
sets (SLURM_*, FLOWCEPT_HOSTNAME/FLOWCEPT_NODE_NAME for virtual nodes); writes what it captured.
"""

import os
import sys

import orjson

from flowcept import Flowcept, FlowceptLoop, FlowceptTask, flowcept_task

result_dir = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 5
rank = int(os.environ.get("SLURM_PROCID", "0"))


@flowcept_task
def solve(a, b=2):
    return a * b


with Flowcept(workflow_name="plain-app") as flowcept:
    for i in range(count):
        with FlowceptTask(activity_id="step", used={"i": i, "r": rank}) as task:
            task.end(generated={"v": i})
    solve(rank)
    for _ in FlowceptLoop(range(2), loop_name="epochs"):
        pass
    ids = [r["task_id"] for r in flowcept.get_buffer() if r.get("type") == "task"]

out = {"rank": rank, "workflow_id": flowcept.current_workflow_id, "campaign_id": flowcept.campaign_id,
       "task_ids": ids, "output_path": flowcept.output_path}
with open(os.path.join(result_dir, f".rank{rank}.tmp"), "wb") as handle:
    handle.write(orjson.dumps(out))
os.replace(os.path.join(result_dir, f".rank{rank}.tmp"), os.path.join(result_dir, f"rank{rank}.json"))
