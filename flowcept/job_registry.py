"""The job directory: CURVE keys per job step, and where each node's daemon of the step listens.

A node daemon's ``ipc://`` socket is reachable only on its own node. To show every node of a
running job (``flowcept daemon status --job``, ``flowcept top --job``) a client on any host talks
to each daemon over TCP, and TCP needs authentication: ZeroMQ CURVE, with keys made per job step
and kept where only the user can read them. The directory lives on a filesystem all nodes share
(``daemon.jobs_dir``, default ``~/.flowcept/jobs``: home directories are shared on clusters, node
``/tmp`` is not)::

    <jobs_dir>/<job id>/                  0700, the user's (checked: owner, no symlink)
        <step>/                           0700, one per job step (srun), removed at its end
            curve/server.key[_secret]     the step's daemons' key pair
            curve/client.key[_secret]     the key pair a status client must hold
            curve/authorized/client.key   what the daemons accept (ZAP location)
            nodes/<node>.json             {"node", "step", "address", "pid", "registered_at"}

Keys are created once per step, atomically (a private temp directory renamed into place), so the
first node to start wins and every other node uses the same keys. Steps never share keys, so a
step ending (and removing its directory) cannot pull keys from under another step.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket as socket_module
import stat
import time
from typing import Any, Dict, List, Optional, Tuple

import orjson

from flowcept import protocol
from flowcept.transport import safe_name

logger = logging.getLogger(__name__)

DEFAULT_JOBS_DIR = "~/.flowcept/jobs"


class JobKeysError(RuntimeError):
    """The job's keys are missing or unreadable; the message says which and what to do."""


def jobs_base(base: Optional[str] = None) -> str:
    """``base``, else ``daemon.jobs_dir`` (``FLOWCEPT_DAEMON_JOBS_DIR``), else ``~/.flowcept/jobs``."""
    if not base:
        try:
            from flowcept.settings import load_settings

            base = load_settings()["daemon.jobs_dir"]
        except Exception:  # settings unreadable: the default still works
            base = None
    return os.path.abspath(os.path.expanduser(base or DEFAULT_JOBS_DIR))


def job_dir(job_id: str, base: Optional[str] = None) -> str:
    """``<jobs base>/<job id>``; a job id is one path component."""
    if not job_id or "/" in job_id or job_id in (".", ".."):
        raise ValueError(f"not a job id: {job_id!r}")
    return os.path.join(jobs_base(base), job_id)


def curve_dir(directory: str) -> str:
    """Where a job directory keeps its CURVE keys."""
    return os.path.join(directory, "curve")


def step_dir(job_directory: str, step: str) -> str:
    """``<job dir>/<step>``: the keys and node entries of one job step."""
    return os.path.join(job_directory, safe_name(str(step)) or "0")


def _own_private_dir(path: str) -> None:
    """Create ``path`` (mode 0700) or accept it only as the user's own real directory.

    A job directory's name is predictable (the job id): another user who made it first must not
    end up owning, or reading, the keys. Existing parents are never chmod-ed.
    """
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise JobKeysError(f"{path} is not a directory (a symlink or a file): refusing to keep job keys there")
    if info.st_uid != os.getuid():
        raise JobKeysError(f"{path} belongs to uid {info.st_uid}, not to you: refusing to keep job keys there")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)


def ensure_keys(directory: str) -> str:
    """A step's key directory, creating the keys if no node has yet; returns ``<directory>/curve``."""
    _own_private_dir(os.path.dirname(directory))
    _own_private_dir(directory)
    return make_keys(directory)


