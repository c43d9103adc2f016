"""Sinks: where the node daemon and consolidation write records, registered by name.

A sink is ``write(records)``, ``flush()``, ``close()`` (idempotent). Built-ins live in
``BUILTIN_SINKS`` (module path, class name) and are imported only when used; third parties add
sinks through the ``flowcept.sinks`` entry-point group. An unknown name is a clear error.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Dict, List, Protocol, Tuple


class Sink(Protocol):
    """What the daemon and consolidation write through."""

    def write(self, records: List[Dict[str, Any]]) -> None:
        """Write a batch of record dicts (may buffer)."""

    def flush(self) -> None:
        """Make everything written so far durable, per the sink's documented policy."""

    def close(self) -> None:
        """Flush and release what the sink opened; idempotent."""


BUILTIN_SINKS: Dict[str, Tuple[str, str]] = {
    "jsonl": ("flowcept.sinks.jsonl", "JsonlSink"),
    "hdf5": ("flowcept.sinks.hdf5", "Hdf5Sink"),
    "mongodb": ("flowcept.sinks.mongodb", "MongoSink"),
}


class UnknownSinkError(ValueError):
    """A sink name that is neither built in nor registered through an entry point."""


def sink_class(name: str) -> Any:
    """Return the sink class registered under ``name``."""
    if name in BUILTIN_SINKS:
        module, attribute = BUILTIN_SINKS[name]
        return getattr(import_module(module), attribute)
    try:
        from importlib.metadata import entry_points

        for entry in entry_points(group="flowcept.sinks"):
            if entry.name == name:
                return entry.load()
    except Exception:  # pragma: no cover - broken third-party metadata
        pass
    known = ", ".join(sorted(BUILTIN_SINKS))
    raise UnknownSinkError(f"unknown sink '{name}' (known: {known}, or register one in the "
                           f"'flowcept.sinks' entry-point group)")
