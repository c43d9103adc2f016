"""``generate_report``: the one entry point behind ``Flowcept.generate_report`` and ``flowcept report``.

Checks the request first (type/format combination, exactly one input mode, the input file
exists, rich when printing), then streams the input once into a Summary and renders the card
(markdown) or the report (PDF). Output files are written to a temporary name and renamed.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional

from flowcept.report.loaders import select_input

logger = logging.getLogger(__name__)

PROVENANCE_CARD = "provenance_card"
PROVENANCE_REPORT = "provenance_report"
_ALIASES = {"workflow_card": PROVENANCE_CARD, "card": PROVENANCE_CARD, "report": PROVENANCE_REPORT}
_FORMATS = {PROVENANCE_CARD: "markdown", PROVENANCE_REPORT: "pdf"}
_DEFAULT_PATHS = {PROVENANCE_CARD: "PROVENANCE_CARD.md", PROVENANCE_REPORT: "PROVENANCE_REPORT.pdf"}


def canonical_report_type(report_type: str, format: str) -> str:
    """Validate a (type, format) pair and return the canonical report type; ValueError otherwise."""
    canonical = _ALIASES.get(report_type, report_type)
    if canonical not in _FORMATS:
        raise ValueError(f"unknown report_type '{report_type}': use 'provenance_card' (alias "
                         f"'workflow_card') or 'provenance_report'")
    if format != _FORMATS[canonical]:
        raise ValueError(f"report_type '{report_type}' supports only format '{_FORMATS[canonical]}', "
                         f"not '{format}'")
    return canonical


def generate_report(report_type: str = PROVENANCE_CARD, format: str = "markdown", print_markdown: bool = False,
                    output_path: Optional[str] = None, input_jsonl_path: Optional[str] = None,
                    records: Optional[List[Dict[str, Any]]] = None, workflow_id: Optional[str] = None,
                    campaign_id: Optional[str] = None) -> Dict[str, Any]:
    """Generate a provenance card (markdown) or a provenance report (PDF) and return what was done.

    Returns a dict with ``report_type``, ``format``, ``output_path``, ``input_mode`` (``jsonl``,
    ``records`` or ``db``) and figures about the input (records, tasks, workflows, ...).
    Raises ValueError for a bad type/format pair or input selection, FileNotFoundError for a
    missing ``input_jsonl_path``, ModuleNotFoundError for ``print_markdown`` without rich.
    """
    canonical = canonical_report_type(report_type, format)
    console_cls = None
    if print_markdown and format == "markdown":
        try:
            from rich.console import Console as console_cls  # noqa: N813
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError("print_markdown=True needs rich: pip install 'flowcept[report]'") from error
    input_mode, source = select_input(input_jsonl_path=input_jsonl_path, records=records,
                                      workflow_id=workflow_id, campaign_id=campaign_id)
    began = time.perf_counter()
    from flowcept.report.summary import summarize

    summary = summarize(source)
    path = os.path.abspath(os.fspath(output_path) if output_path is not None else _DEFAULT_PATHS[canonical])
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    result: Dict[str, Any] = {"report_type": canonical, "format": format, "output_path": path,
                              "input_mode": input_mode}
    try:
        if canonical == PROVENANCE_CARD:
            from flowcept.report.card import render_card

            text = render_card((), summary=summary)
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
            if console_cls is not None:
                from rich.markdown import Markdown

                console_cls().print(Markdown(text))
        else:
            from flowcept.report.pdf import render_pdf

            pages = render_pdf(summary, tmp)
            os.replace(tmp, path)
            result["pages"] = pages
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    result.update({
        "records": summary.n_records, "tasks": summary.n_tasks,
        "workflows": len(set(summary.workflows) | {w for w in summary.workflow_tasks if w is not None}),
        "activities": len(summary.activities), "failed_tasks": summary.n_failed,
        "telemetry_records": summary.n_telemetry, "seconds": round(time.perf_counter() - began, 3),
    })
    if workflow_id is not None:
        result["workflow_id"] = workflow_id
    if campaign_id is not None:
        result["campaign_id"] = campaign_id
    logger.info("%s written to %s (%d tasks)", canonical, path, summary.n_tasks)
    return result
