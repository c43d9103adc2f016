"""The client transport to the node daemon: batches over ZeroMQ, acknowledged, spilled when unsure.

Used by the pipeline when ``daemon.address`` (``FLOWCEPT_DAEMON_ADDRESS``) is set. A DEALER
socket sends each flushed batch as one message (cut at line ends below
``daemon.max_message_bytes``) and keeps it until the daemon acknowledges it. A batch goes to
the per-process file (the ``fallback`` :class:`~flowcept.transport.FileTransport`) instead when:

- the daemon cannot take it now (not connected, high-water mark reached: ``send`` never blocks);
- the daemon rejects it (``nack``), or does not know this client (it restarted);
- it is not acknowledged within ``daemon.ack_timeout_s``: every unacknowledged batch is spilled
  and the daemon is considered down (probed again every few seconds).

A spilled batch the daemon had in fact written appears twice; consolidation keeps one copy
(tasks by ``task_id``), so the merged result holds every record exactly once.

Thread contract: every method takes ``self._lock``; the socket is only touched under it, from
the flusher thread, an application thread draining under back-pressure, or a signal handler.
``zmq`` is imported when a link is built, never by ``import flowcept``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import orjson

from flowcept import protocol

logger = logging.getLogger(__name__)

_REPROBE_S = 2.0
_STALL_S = 0.5
_MAX_UNACKED_BYTES = 256 * 1024 * 1024
_SNDHWM = 1000
_LINGER_MS = 1000


def _setting(settings: Any, name: str, default: Any) -> Any:
    if settings is None:
        return default
    try:
        value = settings[name]
    except (KeyError, TypeError):
        return default
    return default if value is None else value


def _curve_setup(socket: Any, address: str) -> None:
    """tcp:// needs CURVE: keys from FLOWCEPT_DAEMON_CURVE_DIR (written by the daemon's --tcp-port)."""
    if not address.startswith("tcp://"):
        return
    directory = os.environ.get("FLOWCEPT_DAEMON_CURVE_DIR")
    if not directory:
        raise ValueError("a tcp:// daemon address needs FLOWCEPT_DAEMON_CURVE_DIR (CURVE keys); "
                         "use ipc:// on the node")
    from flowcept.job_registry import client_keys

    server_public, public, secret = client_keys(directory)
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


