"""The node daemon: receive batches from the ranks of this node, sample telemetry, write sinks.

Thread contract: the poll loop (:meth:`DaemonServer.serve`, main thread) owns every socket; the
writer thread owns every sink. Each loop turn drains up to ``_MAX_MESSAGES`` messages (or
``_MAX_TURN_BYTES``) as zero-copy frames, validates each header and each payload's framing (ends
and line count, counted in bulk) with :mod:`flowcept.protocol` (records are parsed only with
``--strict``), and hands the accepted batches to the writer every ``_SUBMIT_BYTES``. The writer
writes each (base path, workflow) with one ``writev`` straight from the received buffers (the
GIL is released during the write) and hands the acknowledgements back through a deque and the
wake pipe; the loop sends them, one cumulative ack per client. So receiving and validating
overlap with disk writes, and an acknowledged record is in the kernel's hands: a killed daemon
loses nothing a client dropped. The writer's backlog is bounded (``_MAX_WRITE_BACKLOG_BYTES``):
past it the loop stops reading and ZeroMQ's high-water marks push back on the clients. The
Prometheus endpoint (another thread) only reads counters. Bad frames are rejected, counted by
reason, and (when they carry a sequence number) refused with a ``nack`` so the client keeps the
batch.

Outputs: ``<dir>/<stem>_<workflow_id>_node-<node>.jsonl`` beside the clients' base path (so
``flowcept consolidate`` finds them), plus ``.h5`` with the HDF5 sink. Telemetry (node, each
registered rank's process, each GPU) is written to every workflow with a live client.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import signal
import socket as socket_module
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import orjson
import zmq

from flowcept import protocol
from flowcept.sinks import sink_class
from flowcept.transport import safe_name, split_base_path
from flowcept.version import __version__

logger = logging.getLogger(__name__)

_MAX_MESSAGES = 2000
_MAX_TURN_BYTES = 128 * 1024 * 1024
_SUBMIT_BYTES = 1024 * 1024  # hand accepted batches to the writer at least this often (buffers recycle hot)
_HOUSEKEEPING_S = 1.0
_RCVHWM = 10000
_SNDHWM = 10000
_LINGER_MS = 2000
_MAX_WRITE_BACKLOG_BYTES = 256 * 1024 * 1024


@dataclass
class DaemonConfig:
    """Everything the daemon needs; built from settings and command-line options by the CLI."""

    runtime_dir: str
    base_path: str = "flowcept_buffer.jsonl"
    node: str = field(default_factory=protocol.node_name)
    sinks: List[str] = field(default_factory=lambda: ["jsonl"])
    telemetry_interval_s: float = 1.0
    telemetry: bool = True
    gpu: bool = True
    max_message_bytes: int = 64 * 1024 * 1024
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    tcp_port: int = 0  # -1: any free port
    tcp_host: str = "0.0.0.0"
    job_dir: Optional[str] = None  # per-job keys and node entries (flowcept.job_registry)
    job_step: str = "0"
    exit_when_idle: bool = False
    idle_grace_s: float = 0.5
    strict: bool = False
    fsync: str = "flush"
    fsync_interval_s: float = 5.0


@dataclass
class Client:
    """A registered rank (one DEALER connection)."""

    host: str
    pid: int
    rank: Optional[int]
    local_rank: Optional[int]
    node: Optional[str]
    base: str
    workflows: List[Optional[str]]
    registered_at: float
    state: str = "connected"  # connected | finished | lost
    records: int = 0
    last_seen: float = 0.0

    def as_dict(self) -> Dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "rank": self.rank, "local_rank": self.local_rank,
                "workflows": self.workflows, "state": self.state, "records": self.records,
                "registered_at": self.registered_at}


class Counters:
    """Daemon counters (read by status and /metrics from other threads: plain ints)."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.received = 0
        self.written = 0
        self.rejected = 0
        self.spilled = 0
        self.dropped = 0
        self.telemetry_written = 0
        self.rejected_by_reason: Dict[str, int] = {reason: 0 for reason in protocol.REASONS}

    def as_dict(self) -> Dict[str, Any]:
        return {"messages": self.messages, "bytes": self.bytes, "received": self.received,
                "written": self.written, "rejected": self.rejected, "spilled": self.spilled,
                "dropped": self.dropped, "telemetry_written": self.telemetry_written,
                "rejected_by_reason": dict(self.rejected_by_reason)}