def make_keys(directory: str) -> str:
    """``<directory>/curve``: server and client key pairs, the client's public key authorised.

    Made once, atomically (concurrent callers agree). ``directory`` must exist and be private
    already (a step directory, or a daemon's runtime directory).
    """
    import zmq.auth

    keys = curve_dir(directory)
    if os.path.exists(os.path.join(keys, "server.key_secret")):
        return keys
    staging = os.path.join(directory, f".curve-{socket_module.gethostname()}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for path in (staging, os.path.join(staging, "authorized")):
        os.mkdir(path, 0o700)
    zmq.auth.create_certificates(staging, "server")
    zmq.auth.create_certificates(staging, "client")
    shutil.copyfile(os.path.join(staging, "client.key"), os.path.join(staging, "authorized", "client.key"))
    for name in os.listdir(staging):
        path = os.path.join(staging, name)
        if os.path.isfile(path):
            os.chmod(path, 0o600)
    try:
        os.rename(staging, keys)  # atomic; fails when another node made the keys first
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.exists(os.path.join(keys, "server.key_secret")):
            raise
    return keys


def _load(keys: str, name: str) -> Tuple[bytes, Optional[bytes]]:
    import zmq.auth

    path = os.path.join(keys, name)
    try:
        return zmq.auth.load_certificate(path)
    except PermissionError:
        raise JobKeysError(f"cannot read the job's key {path}: permission denied (the keys of a job are "
                           f"readable only by the user who ran it)") from None
    except (OSError, ValueError) as error:
        raise JobKeysError(f"cannot read the job's key {path}: {error}") from None


def server_keys(keys: str) -> Tuple[bytes, bytes]:
    """(public, secret) of the job's daemons."""
    public, secret = _load(keys, "server.key_secret")
    return public, secret


def client_keys(keys: str) -> Tuple[bytes, bytes, bytes]:
    """(server public, client public, client secret): what a status client needs."""
    server_public, _ = _load(keys, "server.key")
    public, secret = _load(keys, "client.key_secret")
    return server_public, public, secret


def advertised_hosts() -> List[str]:
    """Addresses other hosts may reach this node at, most likely first.

    The host name's non-loopback addresses, then every other up interface's IPv4 address (a host
    name that resolves to 127.0.1.1, or to a network the login host cannot reach, is common), then
    the host name itself for the client's resolver.
    """
    name = socket_module.gethostname()
    found: List[str] = []
    try:
        found += [info[4][0] for info in socket_module.getaddrinfo(name, None, socket_module.AF_INET)]
    except OSError:
        pass
    try:
        import psutil

        stats = psutil.net_if_stats()
        for interface, addresses in psutil.net_if_addrs().items():
            if interface in stats and not stats[interface].isup:
                continue
            found += [a.address for a in addresses if a.family == socket_module.AF_INET]
    except Exception:  # psutil missing or the platform says no: the host name still works
        pass
    usable = [a for a in dict.fromkeys(found) if not a.startswith("127.")]
    return usable + [name]


def register_node(directory: str, node: str, step: str, address: str, pid: int,
                  addresses: Optional[List[str]] = None) -> str:
    """Announce a node daemon's TCP address(es) in its step directory; returns the entry's path."""
    nodes = os.path.join(directory, "nodes")
    _own_private_dir(directory)
    _own_private_dir(nodes)
    path = os.path.join(nodes, safe_name(node) + ".json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(orjson.dumps({"node": node, "step": step, "address": address,
                                   "addresses": addresses or [address], "pid": pid,
                                   "registered_at": time.time()}))
    os.replace(tmp, path)
    return path


def unregister_node(path: str) -> None:
    """Remove a daemon's entry at its exit (a crashed daemon's entry stays and answers 'no answer')."""
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_step(directory: str) -> None:
    """Remove a finished step's directory (keys, entries), then the job's if no step is left.

    Called by the launcher's global rank 0 at the end of its step, also when some node's daemon
    died without unregistering: its entry would otherwise stay forever.
    """
    shutil.rmtree(directory, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(directory))  # only when empty: another step may be running
    except OSError:
        pass


def list_steps(job_directory: str) -> List[str]:
    """The step directories of a job (raises the explanatory FileNotFoundError when there is none)."""
    if not os.path.isdir(job_directory):
        raise FileNotFoundError(f"no job directory {job_directory}: is the job running under flowcept-launch, "
                                f"and is daemon.jobs_dir the same here as in the job?")
    try:
        names = os.listdir(job_directory)
    except PermissionError:
        raise JobKeysError(f"cannot read the job directory {job_directory}: permission denied (a job's "
                           f"directory is readable only by the user who ran it)") from None
    return sorted(os.path.join(job_directory, name) for name in names
                  if not name.startswith(".") and os.path.isdir(os.path.join(job_directory, name)))


