"""Flowcept: provenance and telemetry capture for HPC workflows.

Importing this package is cheap: public names are resolved lazily from ``_EXPORTS`` so no
heavy module (zmq, h5py, pymongo, pynvml, mpi4py, pandas) loads until it is used.
"""

from importlib import import_module
from typing import Any

from flowcept.version import __version__

_EXPORTS = {
    "Flowcept": "flowcept.flowcept_api.flowcept_controller",
    "FlowceptTask": "flowcept.instrumentation.task_capture",
    "flowcept_task": "flowcept.instrumentation.flowcept_task",
    "FlowceptLoop": "flowcept.instrumentation.flowcept_loop",
    "FlowceptLightweightLoop": "flowcept.instrumentation.flowcept_loop",
    "TaskObject": "flowcept.records",
    "WorkflowObject": "flowcept.records",
    "Status": "flowcept.records",
    "DBAPI": "flowcept.flowcept_api.db_api",
    "load_settings": "flowcept.settings",
    "consolidate": "flowcept.consolidation",
}

__all__ = ["__version__", "read_buffer_file", "dump_buffer", "generate_report", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flowcept' has no attribute '{name}'")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def read_buffer_file(*args: Any, **kwargs: Any) -> Any:
    """Module-level alias of ``Flowcept.read_buffer_file``."""
    from flowcept.flowcept_api.flowcept_controller import Flowcept

    return Flowcept.read_buffer_file(*args, **kwargs)


def dump_buffer(path: Any = None) -> None:
    """Write the records of the active (or last) Flowcept run to ``path``."""
    from flowcept.flowcept_api.flowcept_controller import Flowcept

    instance = Flowcept.get_current_instance() or _last_instance()
    if instance is None:
        raise RuntimeError("no Flowcept run in this process: start one before dump_buffer()")
    instance.dump_buffer(path)


def _last_instance() -> Any:
    from flowcept.flowcept_api.flowcept_controller import Flowcept

    if Flowcept.current_workflow_id is None:
        return None
    instance = Flowcept(workflow_id=Flowcept.current_workflow_id, save_workflow=False)
    return instance


def generate_report(*args: Any, **kwargs: Any) -> Any:
    """Module-level alias of ``Flowcept.generate_report``."""
    from flowcept.flowcept_api.flowcept_controller import Flowcept

    return Flowcept.generate_report(*args, **kwargs)
