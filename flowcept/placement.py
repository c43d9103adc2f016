"""Where this process runs: host, pid, global and local rank, node, job and step.

Read once per process from the environment the launcher left (Slurm, Open MPI, PMIx,
MPICH/Hydra, HPE PALS) and cached; a forked child re-reads its pid. ``detect(env)`` takes any
mapping so tests can feed a fake environment. ``FLOWCEPT_NODE_NAME`` (and the other
``FLOWCEPT_*`` placement variables set by flowcept-launch) override what the scheduler says, which
is also how tests simulate several nodes on one machine.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

# (variable, launcher) in order of preference, for each fact.
_RANK_VARS: Tuple[Tuple[str, str], ...] = (
    ("FLOWCEPT_RANK", "flowcept"),
    ("OMPI_COMM_WORLD_RANK", "openmpi"),
    ("PMI_RANK", "mpich"),
    ("PMIX_RANK", "pmix"),
    ("SLURM_PROCID", "slurm"),
    ("PALS_RANKID", "pals"),
    ("MV2_COMM_WORLD_RANK", "mvapich"),
)
_SIZE_VARS = ("FLOWCEPT_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "PALS_SIZE",
              "MV2_COMM_WORLD_SIZE")
_LOCAL_RANK_VARS = ("FLOWCEPT_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID",
                    "PALS_LOCAL_RANKID", "MV2_COMM_WORLD_LOCAL_RANK")
_LOCAL_SIZE_VARS = ("FLOWCEPT_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                    "SLURM_NTASKS_PER_NODE")
_NODE_ID_VARS = ("FLOWCEPT_NODE_ID", "SLURM_NODEID", "OMPI_COMM_WORLD_NODE_RANK")
_NODE_NAME_VARS = ("FLOWCEPT_NODE_NAME", "SLURMD_NODENAME")
_JOB_VARS = ("FLOWCEPT_JOB_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "FLUX_JOB_ID")
_STEP_VARS = ("FLOWCEPT_STEP_ID", "SLURM_STEP_ID")


def _first(env: Mapping[str, str], names) -> Optional[str]:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return value
    return None


def _int(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    try:
        return int(value.split("(")[0].split(",")[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class Placement:
    """Facts about this process; ``fields`` is what every task carries."""

    hostname: str
    pid: int
    node_name: str
    rank: Optional[int] = None
    world_size: Optional[int] = None
    local_rank: Optional[int] = None
    local_size: Optional[int] = None
    node_id: Optional[int] = None
    job_id: Optional[str] = None
    step_id: Optional[str] = None
    launcher: Optional[str] = None
    user: Optional[str] = None
    fields: Dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def is_multi_rank(self) -> bool:
        return (self.world_size or 1) > 1


def _login_name() -> Optional[str]:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return os.environ.get("USER")


def detect(env: Optional[Mapping[str, str]] = None, pid: Optional[int] = None) -> Placement:
    """Read the placement of this process from ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    hostname = env.get("FLOWCEPT_HOSTNAME") or socket.gethostname()
    rank_text, launcher = None, None
    for name, who in _RANK_VARS:
        if env.get(name) not in (None, ""):
            rank_text, launcher = env[name], who
            break
    rank = _int(rank_text)
    world_size = _int(_first(env, _SIZE_VARS))
    local_rank = _int(_first(env, _LOCAL_RANK_VARS))
    node_id = _int(_first(env, _NODE_ID_VARS))
    node_name = _first(env, _NODE_NAME_VARS) or hostname
    job_id = _first(env, _JOB_VARS)
    step_id = _first(env, _STEP_VARS)
    if job_id is None and env.get("PMIX_NAMESPACE", "").startswith("slurm.pmix."):
        parts = env["PMIX_NAMESPACE"].split(".")
        job_id = parts[2] if len(parts) > 2 else None
        step_id = step_id or (parts[3] if len(parts) > 3 else None)
    user = env.get("FLOWCEPT_USER") or _login_name()
    pid = os.getpid() if pid is None else pid
    fields = {
        "hostname": hostname,
        "node_name": node_name,
        "pid": pid,
        "rank": rank,
        "local_rank": local_rank,
        "job_id": job_id,
        "step_id": step_id,
        "login_name": user,
    }
    return Placement(
        hostname=hostname, pid=pid, node_name=node_name, rank=rank, world_size=world_size,
        local_rank=local_rank, local_size=_int(_first(env, _LOCAL_SIZE_VARS)), node_id=node_id,
        job_id=job_id, step_id=step_id, launcher=launcher, user=user, fields=fields,
    )


_cached: Optional[Placement] = None


def current_placement() -> Placement:
    """Return this process's placement, detected once and re-detected in a forked child."""
    global _cached
    if _cached is None or _cached.pid != os.getpid():
        _cached = detect()
    return _cached


def reset_placement() -> None:
    """Forget the cached placement (the environment changed, e.g. in tests)."""
    global _cached
    _cached = None
