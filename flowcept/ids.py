"""Identifiers unique across processes, threads and nodes, without a uuid4 per task.

Each process draws a 64-bit random prefix once (again in a forked child); ids are that prefix
and a counter. ``itertools.count`` is advanced atomically under the GIL, so threads never
share a number.
"""

from __future__ import annotations

import itertools
import os
import uuid


def _new_prefix() -> str:
    return os.urandom(8).hex()


class _IdSource:
    __slots__ = ("prefix", "counter", "pid")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = _new_prefix() + "."
        self.counter = itertools.count(1)
        self.pid = os.getpid()


_source = _IdSource()
os.register_at_fork(after_in_child=_source.reset)


def next_id() -> str:
    """Return a new id of the form ``<16 hex>.<n>``."""
    return _source.prefix + str(next(_source.counter))


def id_factory():
    """Return (prefix, counter) for hot paths that build ids inline; re-read them after fork."""
    return _source


def new_uuid() -> str:
    """A uuid4 string, for workflow and campaign ids (made once per run)."""
    return str(uuid.uuid4())
