"""``flowcept-launch [options] [--] command args...``: run a command as one rank, with provenance.

Examples::

    srun -n 4 flowcept-launch python app.py
    mpirun -np 8 flowcept-launch --workflow-name sim --output-dir out -- ./solver -i in.txt
    flowcept-launch --no-daemon python app.py          # one rank, no node daemon
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, List, Optional

from flowcept.launch.launcher import LaunchOptions

if TYPE_CHECKING:
    import argparse

_USAGE = "flowcept-launch [options] [--] command [args...]"


def build_parser() -> argparse.ArgumentParser:
    """The launcher's options; everything from the first non-option word on is the command."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="flowcept-launch", usage=_USAGE,
        description="Run a command once per rank (srun, mpirun/mpiexec or alone) with Flowcept: each rank's "
                    "process is recorded as a task, the node daemon (one per node) captures the ranks' records "
                    "and node telemetry, and global rank 0 consolidates the workflow when every rank is done.")
    parser.add_argument("--workflow-name", "-n", default=None, help="Name of the workflow.")
    parser.add_argument("--output-dir", "-o", default=None,
                        help="Where buffer files and the consolidated output go "
                             "(default: the directory of project.dump_buffer.path).")
    parser.add_argument("--format", dest="output_format", choices=("jsonl", "hdf5"), default=None,
                        help="Consolidated output format (default: project.output_format).")
    parser.add_argument("--telemetry-interval", type=float, default=None, metavar="SECONDS",
                        help="Node telemetry sampling interval of the daemon (daemon.telemetry_interval_s).")
    daemon = parser.add_mutually_exclusive_group()
    daemon.add_argument("--daemon", dest="daemon", action="store_true", default=True,
                        help="Start one node daemon per node (default).")
    daemon.add_argument("--no-daemon", dest="daemon", action="store_false",
                        help="No node daemon: every rank writes its own file.")
    merge = parser.add_mutually_exclusive_group()
    merge.add_argument("--consolidate", dest="consolidate", action="store_true", default=True,
                       help="Global rank 0 merges the workflow when all ranks are done (default).")
    merge.add_argument("--no-consolidate", dest="consolidate", action="store_false",
                       help="Leave the per-node/per-process files; run `flowcept consolidate` later.")
    parser.add_argument("--keep-files", action="store_true", help="Keep the files that were consolidated.")
    parser.add_argument("--settings", dest="settings_file", default=None, metavar="PATH",
                        help="Settings file (sets FLOWCEPT_SETTINGS_PATH for the launcher and the command).")
    parser.add_argument("--quiet", "-q", action="store_true", help="Do not print the output path at the end.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="The command to run (after an optional --).")
    return parser


# Options the fast parser knows: name -> (attribute, value kind or constant).
_VALUE_OPTIONS = {"--workflow-name": "workflow_name", "-n": "workflow_name", "--output-dir": "output_dir",
                  "-o": "output_dir", "--format": "output_format", "--telemetry-interval": "telemetry_interval_s",
                  "--settings": "settings_file"}
_FLAG_OPTIONS = {"--daemon": ("daemon", True), "--no-daemon": ("daemon", False),
                 "--consolidate": ("consolidate", True), "--no-consolidate": ("consolidate", False),
                 "--keep-files": ("keep_files", True), "--quiet": ("quiet", True), "-q": ("quiet", True)}


def _fast_parse(argv: List[str]) -> Optional[LaunchOptions]:
    """The common command lines without importing argparse (a few ms per rank, on every rank).

    Returns None for anything unusual (help, abbreviations, a repeated or conflicting option, a
    bad value): argparse then parses it, with its messages, exactly as before.
    """
    values: dict = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or word == "-":
            break
        name, eq, inline = word.partition("=")
        if name in _VALUE_OPTIONS:
            if eq:
                value = inline
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value = argv[i + 1]
                i += 1
            else:
                return None
            key = _VALUE_OPTIONS[name]
            if key == "telemetry_interval_s":
                try:
                    value = float(value)
                except ValueError:
                    return None
            elif key == "output_format" and value not in ("jsonl", "hdf5"):
                return None
        elif name in _FLAG_OPTIONS and not eq:
            key, value = _FLAG_OPTIONS[name]
        else:
            return None
        if key in values and values[key] != value:
            return None  # e.g. --daemon --no-daemon: argparse says why
        values[key] = value
        i += 1
    command = argv[i:]
    if not command:
        return None
    return LaunchOptions(command=list(command), **values)


def parse_args(argv: Optional[List[str]] = None) -> LaunchOptions:
    """Parse the command line; the command may follow ``--`` or simply the last option."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fast = _fast_parse(argv)
    if fast is not None:
        return fast
    parser = build_parser()
    args = parser.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("no command given (usage: " + _USAGE + ")")
    return LaunchOptions(command=command, workflow_name=args.workflow_name, output_dir=args.output_dir,
                         output_format=args.output_format, telemetry_interval_s=args.telemetry_interval,
                         daemon=args.daemon, consolidate=args.consolidate, settings_file=args.settings_file,
                         keep_files=args.keep_files, quiet=args.quiet)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``flowcept-launch`` console script: exits with the command's code.

    Called with ``argv`` (from Python) it returns the code instead; from the command line
    (``argv`` None) it leaves through :func:`exit_now`, skipping the interpreter's teardown.
    """
    code = run(parse_args(argv))
    if argv is None:
        exit_now(code)
    return code


def run(options: LaunchOptions) -> int:
    """Run one rank; the command's exit code (1 for the launcher's own errors)."""
    from flowcept.launch.launcher import RankLauncher

    try:
        return RankLauncher(options).run()
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a settings error and the like: one clear line, the shell's code
        sys.stderr.write(f"flowcept-launch: {error}\n")
        return 1


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown (tens of ms with zmq, psutil and the rest loaded).

    Everything the launcher writes is closed or renamed by then; only the standard streams and
    logging handlers can still hold data, and they are flushed first.
    """
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    import os

    os._exit(code)


if __name__ == "__main__":
    main()