def list_nodes(directory: str) -> List[Dict[str, Any]]:
    """The registered daemons of one step directory, sorted by node."""
    nodes = os.path.join(directory, "nodes")
    out = []
    for name in sorted(os.listdir(nodes)) if os.path.isdir(nodes) else []:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(nodes, name), "rb") as handle:
                entry = orjson.loads(handle.read())
        except (OSError, orjson.JSONDecodeError):
            continue
        if isinstance(entry, dict) and entry.get("address"):
            out.append(entry)
    return sorted(out, key=lambda e: str(e.get("node")))


def remote_status(address: str, keys: Tuple[bytes, bytes, bytes], timeout_s: float = 2.0) -> Dict[str, Any]:
    """Ask one daemon for its status over CURVE: its status dict, or ``{"error": ...}``.

    A daemon that rejects the client's key answers the handshake with an error, which the socket
    monitor reports; that is told apart from a daemon that does not answer at all.
    """
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    server_public, public, secret = keys
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey = server_public
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.connect(address)
        sock.send_multipart(protocol.encode_status_request())
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(int(left * 1000) + 1))
            if monitor in ready:
                event = recv_monitor_message(monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    return {"address": address, "error": "refused: this client's key is not the job's"}
                if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return {"address": address, "error": "refused: CURVE handshake failed (wrong server key?)"}
            if sock in ready:
                reply = protocol.decode(sock.recv_multipart(), 1 << 30, kinds=protocol.DAEMON_KINDS)
                if reply.kind == "status" and reply.payload:
                    status = orjson.loads(reply.payload)
                    status["tcp_address"] = address
                    return status
                return {"address": address, "error": f"unexpected reply {reply.kind!r}"}
        return {"address": address, "error": "no answer"}
    except (zmq.ZMQError, protocol.ProtocolError, OSError) as error:
        return {"address": address, "error": f"failed: {error}"}
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        context.term()


def job_targets(job_id: str, base: Optional[str] = None) -> List[Tuple[Dict[str, Any], Tuple[bytes, bytes, bytes]]]:
    """Every registered daemon of every running step of a job, with its step's client keys.

    Reads only files: raises FileNotFoundError for an unknown job and JobKeysError for one the
    user cannot read; asks no daemon.
    """
    directory = job_dir(job_id, base)
    try:
        os.stat(directory)
    except PermissionError:
        raise JobKeysError(f"cannot reach the job directory {directory}: permission denied (a job's "
                           f"directory is readable only by the user who ran it)") from None
    except FileNotFoundError:
        pass  # list_steps says what that means
    targets: List[Tuple[Dict[str, Any], Tuple[bytes, bytes, bytes]]] = []
    for step in list_steps(directory):
        entries = list_nodes(step)
        if entries:
            keys = client_keys(curve_dir(step))  # an unreadable job says so plainly
            targets += [(entry, keys) for entry in entries]
    return targets


def job_statuses(job_id: str, base: Optional[str] = None, timeout_s: float = 2.0) -> List[Dict[str, Any]]:
    """The status of every registered daemon of every running step of a job, asked in parallel.

    Keys are read afresh on each call (a new step brings new keys); unreachable or refusing
    daemons become entries with an ``error``.
    """
    asks = job_targets(job_id, base)
    if not asks:
        return []
    from concurrent.futures import ThreadPoolExecutor

    def ask(item: Tuple[Dict[str, Any], Tuple[bytes, bytes, bytes]]) -> Dict[str, Any]:
        entry, keys = item
        candidates = [a for a in entry.get("addresses") or [] if isinstance(a, str)] or [entry["address"]]
        share = max(timeout_s / len(candidates), min(timeout_s, 0.5))
        for address in candidates:  # the first that answers, or says no, is the one
            status = remote_status(address, keys, share)
            if status.get("error") != "no answer":
                break
        status.setdefault("node", entry.get("node"))
        status["step"] = entry.get("step")
        return status

    with ThreadPoolExecutor(max_workers=min(32, len(asks))) as pool:
        return list(pool.map(ask, asks))
