"""``flowcept-daemon`` and ``flowcept daemon start|stop|status``.

Options default to the ``daemon.*`` settings (and their ``FLOWCEPT_DAEMON_*`` variables). The
runtime directory (socket, ready file) is ``<runtime base>/flowcept-<uid>/<node>.<job>.<step>``;
``start`` returns once the ready file exists (bounded wait), ``stop`` sends SIGTERM and waits
for the process to exit, ``status`` asks the running daemon over its socket.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Optional

import click

from flowcept import protocol


def _settings() -> Any:
    from flowcept.settings import load_settings

    return load_settings()


def _runtime_dir(runtime_dir: Optional[str], runtime_base: Optional[str], node: Optional[str]) -> str:
    """The exact directory given, else ``<base>/flowcept-<uid>/<node>.<job>.<step>``."""
    if runtime_dir:
        return os.path.abspath(runtime_dir)
    settings = _settings()
    return protocol.runtime_dir(runtime_base or settings["daemon.runtime_dir"], node=node)


def _daemon_options(function: Any) -> Any:
    options = [
        click.option("--runtime-dir", "runtime_dir", default=None,
                     help="The daemon's runtime directory itself (socket, ready file); default: "
                          "<runtime base>/flowcept-<uid>/<node>.<job>.<step>."),
        click.option("--runtime-base", "runtime_base", default=None,
                     help="Base of the per-user runtime directories [daemon.runtime_dir]."),
        click.option("--node", default=None, help="Node name (default: FLOWCEPT_NODE_NAME, SLURMD_NODENAME, host)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _run_options(function: Any) -> Any:
    options = [
        click.option("--base-path", "--output", "base_path", default=None,
                     help="Base path of output files when a client gives none [project.dump_buffer.path]."),
        click.option("--sinks", default=None, help="Comma-separated sinks: jsonl, hdf5 [daemon.sinks]."),
        click.option("--telemetry-interval", type=float, default=None,
                     help="Seconds between telemetry samples [daemon.telemetry_interval_s]."),
        click.option("--no-telemetry", is_flag=True, help="Do not sample node telemetry."),
        click.option("--no-gpu", is_flag=True, help="Do not sample GPUs."),
        click.option("--max-message-bytes", type=int, default=None, help="[daemon.max_message_bytes]"),
        click.option("--metrics-port", type=int, default=None, help="Prometheus port, 0 off [daemon.metrics_port]."),
        click.option("--metrics-host", default=None, help="[daemon.metrics_host]"),
        click.option("--tcp-port", type=int, default=None,
                     help="TCP port with CURVE: 0 off, -1 any free port [daemon.tcp_port]."),
        click.option("--tcp-host", default="0.0.0.0", show_default=True, help="TCP bind address."),
        click.option("--job-dir", default=None, type=click.Path(file_okay=False),
                     help="Job directory: use the job's CURVE keys and register the TCP address there "
                          "(set by flowcept-launch; see `flowcept daemon status --job`)."),
        click.option("--job-step", default="0", show_default=True, help="Job step, for the job directory entry."),
        click.option("--exit-when-idle", is_flag=True, help="Exit once every registered client said goodbye."),
        click.option("--idle-grace", type=float, default=0.5, show_default=True,
                     help="Seconds with no live client before --exit-when-idle exits."),
        click.option("--strict", is_flag=True, help="Parse every record line (slower) instead of framing checks."),
        click.option("--fsync", type=click.Choice(["flush", "never"]), default="flush", show_default=True,
                     help="JSONL sink: fsync on flush (goodbye, every --fsync-interval, exit) or never."),
        click.option("--fsync-interval", type=float, default=5.0, show_default=True),
        click.option("--log-level", default="warning", show_default=True,
                     type=click.Choice(["debug", "info", "warning", "error"])),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def build_config(runtime_dir: Optional[str] = None, runtime_base: Optional[str] = None,
                 node: Optional[str] = None, **options: Any) -> Any:
    """A DaemonConfig from settings plus the given command-line options (None: the setting)."""
    from flowcept.daemon.server import DaemonConfig

    settings = _settings()
    node = node or protocol.node_name()

    def pick(value: Any, key: str) -> Any:
        return settings[key] if value is None else value

    sinks = options.get("sinks")
    return DaemonConfig(
        runtime_dir=(os.path.abspath(runtime_dir) if runtime_dir
                     else protocol.runtime_dir(runtime_base or settings["daemon.runtime_dir"], node=node)),
        base_path=os.path.abspath(pick(options.get("base_path"), "project.dump_buffer.path")),
        node=node,
        sinks=[s.strip() for s in sinks.split(",") if s.strip()] if sinks else list(settings["daemon.sinks"]),
        telemetry_interval_s=pick(options.get("telemetry_interval"), "daemon.telemetry_interval_s"),
        telemetry=not options.get("no_telemetry", False),
        gpu=not options.get("no_gpu", False),
        max_message_bytes=pick(options.get("max_message_bytes"), "daemon.max_message_bytes"),
        metrics_port=pick(options.get("metrics_port"), "daemon.metrics_port"),
        metrics_host=pick(options.get("metrics_host"), "daemon.metrics_host"),
        tcp_port=pick(options.get("tcp_port"), "daemon.tcp_port"),
        tcp_host=options.get("tcp_host") or "0.0.0.0",
        job_dir=os.path.abspath(options["job_dir"]) if options.get("job_dir") else None,
        job_step=str(options.get("job_step") or "0"),
        exit_when_idle=bool(options.get("exit_when_idle")),
        idle_grace_s=options.get("idle_grace", 0.5),
        strict=bool(options.get("strict")),
        fsync=options.get("fsync") or "flush",
        fsync_interval_s=options.get("fsync_interval", 5.0),
    )


def run_daemon(**options: Any) -> int:
    """Run the daemon in this process until it is stopped; returns the exit status."""
    logging.basicConfig(level=options.pop("log_level", "warning").upper(),
                        format="[flowcept-daemon %(levelname)s %(name)s] %(message)s", stream=sys.stderr)
    from flowcept.daemon.server import DaemonServer

    config = build_config(**options)
    # Sinks and telemetry backends must not write to our stdout (amdsmi prints at import).
    return DaemonServer(config).serve()


@click.command("run")
@_daemon_options
@_run_options
def run_command(**options: Any) -> None:
    """Run the node daemon in the foreground (what flowcept-daemon does)."""
    try:
        code = run_daemon(**options)
    except (RuntimeError, PermissionError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    sys.exit(code)


@click.group("daemon")
def daemon_group() -> None:
    """Start, stop and inspect the node daemon."""


daemon_group.add_command(run_command)


@daemon_group.command("start")
@_daemon_options
@_run_options
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for readiness.")
def start_command(runtime_dir: Optional[str], runtime_base: Optional[str], node: Optional[str], timeout: float,
                  **options: Any) -> None:
    """Start the daemon in the background; prints its address once it is ready."""
    directory = _runtime_dir(runtime_dir, runtime_base, node)
    ready = protocol.read_ready(directory)
    if ready and protocol.pid_alive(ready.get("pid")):
        click.echo(ready["address"])
        return
    args = [sys.executable, "-m", "flowcept.daemon", "--runtime-dir", directory]
    if node:
        args += ["--node", node]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (None, False):
            args += [flag, str(value)]
    log = os.path.join(directory, "daemon.log")
    protocol.make_private_dir(directory)
    with open(log, "ab") as handle:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=handle, stderr=handle,
                                   start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while True:
        ready = protocol.read_ready(directory)
        if ready and ready.get("pid") == process.pid:
            click.echo(ready["address"])
            return
        if process.poll() is not None:
            raise click.ClickException(f"the daemon exited with status {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise click.ClickException(f"the daemon was not ready within {timeout}s; see {log}")
        time.sleep(0.02)  # polling the ready file with a deadline


@daemon_group.command("stop")
@_daemon_options
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for the exit.")
def stop_command(runtime_dir: Optional[str], runtime_base: Optional[str], node: Optional[str],
                 timeout: float) -> None:
    """SIGTERM the daemon (it drains, flushes and closes its files) and wait for it to exit."""
    directory = _runtime_dir(runtime_dir, runtime_base, node)
    ready = protocol.read_ready(directory)
    pid = ready.get("pid") if ready else None
    if not protocol.pid_alive(pid):
        click.echo("no daemon running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while protocol.pid_alive(pid):
        if time.monotonic() > deadline:
            raise click.ClickException(f"daemon {pid} did not exit within {timeout}s")
        time.sleep(0.02)  # polling the process with a deadline
    click.echo(f"daemon {pid} stopped")


@daemon_group.command("status")
@_daemon_options
@click.option("--json", "as_json", is_flag=True, help="Print the full status as JSON.")
@click.option("--address", default=None, help="Ask this address instead of the local runtime directory.")
@click.option("--job", "job_id", default=None,
              help="Every node of this job, from any host: each node's daemon over TCP with the job's CURVE keys.")
@click.option("--jobs-dir", default=None, type=click.Path(file_okay=False),
              help="Where the job directories are [daemon.jobs_dir].")
@click.option("--timeout", "timeout_s", default=3.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds to wait for each daemon.")
def status_command(runtime_dir: Optional[str], runtime_base: Optional[str], node: Optional[str], as_json: bool,
                   address: Optional[str], job_id: Optional[str], jobs_dir: Optional[str], timeout_s: float) -> None:
    """What the daemon holds: clients, counters, files, latest telemetry (--job: every node of a job)."""
    from flowcept.daemon_link import daemon_status

    if job_id:
        _job_status(job_id, jobs_dir, as_json, timeout_s)
        return
    if address is None:
        ready = protocol.read_ready(_runtime_dir(runtime_dir, runtime_base, node))
        address = ready.get("address") if ready else None
    status = daemon_status(address, timeout_s=timeout_s) if address else None
    if status is None:
        if as_json:
            click.echo(json.dumps({"running": False, "address": address}))
        else:
            click.echo("no daemon answering" + (f" at {address}" if address else ""))
        sys.exit(1)
    status["running"] = True
    if as_json:
        click.echo(json.dumps(status, default=str))
        return
    _print_status(status)


def _job_status(job_id: str, jobs_dir: Optional[str], as_json: bool, timeout_s: float) -> None:
    """One line per node daemon of the job; exit status 1 when any did not answer or refused us."""
    from flowcept import job_registry

    try:
        statuses = job_registry.job_statuses(job_id, jobs_dir, timeout_s=timeout_s)
    except (job_registry.JobKeysError, FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps({"job": job_id, "nodes": statuses}, default=str))
    elif not statuses:
        click.echo(f"job {job_id}: no node daemon registered (finished, or not started by flowcept-launch)")
    else:
        click.echo(f"job {job_id}: {len(statuses)} node daemon(s)")
        for status in statuses:
            where = f"{status.get('node')} (step {status.get('step')})"
            if status.get("error"):
                click.echo(f"  {where}: {status['error']} [{status.get('address')}]")
                continue
            counters, clients = status["counters"], status["clients"]
            click.echo(f"  {where}: pid {status['pid']}, up {status['uptime_s']:.0f}s, clients "
                       f"{clients['connected']} connected / {clients['finished']} finished / {clients['lost']} lost, "
                       f"records received {counters['received']}, written {counters['written']}, "
                       f"spilled {counters['spilled']}, dropped {counters['dropped']}")
    if any(status.get("error") for status in statuses):
        sys.exit(1)


def _print_status(status: Dict[str, Any]) -> None:
    counters, clients = status["counters"], status["clients"]
    click.echo(f"daemon pid {status['pid']} on {status['node']}, up {status['uptime_s']:.0f}s at {status['address']}")
    click.echo(f"clients: {clients['connected']} connected, {clients['finished']} finished, {clients['lost']} lost")
    click.echo("records: " + ", ".join(f"{k} {counters[k]}" for k in
                                       ("received", "written", "rejected", "spilled", "dropped",
                                        "telemetry_written")) + f"; {counters['bytes']} bytes")
    for path in status["output_files"]:
        click.echo(f"  {path}")


    return True