def _fallback_sampler() -> Any:
    """A minimal psutil node sampler, used when flowcept.telemetry.node is unavailable."""
    import psutil

    from flowcept.ids import next_id

    class _Minimal:
        status: Dict[str, Any] = {"gpu": None, "minimal": True}

        def __init__(self) -> None:
            psutil.cpu_percent(None)
            self.hostname = socket_module.gethostname()

        def sample(self) -> List[Dict[str, Any]]:
            memory = psutil.virtual_memory()
            return [{"type": "telemetry", "telemetry_id": next_id(), "kind": "node", "hostname": self.hostname,
                     "timestamp": time.time(), "cpu_percent": psutil.cpu_percent(None),
                     "memory_total_bytes": memory.total, "memory_used_bytes": memory.used,
                     "memory_available_bytes": memory.available}]

        def close(self) -> None:
            pass

    return _Minimal()


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MALLOC_KEEP_BYTES = 256 * 1024 * 1024


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed buffers instead of returning them to the kernel at once.

    Received payloads live in ZeroMQ buffers until the writer has written them; with glibc's
    defaults (dynamic mmap threshold, trim at twice it) a heap is trimmed as soon as a few
    hundred KB at its top are free, and the next messages fault their pages in again (~20,000
    faults per 280 MB received here, ~3 us each). Keeping up to ``_MALLOC_KEEP_BYTES`` free (the
    writer's backlog bound; the daemon's memory stays at its peak, never above it) halves the
    faults and cut the ingest path's CPU by 6-15% in A/B runs. Only glibc; elsewhere a no-op.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 64 * 1024 * 1024)  # the largest message: from the heap, reused
    mallopt(_M_TRIM_THRESHOLD, _MALLOC_KEEP_BYTES)