class DaemonLink:
    """Transport that streams batches to the node daemon and falls back to per-process files."""

    def __init__(self, address: str, fallback: Any = None, settings: Any = None,
                 ack_timeout_s: Optional[float] = None, max_message_bytes: Optional[int] = None):
        import zmq

        if not (address.startswith("ipc://") or address.startswith("tcp://")):
            raise ValueError(f"daemon address must be ipc:// or tcp://, got '{address}'")
        self.address = address
        self.fallback = fallback
        self.ack_timeout_s = float(ack_timeout_s if ack_timeout_s is not None
                                   else _setting(settings, "daemon.ack_timeout_s", 5.0))
        limit = int(max_message_bytes if max_message_bytes is not None
                    else _setting(settings, "daemon.max_message_bytes", 64 * 1024 * 1024))
        self.max_payload_bytes = max(1024, limit - 1024)  # room for the header
        self.pid = os.getpid()
        self._zmq = zmq
        self._context = zmq.Context()
        self._socket = self._new_socket()
        self._lock = threading.RLock()
        self._unacked: OrderedDict[int, Tuple[Optional[str], bytes, int, float]] = OrderedDict()
        self._seq = 0
        self._unacked_bytes = 0
        self.max_unacked_bytes = _MAX_UNACKED_BYTES
        self._registered = False
        self._workflows: List[Optional[str]] = []
        self._down_since: Optional[float] = None
        self._probe_sent = 0.0
        self._closed = False
        self._ever_connected = False
        self.records_acked = 0
        self.records_spilled = 0
        self.records_sent = 0
        self.batches_nacked = 0
        self.base_path = getattr(fallback, "base_path", None) or _setting(
            settings, "project.dump_buffer.path", "flowcept_buffer.jsonl")

    def _new_socket(self) -> Any:
        zmq = self._zmq
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, _LINGER_MS)
        socket.setsockopt(zmq.SNDHWM, _SNDHWM)
        socket.setsockopt(zmq.RCVHWM, 10 * _SNDHWM)
        socket.setsockopt(zmq.IMMEDIATE, 1)  # no queueing toward a daemon that is not connected
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        _curve_setup(socket, self.address)
        socket.connect(self.address)
        return socket

    # -- counters the pipeline reads -------------------------------------------------------------
    @property
    def records_written(self) -> int:
        return self.records_acked + getattr(self.fallback, "records_written", 0)

    @property
    def records_failed(self) -> int:
        return getattr(self.fallback, "records_failed", 0)

    @property
    def records_dropped(self) -> int:
        dropped = getattr(self.fallback, "records_dropped", 0)
        return dropped + (0 if self.fallback is not None else self.records_spilled)

    @property
    def connected(self) -> bool:
        return self._down_since is None

    # -- transport interface ---------------------------------------------------------------------
    def send(self, workflow_id: Optional[str], payload: bytes, count: int) -> None:
        """Hand one batch to the daemon, or to the file when the daemon cannot take it now."""
        with self._lock:
            if self._closed or os.getpid() != self.pid:
                self._spill(workflow_id, payload, count)
                return
            try:
                self._pump()
                now = time.monotonic()
                self._check_timeouts(now)
                if self._down_since is not None and not self._maybe_recovered(now):
                    self._spill(workflow_id, payload, count)
                    return
                if not self._writable():
                    self._mark_down("not connected, or not keeping up")
                    self._spill(workflow_id, payload, count)
                    return
                if not self._registered or workflow_id not in self._workflows:
                    self._register(workflow_id)
                pieces = protocol.split_payload(payload, self.max_payload_bytes)
                for piece in pieces:
                    n = count if len(pieces) == 1 else piece.count(b"\n")
                    if len(piece) > self.max_payload_bytes or not self._send_batch(workflow_id, piece, n, now):
                        self._spill(workflow_id, piece, n)
            except Exception:  # never into the flusher: the file takes it
                logger.exception("daemon link failed; writing batch to the per-process file")
                self._spill(workflow_id, payload, count)

    def flush(self, durable: bool = False) -> None:
        """Collect acknowledgements; durable: wait (bounded) until the daemon has every batch."""
        with self._lock:
            try:
                if durable:
                    self._wait_acks(self.ack_timeout_s)
                else:
                    self._pump()
                    self._check_timeouts(time.monotonic())
            except Exception:
                logger.exception("daemon link flush failed")
                self._spill_unacked("error")
            if self.fallback is not None:
                self.fallback.flush(durable=durable)

    def close_workflow(self, workflow_id: Optional[str]) -> None:
        """The run ended here: make sure the daemon has its batches, then close the spill file."""
        with self._lock:
            try:
                self._wait_acks(self.ack_timeout_s)
            except Exception:
                logger.exception("daemon link failed while closing workflow %s", workflow_id)
                self._spill_unacked("error")
            if self.fallback is not None:
                self.fallback.close_workflow(workflow_id)

    def close(self) -> None:
        """Wait for outstanding acknowledgements (bounded), say goodbye, close; idempotent."""
        with self._lock:
            if self._closed:
                return
            if os.getpid() != self.pid:
                self.abandon()
                return
            try:
                self._wait_acks(self.ack_timeout_s)
            except Exception:
                logger.exception("daemon link failed at close")
                self._spill_unacked("error")
            self._closed = True
            try:
                if self._registered and self._down_since is None:
                    self._socket.send_multipart(protocol.encode_bye(pid=self.pid), self._zmq.NOBLOCK)
            except Exception:
                pass
            try:
                self._socket.close(linger=_LINGER_MS)
                self._context.term()
            except Exception:
                logger.debug("closing the daemon socket failed", exc_info=True)
            if self.fallback is not None:
                self.fallback.close()

    def abandon(self) -> None:
        """In a forked child: forget the parent's socket and unacknowledged batches."""
        self._closed = True
        self._unacked = OrderedDict()
        self._unacked_bytes = 0
        self._socket = None
        self._context = None
        abandon = getattr(self.fallback, "abandon", None)
        if abandon is not None:
            abandon()

    # -- internals (called with the lock held) ------------------------------------------------------
    def _writable(self) -> bool:
        """Room toward a connected daemon? Flow control: wait while the daemon keeps acknowledging.

        The first call allows up to a second for the connection; later, a full window (high-water
        mark or ``max_unacked_bytes``) waits for acknowledgements, but gives up after
        ``_STALL_S`` without any (dead or stuck daemon): the caller then spills to the file.
        """
        socket, zmq = self._socket, self._zmq
        if not self._ever_connected:
            if socket.poll(int(min(1.0, self.ack_timeout_s) * 1000), zmq.POLLOUT):
                self._ever_connected = True
                return True
            return False
        deadline = time.monotonic() + self.ack_timeout_s
        stalled_at = time.monotonic() + _STALL_S
        while True:
            if self._unacked_bytes <= self.max_unacked_bytes and socket.poll(0, zmq.POLLOUT):
                return True
            acked = self.records_acked
            if socket.poll(20, zmq.POLLIN):
                self._pump()
            now = time.monotonic()
            if self.records_acked != acked:
                stalled_at = now + _STALL_S
            if now >= deadline or now >= stalled_at:
                return False

    def _register(self, workflow_id: Optional[str]) -> None:
        from flowcept.placement import current_placement

        if workflow_id not in self._workflows:
            self._workflows.append(workflow_id)
        placement = current_placement()
        info = {
            "host": placement.hostname, "pid": os.getpid(), "rank": placement.rank,
            "local_rank": placement.local_rank, "node": placement.node_name, "job": placement.job_id,
            "step": placement.step_id, "base": os.path.abspath(self.base_path), "w": self._workflows,
        }
        self._socket.send_multipart(protocol.encode_hello(info), self._zmq.NOBLOCK)
        self._registered = True

    def _send_batch(self, workflow_id: Optional[str], payload: bytes, count: int, now: float) -> bool:
        self._seq += 1
        seq = self._seq
        try:
            self._socket.send_multipart(protocol.encode_batch(seq, workflow_id, payload, count),
                                        self._zmq.NOBLOCK, copy=len(payload) < 65536)
        except self._zmq.Again:
            self._mark_down("the daemon is not connected or not keeping up")
            return False
        self._unacked[seq] = (workflow_id, payload, count, now)
        self._unacked_bytes += len(payload)
        self.records_sent += count
        return True

    def _pump(self) -> None:
        """Read every reply waiting on the socket (never blocks)."""
        socket, zmq = self._socket, self._zmq
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames)

    def _handle(self, frames: List[bytes]) -> None:
        try:
            message = protocol.decode(frames, 1 << 30, kinds=protocol.DAEMON_KINDS)
        except protocol.ProtocolError as error:
            logger.warning("ignoring a reply from the daemon: %s", error)
            return
        header = message.header
        if message.kind == "ack":
            upto = header.get("s", 0)
            unacked = self._unacked
            while unacked:
                seq = next(iter(unacked))
                if seq > upto:
                    break
                entry = unacked.pop(seq)
                self.records_acked += entry[2]
                self._unacked_bytes -= len(entry[1])
        elif message.kind == "nack":
            entry = self._unacked.pop(header.get("s"), None)
            self.batches_nacked += 1
            if header.get("r") == "unregistered":
                self._registered = False
            if entry is not None:
                self._unacked_bytes -= len(entry[1])
                logger.debug("daemon refused batch %s (%s); spilling it", header.get("s"), header.get("r"))
                self._spill(entry[0], entry[1], entry[2])
        elif message.kind == "pong" and self._down_since is not None:
            logger.warning("node daemon at %s answers again; sending batches to it", self.address)
            self._down_since = None
            self._registered = False

    def _check_timeouts(self, now: float) -> None:
        if self._unacked:
            oldest = next(iter(self._unacked.values()))[3]
            if now - oldest > self.ack_timeout_s:
                self._mark_down(f"no acknowledgement within {self.ack_timeout_s}s")

    def _maybe_recovered(self, now: float) -> bool:
        if now - self._probe_sent > _REPROBE_S:
            self._probe_sent = now
            try:
                self._socket.send_multipart(protocol.encode_ping(), self._zmq.NOBLOCK)
            except self._zmq.Again:
                pass
        return self._down_since is None

    def _mark_down(self, why: str) -> None:
        if self._down_since is None:
            logger.warning("node daemon at %s unusable (%s); writing records to the per-process file",
                           self.address, why)
            self._down_since = time.monotonic()
            self._probe_sent = self._down_since
        self._spill_unacked(why)

    def _wait_acks(self, timeout: float) -> None:
        if not self._unacked or self._socket is None:
            return
        socket = self._socket
        deadline = time.monotonic() + timeout
        while self._unacked:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._mark_down(f"no acknowledgement within {timeout}s")
                return
            if socket.poll(int(min(remaining, 0.5) * 1000) + 1):
                self._pump()

    def _spill_unacked(self, why: str) -> None:
        unacked, self._unacked = self._unacked, OrderedDict()
        self._unacked_bytes = 0
        if unacked:
            logger.info("spilling %d unacknowledged batches (%s)", len(unacked), why)
        for workflow_id, payload, count, _ in unacked.values():
            self._spill(workflow_id, payload, count)

    def _spill(self, workflow_id: Optional[str], payload: bytes, count: int) -> None:
        self.records_spilled += count
        if self.fallback is not None:
            self.fallback.send(workflow_id, payload, count)

    def counters(self) -> Dict[str, int]:
        return {"sent": self.records_sent, "acked": self.records_acked, "spilled": self.records_spilled,
                "unacked_batches": len(self._unacked)}


