# shellcheck shell=bash
# Source this file (do not execute it): `source scripts/env.sh`.
#
# Activates the project venv created by scripts/setup.sh and exports the
# environment that every mpirun / horovodrun on this machine needs:
# running as root inside a small (2-core) container, single host, no
# InfiniBand / UCX hardware.  Every variable uses ${VAR:-default} so a caller
# can still override it.

_HNUQ_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -f "$_HNUQ_REPO/.venv/bin/activate" ]]; then
    echo "env.sh: $_HNUQ_REPO/.venv is missing; run 'bash scripts/setup.sh' first" >&2
    return 1 2>/dev/null || exit 1
fi
# shellcheck disable=SC1091
source "$_HNUQ_REPO/.venv/bin/activate"

# --- Open MPI -----------------------------------------------------------------
# We run as root here (containers, CI): Open MPI refuses that unless told.
# (horovodrun forwards these to mpirun too; no --allow-run-as-root needed.)
export OMPI_ALLOW_RUN_AS_ROOT="${OMPI_ALLOW_RUN_AS_ROOT:-1}"
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}"
# Allow more ranks than cores (e.g. -np 4 on 2 cores) and do not pin ranks to
# cores (binding + oversubscription makes ranks fight over one core).
export OMPI_MCA_rmaps_base_oversubscribe="${OMPI_MCA_rmaps_base_oversubscribe:-1}"
export OMPI_MCA_hwloc_base_binding_policy="${OMPI_MCA_hwloc_base_binding_policy:-none}"
# Single host: shared memory (vader) + loopback TCP.  Only the ob1 PML: this
# avoids UCX/OFI/openib probing and the warnings they print in containers.
export OMPI_MCA_pml="${OMPI_MCA_pml:-ob1}"
export OMPI_MCA_btl="${OMPI_MCA_btl:-self,vader,tcp}"
export OMPI_MCA_osc="${OMPI_MCA_osc:-^ucx}"
export OMPI_MCA_mtl="${OMPI_MCA_mtl:-^ofi,psm,psm2}"
# Containers usually forbid the ptrace-based single-copy (CMA) of vader.
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"
# Keep all MPI traffic on loopback (no other network here anyway).
export OMPI_MCA_btl_tcp_if_include="${OMPI_MCA_btl_tcp_if_include:-lo}"
export OMPI_MCA_oob_tcp_if_include="${OMPI_MCA_oob_tcp_if_include:-lo}"
# PMIx: avoid the shared-memory dstore ("PMIX ERROR ... gds") in containers.
export PMIX_MCA_gds="${PMIX_MCA_gds:-hash}"

# --- Horovod ------------------------------------------------------------------
# Gloo controller (horovodrun --gloo) also on loopback.
export HOROVOD_GLOO_IFACE="${HOROVOD_GLOO_IFACE:-lo}"

# --- Frameworks ---------------------------------------------------------------
export TF_USE_LEGACY_KERAS="${TF_USE_LEGACY_KERAS:-1}"   # horovod.tensorflow.keras needs Keras 2 (tf_keras)
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" # silence TF info/warning spam
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"          # interleaved rank output appears promptly
# Up to 4 ranks share 2 cores: one compute thread per rank avoids massive
# thread oversubscription (torch/TF/OpenBLAS would each start nproc threads).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TF_NUM_INTRAOP_THREADS="${TF_NUM_INTRAOP_THREADS:-1}"
export TF_NUM_INTEROP_THREADS="${TF_NUM_INTEROP_THREADS:-1}"

unset _HNUQ_REPO
