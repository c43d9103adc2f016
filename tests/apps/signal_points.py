"""A real SIGTERM/SIGINT sent at an exact point inside Flowcept's own flushing, then the outcome.

argv: point out_dir. Points:
  loop-end-take  SIGTERM while a finishing loop hands its last iterations over (its batch lock held)
  loop-build     SIGINT while the loop turns a full chunk of iterations into JSONL in its own thread
  exit-shutdown  SIGTERM while the process, leaving without stop(), closes its pipeline in its exit
                 hook (what a multiprocessing pool's terminate() does to a worker that is exiting)
  blocked-main   SIGTERM noted by another thread while the main thread waits in sem_wait (a
                 multiprocessing lock nobody will release): only the signal watchdog ends the wait
  survives       the same, with the application's own SIGTERM handler (chained) that does not exit,
                 and a SIGINT whose KeyboardInterrupt the application catches: each handler runs
                 exactly once (the watchdog's re-sends must not make more)
The signal is sent by wrapping the step (the wrapper calls the real one); what the process leaves in
its files is what a signal at that instant leaves.
"""

import os
import signal
import sys

from flowcept import Flowcept, FlowceptTask, buffer
from flowcept.instrumentation import flowcept_loop

point, out_dir = sys.argv[1], sys.argv[2]
os.environ["FLOWCEPT_PROJECT_DUMP_BUFFER_PATH"] = os.path.join(out_dir, "flowcept_buffer.jsonl")
os.environ["FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_INTERVAL_S"] = "60"
signal.alarm(30)  # a hang ends as SIGALRM, which the test reports
if point == "exit-shutdown":
    real_shutdown = buffer.Pipeline.shutdown

    def shutdown_with_a_signal(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled before the real shutdown's first line
        return real_shutdown(self, *args, **kwargs)

    buffer.Pipeline.shutdown = shutdown_with_a_signal
    Flowcept(workflow_id=f"pt-{point}").start()
    for i in range(100):
        FlowceptTask(activity_id="before_exit", used={"i": i}, generated={"ok": True})
    sys.exit(0)  # no stop(): the exit hook closes the pipeline
if point == "blocked-main":
    import multiprocessing
    import threading
    import time

    Flowcept(workflow_id=f"pt-{point}").start()
    for i in range(100):
        FlowceptTask(activity_id="before_block", used={"i": i}, generated={"ok": True})
    lock = multiprocessing.Lock()
    lock.acquire()

    def poke() -> None:
        """Once the main thread sleeps in the kernel, raise SIGTERM in this thread: the C handler
        notes it here, and nothing interrupts the main thread's wait."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/self/task/{os.getpid()}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "S":
                    break
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    threading.Thread(target=poke).start()
    lock.acquire()  # never released: without the watchdog the process waits here forever
    sys.exit("the wait ended without the signal")
if point == "survives":
    import multiprocessing
    import threading
    import time

    calls = []
    lock = multiprocessing.Lock()
    lock.acquire()

    def on_term(signum, frame):  # installed before Flowcept: Flowcept's handler chains to it
        calls.append(signum)
        lock.release()  # ends the main thread's wait

    signal.signal(signal.SIGTERM, on_term)
    Flowcept(workflow_id=f"pt-{point}").start()
    FlowceptTask(activity_id="t", used={"i": 0}, generated={"ok": True})

    def main_sleeps() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/self/task/{os.getpid()}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "S":
                    return

    def poke(signum: int) -> None:
        main_sleeps()
        signal.pthread_kill(threading.get_ident(), signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        threading.Thread(target=poke, args=(signum,)).start()
        interrupted = 0
        try:
            lock.acquire(timeout=10)  # only the watchdog's re-send lets a handler end this wait
        except KeyboardInterrupt:
            interrupted += 1
        lock.acquire(block=False)  # held again for the next round
        # Watch for more runs of the handlers: a re-send after a handler ran would make one.
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            try:
                threading.Event().wait(until - time.monotonic())
            except KeyboardInterrupt:
                interrupted += 1
        print(signal.Signals(signum).name, len(calls) if signum == signal.SIGTERM else interrupted, flush=True)
    sys.exit(0)
step = "_take_entries" if point == "loop-end-take" else "build"
real = getattr(flowcept_loop._IterationBatch, step)
sent = []


def at_the_point(self, *args):
    if not sent and (point != "loop-end-take" or self.entries):
        sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM if point == "loop-end-take" else signal.SIGINT)
    return real(self, *args)


setattr(flowcept_loop._IterationBatch, step, at_the_point)
flowcept = Flowcept(workflow_id=f"pt-{point}").start()
try:
    for _ in flowcept_loop.FlowceptLoop(range(10 if point == "loop-end-take" else 2000), loop_name="L", item_name="x"):
        pass
except KeyboardInterrupt:
    print("interrupted")
flowcept.stop()