def ping(address: str, timeout_s: float = 2.0) -> bool:
    """True when a node daemon answers at ``address`` within ``timeout_s``."""
    reply = request(address, protocol.encode_ping(1), timeout_s)
    return reply is not None and reply.kind == "pong"


def request(address: str, frames: List[bytes], timeout_s: float = 2.0) -> Optional[protocol.Message]:
    """Send one request on a fresh socket and return the daemon's reply (None on timeout)."""
    if address.startswith("ipc://") and not os.path.exists(address[len("ipc://"):]):
        return None
    import zmq

    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    try:
        socket.setsockopt(zmq.LINGER, 0)
        _curve_setup(socket, address)
        socket.connect(address)
        socket.send_multipart(frames)
        if not socket.poll(int(timeout_s * 1000)):
            return None
        return protocol.decode(socket.recv_multipart(), 1 << 30, kinds=protocol.DAEMON_KINDS)
    except (zmq.ZMQError, protocol.ProtocolError, OSError):
        return None
    finally:
        socket.close(linger=0)
        context.term()


def daemon_status(address: str, timeout_s: float = 2.0) -> Optional[Dict[str, Any]]:
    """The daemon's status dict (what ``flowcept daemon status --json`` prints), or None."""
    reply = request(address, protocol.encode_status_request(), timeout_s)
    if reply is None or reply.kind != "status" or not reply.payload:
        return None
    return orjson.loads(reply.payload)
