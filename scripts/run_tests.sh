#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian/Ubuntu machine, then run it.
# Installs: Open MPI (mpirun + mpi4py), Slurm + munge (a one-node cluster started by
# scripts/slurm-up.sh; tests/cluster/rig.py builds a 4-node one in network namespaces), poppler-utils (PDF checks), a MongoDB-wire-compatible server from PyPI,
# and this package with its test extras. Safe to run twice. Usage: bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

need_apt=""
command -v mpirun >/dev/null || need_apt="$need_apt openmpi-bin libopenmpi-dev"
command -v srun >/dev/null || need_apt="$need_apt slurm-wlm munge"
command -v pdftoppm >/dev/null || need_apt="$need_apt poppler-utils"
command -v ip >/dev/null || need_apt="$need_apt iproute2"          # the namespace cluster rig
command -v nsenter >/dev/null || need_apt="$need_apt util-linux"
if [ -n "$need_apt" ] && command -v apt-get >/dev/null; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq $need_apt >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e ".[test,mpi]" secantusdb

if [ -x scripts/slurm-up.sh ] && command -v slurmctld >/dev/null; then
  bash scripts/slurm-up.sh || echo "Slurm did not start; Slurm tests will be skipped"
fi

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_oob_tcp_if_include=lo OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_btl=self,vader
exec python3 -m pytest -q "$@"
