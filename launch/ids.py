"""Ids every rank of a launch agrees on without talking to the others.

Under Slurm the job and step ids name the launch; under ``mpirun``/``mpiexec`` without Slurm the
launcher's own job identifier (Open MPI/PMIx namespace, Hydra's PMI port) does; alone, a fresh
uuid4. The derivation itself is :meth:`flowcept.coordination.Coordinator.agree` (uuid5 of job,
step and workflow name), so the launcher and a library run in the same job derive alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Dict, Mapping, Optional

from flowcept.coordination import Coordinator
from flowcept.placement import Placement

# Variables naming one mpirun/mpiexec invocation, in order of preference.
_MPI_JOB_VARS = ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_ess_jobid", "PMI_KVSNAME",
                 "PMI_PORT", "PALS_APID", "FLUX_JOB_ID")
ID_KEYS = ("workflow_id", "campaign_id", "bundle_exec_id")
_ENV_OF = {"workflow_id": "FLOWCEPT_WORKFLOW_ID", "campaign_id": "FLOWCEPT_CAMPAIGN_ID",
           "bundle_exec_id": "FLOWCEPT_BUNDLE_EXEC_ID"}


def launch_key(placement: Placement, env: Mapping[str, str]) -> Optional[str]:
    """A string naming this launch, identical on every rank; None when running alone."""
    if placement.job_id is not None:
        return f"{placement.job_id}.{placement.step_id}"
    if (placement.world_size or 1) <= 1:
        return None
    for name in _MPI_JOB_VARS:
        value = env.get(name)
        if value:
            return "mpi-" + hashlib.sha1(f"{name}={value}".encode()).hexdigest()[:16]
    # Last resort on one node: the ranks share their parent (mpirun or its daemon).
    return f"ppid-{placement.hostname}-{os.getppid()}"


def agree_ids(placement: Placement, env: Mapping[str, str], workflow_name: Optional[str]) -> Dict[str, str]:
    """workflow, campaign and bundle ids: given ones (FLOWCEPT_*_ID) win, the rest derived."""
    given = {key: env.get(_ENV_OF[key]) or None for key in ID_KEYS}
    key = launch_key(placement, env)
    if key is not None and placement.job_id is None:
        placement = dataclasses.replace(placement, job_id=key, step_id=None)
    if key is not None and (placement.world_size or 1) <= 1:
        # A one-rank job step is still a launch other processes of the step may join.
        placement = dataclasses.replace(placement, world_size=2)
    return Coordinator(placement).agree(given, workflow_name or "flowcept-launch")
