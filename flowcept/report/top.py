"""``flowcept top``: a live terminal view of the node daemons of a job (or of this node).

Every refresh asks each daemon for its status (``flowcept.daemon_link.daemon_status``), then
draws one row per node (CPU, memory, clients, records/s, drops) and one row per GPU (utilisation,
memory, power). Records/s is the difference of the daemon's ``received`` counter between two
refreshes. The status source is a callable returning a list of status dicts, so the view works
from any source that speaks the daemon's status shape. Exits on ``q`` or Ctrl-C.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

StatusProvider = Callable[[], List[Dict[str, Any]]]


# -- finding daemons ----------------------------------------------------------------------------------

def discover_addresses(addresses: Sequence[str] = (), runtime_dirs: Sequence[str] = ()) -> List[str]:
    """Daemon addresses to watch: given ones, those of given runtime dirs, else the settings' or this node's.

    Without arguments: ``daemon.address`` from the settings; else the ready files of every daemon
    of this user under the runtime base (``FLOWCEPT_DAEMON_RUNTIME_DIR``, ``$XDG_RUNTIME_DIR``
    or ``/tmp``), which on one node shows that node's daemons.
    """
    from flowcept import protocol

    found = list(addresses)
    for directory in runtime_dirs:
        ready = protocol.read_ready(directory)
        if ready and ready.get("address"):
            found.append(ready["address"])
        else:
            found.append(protocol.ipc_address(directory))
    if found:
        return found
    from flowcept.settings import load_settings

    settings = load_settings()
    if settings["daemon.address"]:
        return [settings["daemon.address"]]
    user_dir = os.path.dirname(protocol.runtime_dir(base=settings["daemon.runtime_dir"]))
    for ready_file in sorted(glob.glob(os.path.join(glob.escape(user_dir), "*", "ready.json"))):
        ready = protocol.read_ready(os.path.dirname(ready_file))
        if ready and ready.get("address") and _pid_alive(ready.get("pid")):
            found.append(ready["address"])
    return found


def _pid_alive(pid: Any) -> bool:
    """A remote daemon (no local pid) is left to the status request to judge."""
    from flowcept.protocol import pid_alive

    return not isinstance(pid, int) or pid_alive(pid)
    return True


def daemon_status_provider(addresses: Sequence[str], timeout_s: float = 1.0) -> StatusProvider:
    """A status source asking each daemon in turn; an unreachable one gives an ``error`` entry."""
    from flowcept.daemon_link import daemon_status

    def provide() -> List[Dict[str, Any]]:
        out = []
        for address in addresses:
            try:
                status = daemon_status(address, timeout_s=timeout_s)
            except Exception as error:  # a bad address must not end the view
                status = None
                logger.debug("status of %s failed: %s", address, error)
            out.append(status if status is not None else {"address": address, "error": "no answer"})
        return out

    return provide


# -- the model --------------------------------------------------------------------------------------------

class TopModel:
    """Turns successive status snapshots into rows, remembering counters to compute rates."""

    def __init__(self) -> None:
        self._previous: Dict[str, tuple] = {}

    def rows(self, statuses: List[Dict[str, Any]], now: Optional[float] = None) -> Dict[str, List[Dict[str, Any]]]:
        """Node rows and GPU rows for one refresh."""
        now = time.monotonic() if now is None else now
        nodes: List[Dict[str, Any]] = []
        gpus: List[Dict[str, Any]] = []
        for status in statuses:
            key = str(status.get("address") or status.get("node") or id(status))
            name = status.get("node") or status.get("hostname") or status.get("address") or "?"
            if status.get("error"):
                nodes.append({"node": name, "error": status["error"]})
                continue
            counters = status.get("counters") or {}
            received = counters.get("received") or 0
            previous = self._previous.get(key)
            rate = None
            if previous is not None and now > previous[0]:
                rate = max(0.0, (received - previous[1]) / (now - previous[0]))
            self._previous[key] = (now, received)
            clients = status.get("clients") or {}
            telemetry = (status.get("telemetry") or {}).get("latest") or []
            node_sample = next((r for r in telemetry if r.get("kind", "node") == "node"), {})
            nodes.append({
                "node": name, "cpu_percent": node_sample.get("cpu_percent"),
                "memory_percent": node_sample.get("memory_percent"),
                "memory_used_bytes": node_sample.get("memory_used_bytes"),
                "memory_total_bytes": node_sample.get("memory_total_bytes"),
                "clients": clients.get("connected"), "lost": clients.get("lost"),
                "received": received, "written": counters.get("written"), "rate": rate,
                "dropped": (counters.get("dropped") or 0) + (counters.get("rejected") or 0),
                "spilled": counters.get("spilled"), "uptime_s": status.get("uptime_s"),
            })
            gpu_samples = [r for r in telemetry if r.get("kind") == "gpu"]
            gpu_samples += [g for g in node_sample.get("gpus") or [] if isinstance(g, dict)]
            for gpu in gpu_samples:
                gpus.append({"node": name, "gpu": gpu.get("gpu_index", gpu.get("index", "?")),
                             "name": gpu.get("gpu_name") or gpu.get("name"),
                             "util": gpu.get("gpu_utilization_percent"),
                             "memory_used_bytes": gpu.get("gpu_memory_used_bytes"),
                             "memory_total_bytes": gpu.get("gpu_memory_total_bytes"),
                             "power": gpu.get("gpu_power_watts"),
                             "temperature": gpu.get("gpu_temperature_celsius")})
        return {"nodes": nodes, "gpus": gpus}


def render(rows: Dict[str, List[Dict[str, Any]]], title: str = "flowcept top") -> Any:
    """The rich renderable of one refresh (a node table, and a GPU table when there are GPUs)."""
    from rich.console import Group
    from rich.table import Table

    from flowcept.report.card import fmt_bytes

    nodes = Table(title=f"{title} · {time.strftime('%H:%M:%S')} · {len(rows['nodes'])} node daemon(s)",
                  expand=False)
    for column, justify in (("Node", "left"), ("CPU %", "right"), ("Memory", "right"), ("Mem %", "right"),
                            ("Ranks", "right"), ("Records", "right"), ("Records/s", "right"),
                            ("Drops", "right"), ("Spilled", "right")):
        nodes.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows["nodes"]:
        if row.get("error"):
            nodes.add_row(str(row["node"]), f"[red]{row['error']}[/red]", "", "", "", "", "", "", "")
            continue
        dropped = row.get("dropped") or 0
        nodes.add_row(
            str(row["node"]), _num(row.get("cpu_percent")),
            f"{fmt_bytes(row.get('memory_used_bytes'))} / {fmt_bytes(row.get('memory_total_bytes'))}"
            if row.get("memory_used_bytes") is not None else "–",
            _num(row.get("memory_percent")),
            f"{row.get('clients') or 0}" + (f" ({row['lost']} lost)" if row.get("lost") else ""),
            str(row.get("received") or 0), _num(row.get("rate")),
            f"[red]{dropped}[/red]" if dropped else "0", str(row.get("spilled") or 0))
    parts: List[Any] = [nodes]
    if rows["gpus"]:
        gpus = Table(title="GPUs", expand=False)
        for column in ("Node", "GPU", "Util %", "Memory", "Power W", "Temp °C"):
            gpus.add_column(column, justify="left" if column in ("Node", "GPU") else "right")
        for row in rows["gpus"]:
            label = f"{row['gpu']}" + (f" {row['name']}" if row.get("name") else "")
            memory = (f"{fmt_bytes(row.get('memory_used_bytes'))} / {fmt_bytes(row.get('memory_total_bytes'))}"
                      if row.get("memory_used_bytes") is not None else "–")
            gpus.add_row(str(row["node"]), label, _num(row.get("util")), memory, _num(row.get("power")),
                         _num(row.get("temperature")))
        parts.append(gpus)
    parts.append("[dim]q or Ctrl-C to quit[/dim]")
    return Group(*parts)


def _num(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


# -- the loop ------------------------------------------------------------------------------------------

class _KeyWatcher:
    """Sets ``stop`` when 'q' is typed on an interactive terminal (cbreak mode, restored on exit)."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self._saved: Any = None
        self._fd: Optional[int] = None

    def __enter__(self) -> _KeyWatcher:
        try:
            if not sys.stdin.isatty():
                return self
            import termios
            import tty

            self._fd = sys.stdin.fileno()
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        except Exception:  # no terminal control (Windows, pipes): Ctrl-C still works
            self._fd = None
            return self
        threading.Thread(target=self._watch, name="flowcept-top-keys", daemon=True).start()
        return self

    def _watch(self) -> None:
        import select

        while not self.stop.is_set() and self._fd is not None:
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if ready:
                key = os.read(self._fd, 1)
                if key in (b"q", b"Q", b"\x03"):
                    self.stop.set()

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None and self._saved is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
        self._fd = None


def run_top(status_provider: StatusProvider, interval_s: float = 2.0, iterations: Optional[int] = None,
            console: Any = None, live: Optional[bool] = None, stop: Optional[threading.Event] = None) -> int:
    """Refresh the view every ``interval_s`` until q/Ctrl-C or ``iterations`` refreshes; returns 0.

    ``live`` (default: the console is a terminal and no iteration count is given) redraws in
    place; otherwise each refresh is printed below the last, which is what tests and logs read.
    """
    from rich.console import Console

    console = console or Console()
    stop = stop or threading.Event()
    model = TopModel()
    if live is None:
        live = console.is_terminal and iterations is None
    count = 0
    try:
        if live:
            from rich.live import Live

            with _KeyWatcher(stop), Live(console=console, auto_refresh=False, screen=False) as view:
                while not stop.is_set():
                    view.update(render(model.rows(status_provider())), refresh=True)
                    count += 1
                    if iterations is not None and count >= iterations:
                        break
                    stop.wait(interval_s)
        else:
            while not stop.is_set():
                console.print(render(model.rows(status_provider())))
                count += 1
                if iterations is not None and count >= iterations:
                    break
                stop.wait(interval_s)
    except KeyboardInterrupt:
        pass
    return 0
