"""Reports: provenance card, PDF report, PROV-JSON export, live node view.

Public names resolve lazily so ``import flowcept.report`` loads neither matplotlib, rich nor pandas.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "generate_report": "flowcept.report.service",
    "render_card": "flowcept.report.card",
    "summarize": "flowcept.report.summary",
    "to_prov_document": "flowcept.report.prov",
    "export_prov_json": "flowcept.report.prov",
    "render_pdf": "flowcept.report.pdf",
    "run_top": "flowcept.report.top",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flowcept.report' has no attribute '{name}'")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
