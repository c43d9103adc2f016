"""A rank's command for the launcher tests: write DIR/ready-<rank> (with this pid), wait for DIR/go-<rank>.

Uninstrumented (standard library only). Every wait is bounded (60 s); the tests create the go
files (or kill the process) long before.
"""

import os
import sys
import time

directory = sys.argv[1]
rank = os.environ.get("FLOWCEPT_RANK", "0")
with open(os.path.join(directory, f".ready-{rank}"), "w") as handle:
    handle.write(str(os.getpid()))
os.replace(os.path.join(directory, f".ready-{rank}"), os.path.join(directory, f"ready-{rank}"))
go = os.path.join(directory, f"go-{rank}")
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.01)  # waiting for the test's go file, bounded
