"""``flowcept report``, ``flowcept export`` and ``flowcept top`` (registered lazily by flowcept.cli)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import click

_INPUT_HELP = "Input: a Flowcept JSONL file (else --workflow-id/--campaign-id query the database or files)."


def _input_options(func: Any) -> Any:
    func = click.option("--campaign-id", default=None, help="Campaign to report on (database query mode).")(func)
    func = click.option("--workflow-id", default=None, help="Workflow to report on (database query mode).")(func)
    func = click.option("--input", "input_path", default=None, type=click.Path(dir_okay=False),
                        help=_INPUT_HELP)(func)
    return func


@click.command("report")
@click.option("--type", "report_type", default=None,
              type=click.Choice(["provenance_card", "workflow_card", "provenance_report"]),
              help="Report type (default: from --format, else provenance_card).")
@click.option("--format", "fmt", default=None, type=click.Choice(["markdown", "pdf"]),
              help="markdown (provenance card) or pdf (provenance report).")
@_input_options
@click.option("-o", "--output", "output_path", default=None, type=click.Path(dir_okay=False),
              help="Output file (default PROVENANCE_CARD.md / PROVENANCE_REPORT.pdf in the current directory).")
@click.option("--print", "print_markdown", is_flag=True, help="Also render the markdown card in the terminal.")
def report_command(report_type: Optional[str], fmt: Optional[str], input_path: Optional[str],
                   workflow_id: Optional[str], campaign_id: Optional[str], output_path: Optional[str],
                   print_markdown: bool) -> None:
    """Write a provenance card (markdown) or a provenance report (PDF with plots)."""
    from flowcept.report.service import generate_report

    if report_type is None:
        report_type = "provenance_report" if fmt == "pdf" else "provenance_card"
    if fmt is None:
        fmt = "pdf" if report_type == "provenance_report" else "markdown"
    try:
        result = generate_report(report_type=report_type, format=fmt, print_markdown=print_markdown,
                                 output_path=output_path, input_jsonl_path=input_path, records=None,
                                 workflow_id=workflow_id, campaign_id=campaign_id)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{result['report_type']} written to {result['output_path']} "
               f"({result['tasks']} tasks, {result['workflows']} workflow(s), input: {result['input_mode']})")


@click.command("export")
@click.option("--format", "fmt", default="prov-json", type=click.Choice(["prov-json"]), show_default=True,
              help="Export format.")
@_input_options
@click.option("-o", "--output", "output_path", default=None, type=click.Path(dir_okay=False),
              help="Output file (default PROVENANCE.prov.json in the current directory).")
@click.option("--indent", is_flag=True, help="Indent the JSON for reading.")
def export_command(fmt: str, input_path: Optional[str], workflow_id: Optional[str], campaign_id: Optional[str],
                   output_path: Optional[str], indent: bool) -> None:
    """Export workflows in a standard provenance format (W3C PROV-JSON)."""
    from flowcept.report.prov import export_prov_json

    try:
        result = export_prov_json(output_path=output_path, input_jsonl_path=input_path,
                                  workflow_id=workflow_id, campaign_id=campaign_id, indent=indent)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{fmt} written to {result['output_path']} ({result['activities']} activities, "
               f"{result['entities']} entities, {result['agents']} agents)")


@click.command("top")
@click.option("--address", "addresses", multiple=True, help="Daemon address (ipc:// or tcp://); repeatable.")
@click.option("--runtime-dir", "runtime_dirs", multiple=True, type=click.Path(file_okay=False),
              help="A daemon's runtime directory (its ready file names the address); repeatable.")
@click.option("--job", "job_id", default=None,
              help="Every node of a running job (its daemons over TCP with the job's CURVE keys).")
@click.option("--jobs-dir", default=None, type=click.Path(file_okay=False),
              help="Where the job directories are [daemon.jobs_dir].")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Seconds between refreshes.")
@click.option("--iterations", default=None, type=click.IntRange(min=1),
              help="Refresh this many times and exit (prints each refresh; for scripts and tests).")
@click.option("--once", is_flag=True, help="Print one refresh and exit.")
@click.option("--timeout", "timeout_s", default=1.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds to wait for each daemon's answer.")
def top_command(addresses: Tuple[str, ...], runtime_dirs: Tuple[str, ...], job_id: Optional[str],
                jobs_dir: Optional[str], interval: float, iterations: Optional[int], once: bool,
                timeout_s: float) -> None:
    """Live view of the node daemons: CPU, memory, GPUs, records/s, drops (q or Ctrl-C quits)."""
    from flowcept.report.top import daemon_status_provider, discover_addresses, run_top

    if once:
        iterations = 1
    if job_id:
        from flowcept import job_registry

        try:
            job_registry.job_targets(job_id, jobs_dir)  # an unknown or unreadable job fails here, plainly
        except (job_registry.JobKeysError, FileNotFoundError, ValueError) as error:
            raise click.ClickException(str(error)) from error

        def provide() -> list:  # keys re-read each refresh: a new job step brings new keys
            try:
                return job_registry.job_statuses(job_id, jobs_dir, timeout_s=timeout_s)
            except (job_registry.JobKeysError, OSError) as error:
                return [{"node": job_id, "error": str(error)}]

        run_top(provide, interval_s=interval, iterations=iterations, live=None if iterations is None else False)
        return
    found = discover_addresses(addresses, runtime_dirs)
    if not found:
        raise click.ClickException("no node daemon found: pass --address or --runtime-dir, or set "
                                   "daemon.address (FLOWCEPT_DAEMON_ADDRESS)")
    run_top(daemon_status_provider(found, timeout_s=timeout_s), interval_s=interval, iterations=iterations,
            live=None if iterations is None else False)
