"""The ``flowcept`` command line: settings, consolidation, reading files, and the subsystems' groups.

Subsystem commands (``daemon``, ``report``, ``export``, ``top``) live beside their code and are
registered here lazily, so ``flowcept --version`` never imports zmq or matplotlib.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from importlib import import_module
from typing import Any, Dict, List, Optional

import click

from flowcept.version import __version__

_LAZY_COMMANDS: Dict[str, tuple] = {
    "daemon": ("flowcept.daemon.cli", "daemon_group", "Start, stop and inspect the node daemon."),
    "report": ("flowcept.report.cli", "report_command", "Provenance card (markdown) or report (PDF)."),
    "export": ("flowcept.report.cli", "export_command", "Export a workflow as W3C PROV-JSON."),
    "top": ("flowcept.report.cli", "top_command", "Live view of the node daemons of a job."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        command = super().get_command(ctx, name)
        if command is not None or name not in _LAZY_COMMANDS:
            return command
        module, attribute, help_text = _LAZY_COMMANDS[name]
        try:
            return getattr(import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            reason = str(error)

            @click.command(name=name, help=help_text, context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def unavailable(args: Any) -> None:
                raise click.ClickException(f"'flowcept {name}' is unavailable here: {reason}")

            return unavailable


@click.group(cls=_LazyGroup)
@click.version_option(__version__, prog_name="flowcept")
def main() -> None:
    """Flowcept: provenance and telemetry capture for HPC workflows."""


# -- settings -------------------------------------------------------------------------------------

@main.group()
def settings() -> None:
    """Create and inspect settings.yaml."""


@settings.command("init")
@click.option("--path", default=None, help="Where to write (default: ~/.flowcept/settings.yaml).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def settings_init(path: Optional[str], force: bool) -> None:
    """Write a settings.yaml holding every key, its default and its variable."""
    from flowcept.settings import DEFAULT_SETTINGS_PATH, render_yaml

    path = os.path.expanduser(path or DEFAULT_SETTINGS_PATH)
    if os.path.exists(path) and not force:
        raise click.ClickException(f"{path} exists; use --force to overwrite it")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_yaml())
    click.echo(f"wrote {path}")


@settings.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML-like text.")
def settings_show(as_json: bool) -> None:
    """Print the settings in effect (file + FLOWCEPT_* variables) and where they came from."""
    from flowcept.settings import SettingsError, load_settings, render_yaml

    try:
        current = load_settings()
    except SettingsError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        import orjson

        click.echo(orjson.dumps(current.as_dict(), option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"# settings file: {current.path or '(none: built-in defaults)'}")
    click.echo(render_yaml(current), nl=False)


# -- consolidation and reading ------------------------------------------------------------------------

@main.command()
@click.option("--workflow-id", "-w", required=True, help="The workflow to merge.")
@click.option("--path", "base_path", default=None,
              help="Base buffer path (default: project.dump_buffer.path).")
@click.option("--format", "output_format", type=click.Choice(["jsonl", "hdf5"]), default=None,
              help="Output format (default: project.output_format).")
@click.option("--keep-files", is_flag=True, help="Keep the per-process and per-node files.")
@click.option("--order-by-time", is_flag=True, help="Order records by start time (holds them in memory).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--mongodb", "to_mongodb", is_flag=True,
              help="Then load the workflow into MongoDB (databases.mongodb.*); merged, never doubled.")
def consolidate(workflow_id: str, base_path: Optional[str], output_format: Optional[str], keep_files: bool,
                order_by_time: bool, quiet: bool, to_mongodb: bool) -> None:
    """Merge every file of one workflow into one JSONL or HDF5 file (safe to run twice)."""
    from flowcept.consolidation import consolidate as merge
    from flowcept.consolidation import find_sources
    from flowcept.settings import SettingsError, load_settings

    try:
        current = load_settings()
    except SettingsError as error:
        raise click.ClickException(str(error)) from None
    base_path = base_path or current["project.dump_buffer.path"]
    output_format = output_format or current["project.output_format"]
    sources = find_sources(base_path, workflow_id)
    if not sources:
        raise click.ClickException(f"no files of workflow '{workflow_id}' next to {os.path.abspath(base_path)}")
    total = sum(os.path.getsize(p) for p in sources if os.path.exists(p))
    try:
        if quiet or not sys.stderr.isatty() and total < 64 * 1024 * 1024:
            report = merge(base_path, workflow_id, output_format=output_format, cleanup_files=not keep_files,
                           order_by_time=order_by_time)
        else:
            with click.progressbar(length=total, label="consolidating", file=sys.stderr) as bar:
                report = merge(base_path, workflow_id, output_format=output_format,
                               cleanup_files=not keep_files, order_by_time=order_by_time, progress=bar.update)
    except (OSError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"workflow {workflow_id}: {report.records_out} records from {len(report.sources)} file(s) "
               f"-> {report.output_path}")
    if report.duplicates:
        click.echo(f"  {report.duplicates} duplicate record(s) removed")
    if report.bad_lines:
        click.echo(f"  {len(report.bad_lines)} torn or corrupt line(s) skipped")
    if report.kept_live:
        click.echo(f"  {len(report.kept_live)} file(s) still being written were kept")
    for path, reason in report.skipped:
        click.echo(f"  left in place, not merged: {path} ({reason})")
    if to_mongodb:
        from flowcept.sinks.mongodb import load_workflow

        try:
            loaded = load_workflow(base_path, workflow_id, current)
        except Exception as error:
            raise click.ClickException(f"loading into MongoDB failed: {error}") from None
        click.echo(f"  {loaded} records loaded into MongoDB")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--records", "show_records", is_flag=True, help="Print the records (JSON lines).")
@click.option("--type", "record_type", default=None, help="Only records of this type (task, workflow, ...).")
@click.option("--limit", type=int, default=None, help="At most this many records with --records.")
def read(file: str, show_records: bool, record_type: Optional[str], limit: Optional[int]) -> None:
    """Summarise a Flowcept JSONL/HDF5 file, or print its records."""
    from flowcept.consolidation import read_records

    if not os.path.exists(file):
        raise click.ClickException(f"{file}: no such file")
    try:
        records = read_records(file)
    except Exception as error:
        raise click.ClickException(f"{file}: cannot be read: {error}") from None
    if record_type:
        records = [r for r in records if r.get("type") == record_type]
    if show_records:
        import orjson

        for record in records[:limit] if limit else records:
            click.echo(orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS).decode())
        return
    _print_summary(file, records)


def _print_summary(file: str, records: List[dict]) -> None:
    by_type = Counter(r.get("type", "?") for r in records)
    tasks = [r for r in records if r.get("type") == "task"]
    workflows = sorted({str(r.get("workflow_id")) for r in records if r.get("workflow_id")})
    rows = []
    by_activity: Dict[str, List[dict]] = {}
    for task in tasks:
        by_activity.setdefault(str(task.get("activity_id")), []).append(task)
    for activity, items in sorted(by_activity.items()):
        durations = [t["ended_at"] - t["started_at"] for t in items
                     if isinstance(t.get("ended_at"), (int, float)) and isinstance(t.get("started_at"), (int, float))]
        errors = sum(1 for t in items if t.get("status") == "ERROR")
        mean = sum(durations) / len(durations) if durations else 0.0
        rows.append((activity, len(items), errors, mean))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        click.echo(f"{file}: {len(records)} records " + ", ".join(f"{k}={v}" for k, v in by_type.items()))
        click.echo("workflows: " + ", ".join(workflows))
        for activity, count, errors, mean in rows:
            click.echo(f"  {activity}: {count} tasks, {errors} errors, mean {mean * 1e3:.3f} ms")
        return
    console = Console()
    console.print(f"[bold]{file}[/bold]: {len(records)} records "
                  + ", ".join(f"{k}={v}" for k, v in sorted(by_type.items())))
    console.print("workflows: " + (", ".join(workflows) or "-"))
    table = Table("activity", "tasks", "errors", "mean duration (ms)")
    for activity, count, errors, mean in rows:
        table.add_row(activity, str(count), str(errors), f"{mean * 1e3:.3f}")
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
