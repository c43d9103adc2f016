"""The main job on the embedded default: capture a small workflow, consolidate it, show it.

Run: python examples/quickstart.py [output-dir]
No server is needed: records stream to per-process JSONL files while the job runs and are
merged into one file per workflow when it stops.
"""

import os
import sys
import time

from flowcept import Flowcept, FlowceptLoop, FlowceptTask, flowcept_task

out_dir = sys.argv[1] if len(sys.argv) > 1 else "flowcept_output"
os.makedirs(out_dir, exist_ok=True)
os.environ.setdefault("FLOWCEPT_PROJECT_DUMP_BUFFER_PATH", os.path.join(out_dir, "flowcept_buffer.jsonl"))


@flowcept_task(output_names=["energy"])
def simulate(temperature: float, steps: int = 100) -> float:
    """A stand-in for a simulation step."""
    total = 0.0
    for i in range(steps):
        total += (temperature - i * 0.01) ** 2
    return -total / steps


with Flowcept(workflow_name="quickstart", workflow_args={"temperatures": [280, 300, 320]}) as run:
    with FlowceptTask(activity_id="prepare", used={"input": "params.yaml"}) as task:
        time.sleep(0.01)
        task.end(generated={"n_temperatures": 3})
    for temperature in FlowceptLoop([280.0, 300.0, 320.0], loop_name="sweep", item_name="temperature"):
        simulate(temperature)
    workflow_id = run.current_workflow_id

records = Flowcept.read_buffer_file(workflow_id=workflow_id)
print(f"workflow {workflow_id}: {len(records)} records in {run.output_path}")
for record in records:
    if record["type"] == "task":
        took_ms = (record["ended_at"] - record["started_at"]) * 1e3
        print(f"  {record['activity_id']:<18} {record['status']:<9} {took_ms:8.3f} ms  "
              f"used={record.get('used')} generated={record.get('generated')}")
