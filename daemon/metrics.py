"""Prometheus ``/metrics`` for node dashboards: node and GPU figures and the daemon's counters.

Off by default (``daemon.metrics_port: 0``); bound to ``daemon.metrics_host`` (127.0.0.1).
A custom collector reads the daemon's counters and latest telemetry sample when scraped, so the
ingest path never touches a metric object. Names follow Prometheus conventions: base units
(bytes, seconds, watts, ratios 0..1), ``_total`` for counters, and no high-cardinality labels
(only ``reason`` with a fixed set of values and ``gpu`` with the device index).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Tuple

_NODE_GAUGES = (
    # (metric, help, field in the node telemetry record, scale to base unit)
    ("flowcept_node_cpu_utilization_ratio", "CPU utilisation of the node (0..1).", "cpu_percent", 0.01),
    ("flowcept_node_load1", "1-minute load average of the node.", "load_avg_1m", 1.0),
    ("flowcept_node_memory_total_bytes", "Physical memory of the node.", "memory_total_bytes", 1.0),
    ("flowcept_node_memory_used_bytes", "Memory in use on the node.", "memory_used_bytes", 1.0),
    ("flowcept_node_memory_available_bytes", "Memory available on the node.", "memory_available_bytes", 1.0),
    ("flowcept_node_swap_used_bytes", "Swap in use on the node.", "swap_used_bytes", 1.0),
)
_NODE_COUNTERS = (
    ("flowcept_node_disk_read_bytes", "Bytes read from disks since boot.", "disk_read_bytes"),
    ("flowcept_node_disk_written_bytes", "Bytes written to disks since boot.", "disk_write_bytes"),
    ("flowcept_node_network_receive_bytes", "Bytes received on all interfaces since boot.", "net_bytes_recv"),
    ("flowcept_node_network_transmit_bytes", "Bytes sent on all interfaces since boot.", "net_bytes_sent"),
)
_GPU_GAUGES = (
    ("flowcept_gpu_utilization_ratio", "GPU utilisation (0..1).", "gpu_utilization_percent", 0.01),
    ("flowcept_gpu_memory_used_bytes", "GPU memory in use.", "gpu_memory_used_bytes", 1.0),
    ("flowcept_gpu_memory_total_bytes", "GPU memory.", "gpu_memory_total_bytes", 1.0),
    ("flowcept_gpu_power_watts", "GPU power draw.", "gpu_power_watts", 1.0),
    ("flowcept_gpu_temperature_celsius", "GPU temperature.", "gpu_temperature_celsius", 1.0),
)
_DAEMON_COUNTERS = (
    ("flowcept_daemon_messages_received", "Messages received by the daemon.", "messages"),
    ("flowcept_daemon_received_bytes", "Bytes received by the daemon.", "bytes"),
    ("flowcept_daemon_records_received", "Records received from clients.", "received"),
    ("flowcept_daemon_records_written", "Client records written to the sinks.", "written"),
    ("flowcept_daemon_records_spilled", "Records refused after a failed write (clients kept them).", "spilled"),
    ("flowcept_daemon_records_dropped", "Records lost by the daemon.", "dropped"),
    ("flowcept_daemon_telemetry_records_written", "Telemetry records written.", "telemetry_written"),
)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class DaemonCollector:
    """Builds the metric families from a :class:`~flowcept.daemon.server.DaemonServer` on scrape."""

    def __init__(self, server: Any):
        self.server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        server = self.server
        counters = server.counters
        for name, help_text, attribute in _DAEMON_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=getattr(counters, attribute))
        rejected = CounterMetricFamily("flowcept_daemon_messages_rejected",
                                       "Messages rejected (malformed, unknown version or kind, oversize...).",
                                       labels=["reason"])
        for reason, value in sorted(dict(counters.rejected_by_reason).items()):
            rejected.add_metric([reason], value)
        yield rejected
        clients = GaugeMetricFamily("flowcept_daemon_clients", "Registered clients by state.", labels=["state"])
        states = [c.state for c in list(server.clients.values())]
        for state in ("connected", "finished", "lost"):
            clients.add_metric([state], states.count(state))
        yield clients
        yield GaugeMetricFamily("flowcept_daemon_start_time_seconds", "Start time of the daemon (Unix time).",
                                value=server.started_at)
        yield GaugeMetricFamily("flowcept_daemon_output_files", "Files the daemon writes.",
                                value=sum(len(s) for s in list(server.sinks.values())))
        node, gpus = None, []
        for record in list(server.latest_telemetry):
            if record.get("kind") == "node" and node is None:
                node = record
            elif record.get("kind") == "gpu":
                gpus.append(record)
        if node is not None:
            for name, help_text, source, scale in _NODE_GAUGES:
                value = _number(node.get(source))
                if value is not None:
                    yield GaugeMetricFamily(name, help_text, value=value * scale)
            for name, help_text, source in _NODE_COUNTERS:
                value = _number(node.get(source))
                if value is not None:
                    yield CounterMetricFamily(name, help_text, value=value)
        for name, help_text, source, scale in _GPU_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=["gpu"])
            for gpu in gpus:
                value = _number(gpu.get(source))
                if value is not None:
                    family.add_metric([str(gpu.get("gpu_index", "0"))], value * scale)
            if family.samples:
                yield family

    def describe(self) -> Iterator[Any]:
        return iter(())


def start_metrics_server(server: Any, host: str, port: int) -> Tuple[Any, int]:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns (http server, bound port)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(server))
    result = start_http_server(port, addr=host, registry=registry)
    httpd = result[0] if isinstance(result, tuple) else None
    bound = httpd.server_port if httpd is not None else port
    return httpd, bound
