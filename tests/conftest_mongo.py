"""MongoDB fixtures, imported by the tests that need a server (``from conftest_mongo import *``).

The server is a real MongoDB-wire-compatible process on a free loopback port (see
``mongo_server.py``); each test gets its own database name, so tests share one server per module
without seeing each other's documents. ``FLOWCEPT_TEST_MONGO_URI`` uses an existing server.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Dict, Iterator

import pytest
from mongo_server import MongoServer, requires_server

__all__ = ["mongo_server", "mongo_env", "persistent_server", "requires_server"]


@pytest.fixture(scope="module")
def mongo_server() -> Iterator[str]:
    """The URI of a running server (in-memory storage), stopped after the module."""
    external = os.environ.get("FLOWCEPT_TEST_MONGO_URI")
    if external:
        yield external
        return
    server = MongoServer().start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def mongo_env(mongo_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Dict[str, str]:
    """MongoDB enabled through FLOWCEPT_* variables, with a fresh database and spool dir."""
    values = {
        "FLOWCEPT_DATABASES_MONGODB_ENABLED": "true",
        "FLOWCEPT_DATABASES_MONGODB_URI": mongo_server,
        "FLOWCEPT_DATABASES_MONGODB_DB": "fc_" + uuid.uuid4().hex[:12],
        "FLOWCEPT_DATABASES_MONGODB_SPOOL_DIR": str(tmp_path / "spool"),
        "FLOWCEPT_DATABASES_MONGODB_TIMEOUT_S": "2",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def persistent_server(tmp_path: Path) -> Iterator[MongoServer]:
    """A server of this test alone, with on-disk storage, that the test may stop and restart."""
    if os.environ.get("FLOWCEPT_TEST_MONGO_URI"):
        pytest.skip("stopping the server needs a server the tests start themselves")
    storage = tmp_path / "mongo-data"
    storage.mkdir()
    server = MongoServer(storage=str(storage)).start()
    try:
        yield server
    finally:
        server.stop()
