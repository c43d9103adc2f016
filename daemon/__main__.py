"""``flowcept-daemon`` / ``python -m flowcept.daemon``: run the node daemon in the foreground."""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``flowcept-daemon`` script."""
    from flowcept.daemon.cli import run_command

    run_command(prog_name="flowcept-daemon")


if __name__ == "__main__":
    main()
