"""A small instrumented application shared by the examples: it configures nothing.

Under ``flowcept-launch`` the workflow id, output path and node daemon come from FLOWCEPT_*
variables; each rank records a few tasks in the launcher's workflow.
"""

import os

from flowcept import Flowcept, FlowceptTask

rank = int(os.environ.get("FLOWCEPT_RANK", "0"))
with Flowcept(workflow_name="slurm-example"):
    total = 0.0
    for step in range(5):
        with FlowceptTask(activity_id="app_step", used={"step": step, "rank": rank}) as task:
            total += sum(i * i for i in range(20000))
            task.end(generated={"total": total})
