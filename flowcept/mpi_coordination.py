"""Coordination of the ranks of an MPI application that initialised MPI itself (mpi4py).

Imported only by ``get_coordinator`` once the application has imported mpi4py and MPI is
initialised; Flowcept never calls Init or Finalize. Rank 0 makes the ids and broadcasts them
(one collective in ``agree``, which also gathers the node names so the workflow record can
list them without a second collective on the root alone). Barriers are non-blocking
(``Ibarrier`` polled with ``Test`` until a deadline), so a rank that died or never reaches
``stop()`` costs the others ``timeout_s`` at most, never a hang; after one such timeout the
coordinator is *degraded* and later barriers return False at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

from flowcept.coordination import Coordinator
from flowcept.ids import new_uuid
from flowcept.placement import Placement

logger = logging.getLogger(__name__)

# Polling of a pending barrier: start fast (a barrier that is about to complete costs well
# under a millisecond), back off to a short nap so waiting ranks leave the cores to the others.
_FIRST_NAP_S = 0.0001
_MAX_NAP_S = 0.002


class MPICoordinator(Coordinator):
    """Ranks of one communicator: ids from rank 0, bounded barriers, hosts gathered once."""

    kind = "mpi"

    def __init__(self, comm: Any, placement: Optional[Placement] = None):
        super().__init__(placement)
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())
        self.degraded = False
        self._hosts: Optional[List[str]] = None

    @property
    def can_synchronise(self) -> bool:
        return True

    def agree(self, ids: Dict[str, Optional[str]], name: Optional[str]) -> Dict[str, str]:
        """Rank 0's ids (given or new) reach every rank; node names reach rank 0."""
        node = self.placement.node_name or self.placement.hostname
        mine: Optional[Dict[str, str]] = None
        if self.is_root:
            mine = {key: str(value) if value else new_uuid() for key, value in ids.items()}
        try:
            nodes = self.comm.gather(node, root=0)
            agreed: Dict[str, str] = self.comm.bcast(mine, root=0)
        except Exception as error:  # a broken communicator: fall back to the environment
            logger.error("MPI id agreement failed (%s); deriving ids from the environment", error)
            self.degraded = True
            return Coordinator(self.placement).agree(ids, name)
        if nodes is not None:
            self._hosts = list(dict.fromkeys(str(n) for n in nodes))
        for key, value in ids.items():
            if value and str(value) != agreed.get(key):
                logger.warning("rank %d asked for %s=%s but rank 0 chose %s; using rank 0's",
                               self.rank, key, value, agreed.get(key))
        return agreed

    def gather_hosts(self) -> List[str]:
        """Distinct node names in rank order (complete on rank 0 after ``agree``)."""
        return list(self._hosts) if self._hosts else [self.placement.node_name or self.placement.hostname]

    def barrier(self, timeout_s: float = 60.0) -> bool:
        """Wait for every rank, at most ``timeout_s``; False (and degraded) on timeout."""
        if self.degraded:
            return False
        try:
            request = self.comm.Ibarrier()
        except Exception as error:
            logger.error("MPI barrier unavailable (%s); not waiting for the other ranks", error)
            self.degraded = True
            return False
        deadline = time.monotonic() + max(0.0, timeout_s)
        nap = _FIRST_NAP_S
        while True:
            try:
                if request.Test():
                    return True
            except Exception as error:
                logger.error("MPI barrier failed (%s); not waiting for the other ranks", error)
                self.degraded = True
                return False
            if time.monotonic() >= deadline:
                break
            time.sleep(nap)
            nap = min(nap * 2, _MAX_NAP_S)
        # The request stays pending: cancelling a collective is not allowed, and freeing it
        # would be unsafe while MPI may still complete it. A late rank will match it.
        logger.warning("rank %d: not every rank reached the barrier within %.1f s; going on without "
                       "them (their records stay in their own files)", self.rank, timeout_s)
        self.degraded = True
        self._pending = request
        return False
