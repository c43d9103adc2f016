"""Field guards shared by the samplers: a failing backend call becomes None, logged once.

A sampler must never raise into a task, the cached-snapshot thread or the node daemon, and a
broken field (a sensor the driver does not expose, a permission) must not silence the others.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Set

logger = logging.getLogger("flowcept.telemetry")


class FieldGuard:
    """Calls backend functions for one sampler; a failure is None and logged once per field."""

    __slots__ = ("owner", "_failed")

    def __init__(self, owner: str):
        self.owner = owner
        self._failed: Set[str] = set()

    def call(self, field: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Optional[Any]:
        """Return ``function(*args)``, or None when it raises (logged the first time only)."""
        try:
            return function(*args, **kwargs)
        except Exception as error:
            self.failed(field, error)
            return None

    def failed(self, field: str, error: BaseException) -> None:
        """Record that ``field`` could not be read; logs once per field."""
        if field not in self._failed:
            self._failed.add(field)
            logger.info("telemetry %s: %s unavailable (%s: %s); reported as null",
                        self.owner, field, type(error).__name__, error)

    @property
    def failed_fields(self) -> Set[str]:
        return set(self._failed)


def default_psutil() -> Any:
    """The real psutil module, imported when a sampler is built (not at `import flowcept`)."""
    import psutil

    return psutil
