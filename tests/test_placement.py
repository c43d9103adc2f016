"""Placement from fake launcher environments, fed to flowcept.placement.detect(env)."""

from __future__ import annotations

import os
import socket

from flowcept import Flowcept, FlowceptTask
from flowcept.placement import current_placement, detect


def test_plain_process():
    p = detect({})
    assert p.hostname == socket.gethostname() and p.pid == os.getpid()
    assert p.rank is None and p.world_size is None and p.job_id is None and not p.is_multi_rank
    assert p.fields["hostname"] == p.hostname and p.fields["pid"] == p.pid


def test_slurm_srun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURMD_NODENAME": "nid0002",
           "SLURM_TASKS_PER_NODE": "4(x2)", "PMIX_RANK": "5", "PMIX_NAMESPACE": "slurm.pmix.1234.0"}
    p = detect(env)
    assert (p.rank, p.world_size, p.local_rank, p.node_id) == (5, 8, 1, 2)
    assert (p.job_id, p.step_id, p.node_name) == ("1234", "0", "nid0002")
    assert p.is_multi_rank
    assert p.fields["rank"] == 5 and p.fields["job_id"] == "1234" and p.fields["node_name"] == "nid0002"


def test_pmix_namespace_only():
    p = detect({"PMIX_RANK": "3", "PMIX_NAMESPACE": "slurm.pmix.777.2"})
    assert p.rank == 3 and p.job_id == "777" and p.step_id == "2" and p.launcher == "pmix"


def test_open_mpi_mpirun():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1", "PMIX_RANK": "2",
           "PMIX_NAMESPACE": "prterun-host-1234@1"}
    p = detect(env)
    assert (p.rank, p.world_size, p.local_rank, p.local_size, p.node_id) == (2, 4, 0, 2, 1)
    assert p.launcher == "openmpi" and p.job_id is None


def test_mpich_hydra():
    p = detect({"PMI_RANK": "1", "PMI_SIZE": "3", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "3"})
    assert (p.rank, p.world_size, p.local_rank, p.local_size, p.launcher) == (1, 3, 1, 3, "mpich")


def test_flowcept_variables_override_and_garbage_is_ignored():
    p = detect({"FLOWCEPT_RANK": "9", "SLURM_PROCID": "1", "FLOWCEPT_NODE_NAME": "fake-node",
                "FLOWCEPT_HOSTNAME": "fake-host", "OMPI_COMM_WORLD_SIZE": "not-a-number"})
    assert p.rank == 9 and p.node_name == "fake-node" and p.hostname == "fake-host" and p.world_size is None


def test_tasks_carry_placement(monkeypatch):
    from flowcept.placement import reset_placement

    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "7")
    reset_placement()
    try:
        assert current_placement().job_id == "4242"
        with Flowcept() as fc:
            FlowceptTask(activity_id="placed", generated={"a": 1})
            records = fc.get_buffer()
        task = next(r for r in records if r.get("activity_id") == "placed")
        assert task["rank"] == 0 and task["local_rank"] == 0 and task["job_id"] == "4242"
        assert task["step_id"] == "7" and task["pid"] == os.getpid() and task["hostname"]
    finally:
        for name in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_STEP_ID"):
            monkeypatch.delenv(name, raising=False)
        reset_placement()