class DaemonServer:
    """One node daemon. ``serve()`` runs until SIGTERM/SIGINT, ``request_stop()`` or idle exit."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.hostname = socket_module.gethostname()
        self.address = protocol.ipc_address(config.runtime_dir)
        self.tcp_address: Optional[str] = None
        self._job_entry: Optional[str] = None
        self._status_only: set = set()  # socket indexes that answer status/ping and nothing else
        self.metrics_port: Optional[int] = None
        self.counters = Counters()
        self.clients: Dict[Tuple[int, bytes], Client] = {}
        self.sinks: Dict[Tuple[str, Optional[str]], List[Any]] = {}
        self.latest_telemetry: List[Dict[str, Any]] = []
        self.started_at = time.time()
        self._stop = threading.Event()
        self._dirty_since: Optional[float] = None
        self._idle_since: Optional[float] = None
        self._sampler: Any = None
        self._context: Any = None
        self._sockets: List[Any] = []
        self._wake_r: Optional[int] = None
        self._wake_w: Optional[int] = None
        self._metrics_server: Any = None
        self._authenticator: Any = None
        self._writes: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._written_acks: Any = deque()
        self._backlog = 0
        self._backlog_cond = threading.Condition()
        self._writer: Optional[threading.Thread] = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to stop (thread- and signal-safe)."""
        self._stop.set()
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def serve(self) -> int:
        """Bind, announce readiness, loop until stopped, then drain, flush and close; returns 0."""
        _keep_freed_memory()
        self._bind()
        self._install_signals()
        self._start_metrics()
        self._write_ready()
        logger.info("flowcept daemon %s ready at %s", os.getpid(), self.address)
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _bind(self) -> None:
        config = self.config
        protocol.make_private_dir(config.runtime_dir)
        path = protocol.socket_path(config.runtime_dir)
        previous = protocol.read_ready(config.runtime_dir)
        if previous and protocol.pid_alive(previous.get("pid")) and previous.get("pid") != os.getpid():
            from flowcept.daemon_link import ping

            if ping(self.address, 1.0):
                raise RuntimeError(f"a flowcept daemon (pid {previous.get('pid')}) already serves "
                                   f"{self.address}")
        for stale in (path, protocol.ready_path(config.runtime_dir)):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        self._context = zmq.Context()
        router = self._new_router()
        old_umask = os.umask(0o077)
        try:
            router.bind(self.address)
        finally:
            os.umask(old_umask)
        self._sockets.append(router)
        if config.tcp_port:
            self._bind_tcp()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = zmq.Poller()
        for sock in self._sockets:
            self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._writer = threading.Thread(target=self._writer_run, name="flowcept-daemon-writer", daemon=True)
        self._writer.start()

    def _new_router(self) -> Any:
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, _LINGER_MS)
        router.setsockopt(zmq.RCVHWM, _RCVHWM)
        router.setsockopt(zmq.SNDHWM, _SNDHWM)
        # Hard guard; messages between the limit and twice it are rejected and counted by decode().
        router.setsockopt(zmq.MAXMSGSIZE, 2 * self.config.max_message_bytes)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        return router

    def _bind_tcp(self) -> None:
        """TCP only with CURVE; one authorised client key.

        With a job directory the keys are the job's (shared by every node's daemon, made by the
        first) and the daemon registers its address there for cross-node status; without one they
        live under <runtime_dir>/curve.
        """
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        from flowcept import job_registry

        step_dir = None
        if self.config.job_dir:
            try:
                step_dir = job_registry.step_dir(self.config.job_dir, self.config.job_step)
                keys = job_registry.ensure_keys(step_dir)
            except (OSError, ValueError, job_registry.JobKeysError) as error:
                # Cross-node status is a convenience: the node's records matter more than it.
                logger.warning("cross-node status off: the job directory %s is unusable (%s)",
                               self.config.job_dir, error)
                return
        else:
            keys = job_registry.make_keys(self.config.runtime_dir)  # the runtime directory is private
        self._authenticator = ThreadAuthenticator(self._context)
        self._authenticator.start()
        self._authenticator.configure_curve(domain="*", location=os.path.join(keys, "authorized"))
        public, secret = zmq.auth.load_certificate(os.path.join(keys, "server.key_secret"))
        router = self._new_router()
        router.curve_publickey = public
        router.curve_secretkey = secret
        router.curve_server = True
        if self.config.tcp_port < 0:
            port = router.bind_to_random_port(f"tcp://{self.config.tcp_host}")
        else:
            port = self.config.tcp_port
            router.bind(f"tcp://{self.config.tcp_host}:{port}")
        self.tcp_address = f"tcp://{self.config.tcp_host}:{port}"
        self.curve_dir = keys
        self._sockets.append(router)
        if step_dir is not None:
            # The job's keys are shared with every status client: this socket only answers status.
            self._status_only.add(len(self._sockets) - 1)
            hosts = [self.config.tcp_host] if self.config.tcp_host not in ("0.0.0.0", "*") \
                else job_registry.advertised_hosts()
            addresses = [f"tcp://{host}:{port}" for host in hosts]
            try:
                self._job_entry = job_registry.register_node(step_dir, self.config.node, self.config.job_step,
                                                             addresses[0], os.getpid(), addresses)
            except (OSError, job_registry.JobKeysError) as error:
                logger.warning("cross-node status off: cannot register in %s (%s)", step_dir, error)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, frame: Any) -> None:
            self._stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _start_metrics(self) -> None:
        if not self.config.metrics_port:
            return
        try:
            from flowcept.daemon.metrics import start_metrics_server

            self._metrics_server, self.metrics_port = start_metrics_server(
                self, self.config.metrics_host, self.config.metrics_port)
        except Exception as error:
            logger.error("Prometheus /metrics endpoint disabled: %s", error)

    def _write_ready(self) -> None:
        """Readiness, atomically: tmp file then rename (readers never see half a file)."""
        record = {"pid": os.getpid(), "address": self.address, "tcp_address": self.tcp_address,
                  "metrics_port": self.metrics_port, "node": self.config.node, "hostname": self.hostname,
                  "runtime_dir": self.config.runtime_dir, "started_at": self.started_at,
                  "version": __version__, "protocol": protocol.VERSION}
        path = protocol.ready_path(self.config.runtime_dir)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(orjson.dumps(record))
        os.replace(tmp, path)

    # -- the loop -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        config = self.config
        now = time.monotonic()
        next_sample = now if config.telemetry else float("inf")
        next_housekeeping = now + _HOUSEKEEPING_S
        stop = self._stop
        poller = self._poller
        while not stop.is_set():
            timeout = max(0.0, min(next_sample, next_housekeeping) - time.monotonic())
            events = dict(poller.poll(int(timeout * 1000) + 1))
            if self._wake_r in events:
                self._drain_wake_pipe()
            if self._written_acks:
                self._send_acks()
            for sock in self._sockets:
                if sock in events:
                    self._wait_backlog()
                    self._receive(sock)
            now = time.monotonic()
            if now >= next_sample:
                self._sample()
                next_sample = now + config.telemetry_interval_s
            if now >= next_housekeeping:
                self._housekeeping(now)
                next_housekeeping = now + _HOUSEKEEPING_S

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _receive(self, sock: Any) -> None:
        """Drain a turn's worth of messages; hand accepted batches to the writer every 1 MB or so.

        Frames arrive zero-copy (``copy=False``): a payload stays in ZeroMQ's buffer until the
        writer has written it. Only the small identity and header frames become ``bytes``.
        Handing over every ``_SUBMIT_BYTES`` (not once per turn) lets the writer write while
        this thread still receives, and acknowledgements go out as soon as they are written.
        """
        index = self._sockets.index(sock)
        counters = self.counters
        clients = self.clients
        max_bytes = self.config.max_message_bytes
        strict = self.config.strict
        status_only = self._status_only
        decode = protocol.decode
        recv = sock.recv_multipart
        groups: Dict[Tuple[str, Optional[str]], List[Any]] = {}
        acks: Dict[bytes, List[Tuple[int, Tuple[str, Optional[str]], int, Client]]] = {}
        turn_bytes = 0
        pending_bytes = 0
        for _ in range(_MAX_MESSAGES):
            try:
                frames = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            identity, body = frames[0].bytes, frames[1:]
            size = sum(len(frame) for frame in body)
            counters.messages += 1
            counters.bytes += size
            turn_bytes += size
            try:
                message = decode(body, max_bytes, strict=strict)
            except protocol.ProtocolError as error:
                self._reject(sock, identity, body, error.reason)
                continue
            kind = message.kind
            if index in status_only and kind != "status" and kind != "ping":
                self._reject(sock, identity, body, "status_only_socket")
                continue
            client = clients.get((index, identity))
            if kind == "batch":
                header = message.header
                if client is None or client.state != "connected":
                    self._reject(sock, identity, body, "unregistered", seq=header["s"])
                    continue
                count = header["n"]
                key = (client.base, header["w"])
                group = groups.get(key)
                if group is None:
                    groups[key] = group = [[], 0]
                group[0].append(message.payload)
                group[1] += count
                counters.received += count
                client.records += count
                acks.setdefault(identity, []).append((header["s"], key, count, client))
                pending_bytes += size
                if pending_bytes >= _SUBMIT_BYTES:
                    self._submit(("write", groups, acks, sock, False))
                    groups, acks, pending_bytes = {}, {}, 0
                    if self._written_acks:
                        self._send_acks()
                    self._wait_backlog()
            elif kind == "hello":
                self._register(index, identity, message.header)
            elif kind == "bye":
                if client is not None:
                    if self.config.telemetry and time.monotonic() - self._last_sample_at > 0.01:
                        # A run shorter than the interval still gets a node sample at its end.
                        self._sample()
                    client.state = "finished"
                    self._dirty_since = self._dirty_since or time.monotonic()
            elif kind == "ping":
                self._reply(sock, identity, protocol.encode_pong(message.header.get("t", 0), pid=os.getpid()))
            elif kind == "status":
                self._reply(sock, identity, protocol.encode_status(self.status()))
            if turn_bytes >= _MAX_TURN_BYTES:
                break
        if groups:
            self._submit(("write", groups, acks, sock, False))

    # -- the writer thread --------------------------------------------------------------------------
    def _submit(self, item: Tuple[Any, ...]) -> None:
        if item[0] == "write":
            size = sum(len(p) for payloads, _ in item[1].values() for p in payloads)
            with self._backlog_cond:
                self._backlog += size
            item = (*item, size)
        self._writes.put(item)

    def _wait_backlog(self) -> None:
        """Stop reading while the writer is far behind (bounded memory; ZeroMQ pushes back)."""
        with self._backlog_cond:
            while self._backlog > _MAX_WRITE_BACKLOG_BYTES and self._writer is not None and self._writer.is_alive():
                self._backlog_cond.wait(0.5)

    def _writer_run(self) -> None:
        """Writer thread: owns the sinks; writes, flushes, and reports what to acknowledge."""
        while True:
            item = self._writes.get()
            kind = item[0]
            if kind == "stop":
                return
            if kind == "flush":
                self._flush_sinks()
                continue
            _, groups, acks, sock, telemetry, size = item
            failed = set()
            for key, (payloads, count) in groups.items():
                if not self._write(key, payloads, count, telemetry=telemetry):
                    failed.add(key)
                    if telemetry:
                        self.counters.dropped += count
            with self._backlog_cond:
                self._backlog -= size
                self._backlog_cond.notify_all()
            if acks:
                self._written_acks.append((sock, acks, failed))
                try:
                    os.write(self._wake_w, b"a")
                except OSError:  # pipe full: the loop is awake anyway
                    pass

    def _send_acks(self) -> None:
        """Loop thread: acknowledge what the writer wrote (nack what it could not).

        Acks are cumulative, so one per client covers every hand-over written since the last
        call; nacks go first, each for its own batch.
        """
        counters = self.counters
        latest: Dict[Tuple[Any, bytes], int] = {}
        while self._written_acks:
            sock, acks, failed = self._written_acks.popleft()
            for identity, entries in acks.items():
                if failed:
                    for seq, key, count, _client in entries:
                        if key in failed:
                            counters.spilled += count
                            self._reply(sock, identity, protocol.encode_nack(seq, "write_failed"))
                latest[(sock, identity)] = entries[-1][0]
        for (sock, identity), seq in latest.items():
            self._reply(sock, identity, protocol.encode_ack(seq))

    def _write(self, key: Tuple[str, Optional[str]], payloads: List[bytes], count: int,
               telemetry: bool = False) -> bool:
        """Write whole JSONL payloads of one (base path, workflow) to every sink; False on failure."""
        try:
            for sink in self._sinks_for(key):
                write_many = getattr(sink, "write_many", None)
                if write_many is not None:
                    write_many(payloads, count)
                    continue
                write_lines = getattr(sink, "write_lines", None)
                if write_lines is not None:
                    write_lines(b"".join(payloads), count)
                else:
                    sink.write([orjson.loads(line) for p in payloads for line in bytes(p).splitlines()])
        except Exception as error:
            reason = "disk full" if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else error
            logger.error("daemon could not write %d records of workflow %s: %s", count, key[1], reason)
            return False
        if telemetry:
            self.counters.telemetry_written += count
        else:
            self.counters.written += count
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()
        return True

    def _sinks_for(self, key: Tuple[str, Optional[str]]) -> List[Any]:
        sinks = self.sinks.get(key)
        if sinks is None:
            base, workflow_id = key
            directory, stem, suffix = split_base_path(base)
            wf = safe_name(workflow_id) if workflow_id else "no-workflow"
            node = safe_name(self.config.node)
            sinks = []
            for name in self.config.sinks:
                ext = ".h5" if name == "hdf5" else suffix
                path = os.path.join(directory, f"{stem}_{wf}_node-{node}{ext}")
                sinks.append(sink_class(name)(path, fsync=self.config.fsync))
            self.sinks[key] = sinks
        return sinks

    def _reject(self, sock: Any, identity: bytes, body: List[bytes], reason: str,
                seq: Optional[int] = None) -> None:
        counters = self.counters
        counters.rejected += 1
        counters.rejected_by_reason[reason] = counters.rejected_by_reason.get(reason, 0) + 1
        if seq is None and body and len(body[0]) < 4096:
            try:  # tell a genuine client which batch to keep; garbage gets no answer
                header = orjson.loads(bytes(body[0]))
                if isinstance(header, dict) and header.get("k") == "batch" and type(header.get("s")) is int:
                    seq = header["s"]
            except orjson.JSONDecodeError:
                pass
        if seq is not None:
            self._reply(sock, identity, protocol.encode_nack(seq, reason))
        logger.debug("rejected a message (%s)", reason)

    def _reply(self, sock: Any, identity: bytes, frames: List[bytes]) -> None:
        try:
            sock.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:  # the peer left or is not reading: it times out and spills
            pass

    def _register(self, index: int, identity: bytes, header: Dict[str, Any]) -> None:
        workflows = header.get("w") or [None]
        if not isinstance(workflows, list):
            workflows = [workflows]
        key = (index, identity)
        client = self.clients.get(key)
        base = header.get("base") if isinstance(header.get("base"), str) else self.config.base_path
        if client is None:
            pid = header.get("pid") if type(header.get("pid")) is int else 0
            client = Client(host=str(header.get("host") or "?"), pid=pid, rank=header.get("rank"),
                            local_rank=header.get("local_rank"), node=header.get("node"),
                            base=os.path.abspath(base), workflows=list(workflows),
                            registered_at=time.time())
            self.clients[key] = client
            logger.info("client registered: host %s pid %s rank %s", client.host, client.pid, client.rank)
        else:
            client.workflows = list(workflows)
            client.state = "connected"
        self._idle_since = None

    # -- telemetry and housekeeping -------------------------------------------------------------------
    def _local_pids(self) -> Dict[int, Optional[int]]:
        return {c.pid: c.rank for c in list(self.clients.values())
                if c.state == "connected" and c.host == self.hostname and c.pid}

    _last_sample_at = 0.0

    def _sample(self) -> None:
        self._last_sample_at = time.monotonic()
        if self._sampler is None:
            try:
                from flowcept.telemetry.node import NodeSampler

                self._sampler = NodeSampler(gpu=self.config.gpu, pids_provider=self._local_pids,
                                            extra={"node_name": self.config.node})
            except Exception as error:
                logger.warning("node telemetry sampler unavailable (%s); sampling CPU and memory only", error)
                self._sampler = _fallback_sampler()
        try:
            records = self._sampler.sample()
        except Exception as error:
            logger.warning("telemetry sampling failed: %s", error)
            return
        self.latest_telemetry = records
        targets: Dict[Tuple[str, Optional[str]], List[Optional[int]]] = {}
        for client in list(self.clients.values()):
            if client.state != "connected":
                continue
            for workflow_id in client.workflows:
                targets.setdefault((client.base, workflow_id), []).append(client.pid)
        for key, pids in targets.items():
            lines = []
            for record in records:
                pid = record.get("pid") if record.get("kind") == "process" else None
                if pid is not None and pid not in pids:
                    continue
                out = {"type": "telemetry", "telemetry_id": record.get("telemetry_id"), "workflow_id": key[1]}
                for name, value in record.items():
                    if name not in out:
                        out[name] = value
                try:
                    lines.append(orjson.dumps(out, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS,
                                              default=str))
                except TypeError:
                    self.counters.dropped += 1
            if lines:
                self._submit(("write", {key: ([b"".join(lines)], len(lines))}, {}, None, True))

    def _housekeeping(self, now: float) -> None:
        for client in list(self.clients.values()):
            if client.state == "connected" and client.host == self.hostname and not protocol.pid_alive(client.pid):
                client.state = "lost"
                logger.warning("client pid %s (rank %s) exited without goodbye", client.pid, client.rank)
        if self._dirty_since is not None and (
                now - self._dirty_since >= self.config.fsync_interval_s or self._clients_done()):
            self._dirty_since = None
            self._submit(("flush",))
        if self.config.exit_when_idle and self.clients and self._clients_done():
            if self._idle_since is None:
                self._idle_since = now
            if now - self._idle_since >= self.config.idle_grace_s:
                logger.info("every client said goodbye; exiting")
                self._stop.set()
        else:
            self._idle_since = None

    def _clients_done(self) -> bool:
        return all(client.state != "connected" for client in list(self.clients.values()))

    def _flush_sinks(self) -> None:
        for sinks in list(self.sinks.values()):
            for sink in sinks:
                try:  # a database sink starts its write without holding the writer thread
                    getattr(sink, "flush_async", sink.flush)()
                except Exception as error:
                    logger.warning("sink flush failed: %s", error)
        self._dirty_since = None

    # -- status ---------------------------------------------------------------------------------------
    def status(self) -> Dict[str, Any]:
        """What ``flowcept daemon status --json`` prints."""
        clients = list(self.clients.values())
        files = [getattr(sink, "path", None) for sinks in list(self.sinks.values()) for sink in sinks]
        return {
            "pid": os.getpid(), "address": self.address, "tcp_address": self.tcp_address,
            "metrics_port": self.metrics_port, "node": self.config.node, "hostname": self.hostname,
            "runtime_dir": self.config.runtime_dir, "version": __version__,
            "started_at": self.started_at, "uptime_s": round(time.time() - self.started_at, 3),
            "output_files": [f for f in files if f],
            "clients": {"connected": sum(c.state == "connected" for c in clients),
                        "finished": sum(c.state == "finished" for c in clients),
                        "lost": sum(c.state == "lost" for c in clients),
                        "list": [c.as_dict() for c in clients[:256]]},
            "counters": self.counters.as_dict(),
            "telemetry": {"interval_s": self.config.telemetry_interval_s if self.config.telemetry else None,
                          "sampler": getattr(self._sampler, "status", None),
                          "latest": self.latest_telemetry},
        }

    # -- shutdown -------------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        """Stop accepting, drain what is queued, flush and close the sinks, remove the ready file."""
        if self._job_entry is not None:
            from flowcept import job_registry

            job_registry.unregister_node(self._job_entry)
        ready = protocol.ready_path(self.config.runtime_dir)
        try:
            os.unlink(ready)
        except FileNotFoundError:
            pass
        try:
            os.unlink(protocol.socket_path(self.config.runtime_dir))  # no new connections
        except FileNotFoundError:
            pass
        for sock in self._sockets:
            for _ in range(1000):
                if not sock.poll(0):
                    break
                self._wait_backlog()
                self._receive(sock)
        if self._writer is not None:
            self._writes.put(("stop",))
            self._writer.join()
        self._send_acks()
        for sinks in self.sinks.values():
            for sink in sinks:
                try:
                    sink.close()
                except Exception as error:
                    logger.error("closing sink %s failed: %s", getattr(sink, "path", sink), error)
        if self._sampler is not None:
            try:
                self._sampler.close()
            except Exception:
                pass
        if self._metrics_server is not None:
            try:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            except Exception:
                pass
        if self._authenticator is not None:
            self._authenticator.stop()
        for sock in self._sockets:
            sock.close(linger=_LINGER_MS)
        if self._context is not None:
            self._context.term()
        if threading.current_thread() is threading.main_thread():
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        logger.info("flowcept daemon stopped: %s", self.counters.as_dict())


