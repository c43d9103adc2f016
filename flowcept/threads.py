"""Flowcept's background threads leave SIGTERM and SIGINT to the application's threads.

The kernel hands a process-directed signal to any thread that does not block it. When it picks
one of ours (the flusher, waiting on an Event) while the main thread waits in a C call that only
a signal delivered to *it* interrupts (a ``multiprocessing`` lock: a pool worker being
terminated), CPython notes the signal but runs the Python handler only when the main thread
next runs bytecode, which it never does there: the process hangs instead of flushing and dying.
Threads inherit their creator's signal mask, so ours are started with the signals blocked.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

#: The signals Flowcept flushes on (see ``flowcept.buffer.install_signal_handlers``).
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_pthread_sigmask = getattr(signal, "pthread_sigmask", None)


@contextmanager
def handled_signals_blocked() -> Iterator[None]:
    """Block the handled signals in this thread for the block: threads started in it keep them blocked.

    A signal arriving meanwhile stays pending and is delivered when the block ends.
    """
    if _pthread_sigmask is None:
        yield
        return
    try:
        previous = _pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    except (OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        _pthread_sigmask(signal.SIG_SETMASK, previous)


def start_background(thread: threading.Thread) -> threading.Thread:
    """Start one of Flowcept's threads with the handled signals blocked in it; returns it."""
    with handled_signals_blocked():
        thread.start()
    return thread
