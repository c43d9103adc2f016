"""One rank of the scale benchmark (benchmarks/bench_scale.py): N tasks, timed, result to a JSON file.

Usage: python scale_app.py RESULT_DIR TASKS. Runs under flowcept-launch, which sets the workflow,
the output path and the node daemon; this script configures nothing.
"""

import os
import sys
import time

import orjson

from flowcept import Flowcept, FlowceptTask

result_dir, tasks = sys.argv[1], int(sys.argv[2])
rank = int(os.environ.get("FLOWCEPT_RANK", "0"))
began_at = time.time()
with Flowcept(workflow_name="scale-benchmark"):
    start = time.perf_counter()
    cpu_start = time.process_time()
    for i in range(tasks):
        with FlowceptTask(activity_id="work", used={"i": i}) as task:
            task.end(generated={"r": i})
    capture_s = time.perf_counter() - start
    capture_cpu_s = time.process_time() - cpu_start  # all threads of this process (flusher included)
    stop_start = time.perf_counter()
stop_s = time.perf_counter() - stop_start
out = {"rank": rank, "node": os.environ.get("FLOWCEPT_NODE_NAME"), "tasks": tasks, "capture_s": capture_s,
       "capture_cpu_s": capture_cpu_s,
       "stop_s": stop_s, "began_at": began_at, "ended_at": time.time()}
with open(os.path.join(result_dir, f"rank{rank}.json"), "wb") as handle:
    handle.write(orjson.dumps(out))
