"""How the ranks of a job agree on ids and wait for each other, with or without MPI.

Flowcept is a guest in MPI: it uses mpi4py only when the application already imported it and
initialised MPI, and never calls Init or Finalize. Without MPI but with several ranks (e.g.
``srun python app.py``) ids derive from the job and step ids, so every rank agrees without
talking; such a run is consolidated by the launcher's rank 0 or by ``flowcept consolidate``.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from typing import Any, Dict, List, Optional

from flowcept.placement import Placement, current_placement

logger = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("6f0c6a52-7d55-4b8e-9d0e-5f1c2a7b9e11")


def _job_scope() -> str:
    """What tells apart two jobs of the same id: the cluster, and the job's start when known.

    Job ids repeat across clusters sharing one database, and on one cluster after its controller
    state is reset; every rank of one job sees the same values. Empty outside Slurm (the seed is
    then what it always was).
    """
    cluster = os.environ.get("SLURM_CLUSTER_NAME", "")
    started = os.environ.get("SLURM_JOB_START_TIME", "")
    return f"{cluster}@{started}/" if cluster or started else ""


class Coordinator:
    """No communication: a single process, or ranks that agree through the environment."""

    kind = "local"

    def __init__(self, placement: Optional[Placement] = None):
        self.placement = placement or current_placement()
        self.rank = self.placement.rank or 0
        self.size = self.placement.world_size or 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def can_synchronise(self) -> bool:
        """True when stop() can wait for every rank (so rank 0 may consolidate)."""
        return self.size == 1

    def agree(self, ids: Dict[str, Optional[str]], name: Optional[str]) -> Dict[str, str]:
        """Fill missing ids so that every rank of the job gets the same values."""
        out: Dict[str, str] = {}
        job = self.placement.job_id
        derive = self.size > 1 and job is not None
        for key, value in ids.items():
            if value:
                out[key] = str(value)
            elif derive:
                seed = f"{_job_scope()}{job}.{self.placement.step_id}.{name or ''}.{key}"
                out[key] = str(uuid.uuid5(_NAMESPACE, seed))
            else:
                out[key] = str(uuid.uuid4())
        return out

    def barrier(self, timeout_s: float = 60.0) -> bool:
        return True

    def gather_hosts(self) -> List[str]:
        return [self.placement.hostname]


def mpi_comm_if_initialised(comm: Any = None) -> Any:
    """COMM_WORLD (or ``comm``) when the application initialised MPI through mpi4py, else None."""
    if comm is not None:
        return comm
    if "mpi4py" not in sys.modules and "mpi4py.MPI" not in sys.modules:
        return None
    try:
        from mpi4py import MPI
    except Exception:
        return None
    try:
        if MPI.Is_initialized() and not MPI.Is_finalized():
            return MPI.COMM_WORLD
    except Exception:
        return None
    return None


def get_coordinator(comm: Any = None) -> Coordinator:
    """The MPI coordinator when MPI is up in this process, else the local one."""
    if os.environ.get("FLOWCEPT_MPI", "").lower() in ("0", "false", "off"):
        return Coordinator()
    mpi_comm = mpi_comm_if_initialised(comm)
    if mpi_comm is not None:
        try:
            from flowcept.mpi_coordination import MPICoordinator

            return MPICoordinator(mpi_comm)
        except ImportError:
            logger.debug("MPI coordination unavailable; using environment-derived ids")
    return Coordinator()
