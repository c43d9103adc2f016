"""Telemetry: samplers for CPU, memory, disk, network, processes and GPUs, and per-task capture.

``build_capture(settings)`` returns an object whose ``capture()`` gives the snapshot a task
stores in ``telemetry_at_start``/``telemetry_at_end`` (or None when telemetry is off);
``ensure_capture()`` returns one even when the settings enable nothing (a task that asks for
telemetry explicitly gets CPU, memory and process figures).
"""

from __future__ import annotations

from typing import Any, Optional


def build_capture(settings: Any) -> Optional[Any]:
    """The task telemetry capture the settings ask for, started; None when none is enabled."""
    from flowcept.telemetry.capture import build_capture as _build

    return _build(settings)


def ensure_capture() -> Any:
    """A shared capture (CPU, memory, this process) for tasks that ask for telemetry explicitly."""
    from flowcept.telemetry.capture import ensure_capture as _ensure

    return _ensure()


def machine_info(settings: Any = None) -> dict:
    """Facts about this machine for the workflow record (never raises)."""
    from flowcept.telemetry.machine import machine_info as _machine_info

    return _machine_info(settings)
