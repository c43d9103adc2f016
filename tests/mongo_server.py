"""Start a MongoDB-wire-compatible server on a free loopback port for the tests.

Real MongoDB cannot be installed from the package registries this project's CI reaches, so the
tests use ``secantusdb`` (``secantusd-py``, WiredTiger storage) or ``nx-27017``; pymongo talks to
either over a real TCP socket. ``FLOWCEPT_TEST_MONGO_URI`` points the tests at an existing server
(a real ``mongod``) instead. The server is a subprocess killed by pid in the fixture finaliser.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import List, Optional

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(port: int, storage: Optional[str], host: str = "127.0.0.1") -> Optional[List[str]]:
    """The command line of the first server binary found, or None when there is none."""
    if shutil.which("secantusd-py"):
        return ["secantusd-py", "--host", host, "--port", str(port),
                "--storage-path", storage or ":memory:"]
    if shutil.which("nx-27017"):
        return ["nx-27017", "--host", host, "--port", str(port),
                "--db", os.path.join(storage, "nx.db") if storage else "memory"]
    return None


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


class MongoServer:
    """One server process; ``stop()`` and ``start()`` again reuse the port and the storage."""

    def __init__(self, storage: Optional[str] = None, port: Optional[int] = None, host: str = "127.0.0.1"):
        """``host``: the address to listen on (loopback, or e.g. the cluster rig's bridge address)."""
        self.port = port or free_port()
        self.storage = storage
        self.host = host
        self.process: Optional[subprocess.Popen] = None
        self.uri = f"mongodb://{host}:{self.port}"
        self._log = None

    def start(self, timeout_s: float = 20.0) -> MongoServer:
        command = server_command(self.port, self.storage, self.host)
        if command is None:
            raise RuntimeError("no MongoDB-compatible server binary (pip install secantusdb)")
        log_path = os.path.join(self.storage or "/tmp", f"mongo-server-{self.port}.log")
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not _port_open(self.port, self.host):
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not open port {self.port} in {timeout_s} s")
            time.sleep(0.05)  # polling the port with a deadline, not synchronising on time
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server (SIGKILL past the deadline) and wait for its port to close."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None


def have_server() -> bool:
    return bool(os.environ.get("FLOWCEPT_TEST_MONGO_URI")) or server_command(0, None) is not None


requires_server = pytest.mark.skipif(not have_server(), reason="no MongoDB-compatible server "
                                     "(pip install secantusdb) and FLOWCEPT_TEST_MONGO_URI unset")
