#!/usr/bin/env bash
# Set up everything horovod_nuq needs on a Debian 12 machine (CPU only):
#
#   1. apt: Open MPI + build tools (skipped when already installed)
#   2. a venv at <repo>/.venv
#   3. pinned Python deps: torch 2.13.0 (CPU), tensorflow-cpu 2.21.0, ...
#   4. this repo installed editable
#   5. Horovod 0.28.1 built from the PyPI sdist by `python -m horovod_nuq.install_horovod`
#      (the same command users run after `pip install horovod-nuq`): it applies the
#      patches these torch / TensorFlow versions need, caches the built wheel in
#      ${HOROVOD_NUQ_CACHE:-$HOME/.cache/horovod-nuq}/wheels/<key>, installs it and
#      prints `horovodrun --check-build`, which must show TensorFlow, PyTorch, MPI, Gloo
#   6. the fused CPU kernels compiled
#
# Idempotent: a warm run (everything already in place) takes seconds.
# Use it as:  bash scripts/setup.sh && source scripts/env.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"

TORCH_VERSION=2.13.0      # CPU wheel; pip finds it in /opt/wheels (pip's find-links)
TF_VERSION=2.21.0

log() { printf '\n==> [setup] %s\n' "$*"; }

# ---------------------------------------------------------------------------
# 1. System packages
# ---------------------------------------------------------------------------
APT_PACKAGES=(openmpi-bin libopenmpi-dev cmake g++ make iproute2)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    log "apt packages already installed (${APT_PACKAGES[*]})"
fi

# ---------------------------------------------------------------------------
# 2. Virtual environment (Python 3.11: the torch wheel on disk is cp311)
# ---------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    BASE_PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    log "creating venv $VENV with $BASE_PY"
    "$BASE_PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
# Silence pip's "Location 'file:///opt/pypi-more/simple/...' is ignored" noise.
# (pipefail makes a pip failure fail the pipeline, hence the script.)
pip_quiet() { "${PIP[@]}" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

# ---------------------------------------------------------------------------
# 3. Pinned Python dependencies
# ---------------------------------------------------------------------------
# numpy 2.4.x satisfies tensorflow 2.21 (numpy>=1.26) and torch 2.13.
# setuptools/wheel/packaging/cffi: needed to build Horovod without isolation.
# build: scripts/test_wheel.sh builds this package's sdist and wheel with it.
# cloudpickle/psutil/pyyaml/packaging: Horovod's runtime deps (we install its
# wheel with --no-deps).
PINS=(
    "torch==${TORCH_VERSION}"
    "tensorflow-cpu==${TF_VERSION}"
    "numpy==2.4.6"
    "mpi4py==4.1.2"
    "scipy==1.17.1"
    "scikit-learn==1.9.1"
    "matplotlib==3.11.2"
    "pytest==9.2.0"
    "ruff==0.17.6"
    "cloudpickle==3.1.2"
    "psutil==7.2.2"
    "pyyaml==6.0.3"
    "packaging==26.3"
    "cffi==2.1.1"
    "setuptools==84.2.1"
    "wheel==0.48.0"
    "build==1.6.1"
)
# tf_keras depends on the `tensorflow` wheel, which would be installed on top
# of tensorflow-cpu's files (same package dir, CUDA-enabled build that prints
# "Could not find cuda drivers" on every import).  Install it without deps.
NODEPS_PINS=("tf_keras==${TF_VERSION}")

deps_key="$(printf '%s\n' "${PINS[@]}" "--" "${NODEPS_PINS[@]}" | sha256sum | cut -c1-16)"
deps_marker="$VENV/.horovod-nuq-deps-$deps_key"
if [[ -f "$deps_marker" ]]; then
    log "python deps already installed (key $deps_key)"
else
    log "pip install ${PINS[*]} (+ --no-deps ${NODEPS_PINS[*]})"
    pip_quiet install -q "${PINS[@]}"
    pip_quiet install -q --no-deps "${NODEPS_PINS[@]}"
    rm -f "$VENV"/.horovod-nuq-deps-* "$VENV"/.horovod-nuq-check-*  # new deps: check Horovod again
    touch "$deps_marker"
fi

# ---------------------------------------------------------------------------
# 4. This repo, editable (it provides the Horovod build command used next)
# ---------------------------------------------------------------------------
# The marker is keyed on pyproject.toml's content so a change to it reinstalls.
self_key="$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)"
self_marker="$VENV/.horovod-nuq-self-$self_key"
if [[ -f "$self_marker" ]] && "$PY" -c 'import horovod_nuq.install_horovod' 2>/dev/null; then
    log "horovod_nuq already installed editable"
else
    log "pip install -e $REPO"
    pip_quiet install -q --no-deps --no-build-isolation -e "$REPO"
    rm -f "$VENV"/.horovod-nuq-self-*
    touch "$self_marker"
fi

# ---------------------------------------------------------------------------
# 5. Horovod from source, patched for these frameworks, cached as a wheel
# ---------------------------------------------------------------------------
# python -m horovod_nuq.install_horovod --dry-run shows the detected versions, the patches
# and the cache key. A warm run (wheel cached, installed, check table kept in the venv)
# takes seconds; a cold build ~5 min on 2 cores. HOROVOD_NUQ_FULL_CHECK=1 forces the real
# `horovodrun --check-build` (~20 s) instead of the cached table + a quick import check.
# --no-deps: Horovod's runtime deps are pinned above.
log "python -m horovod_nuq.install_horovod"
check_out="$(mktemp)"
trap 'rm -f "$check_out"' EXIT
"$PY" -m horovod_nuq.install_horovod --no-deps | tee "$check_out"
for want in TensorFlow PyTorch MPI Gloo; do
    if ! grep -q "\[X\] $want" "$check_out"; then
        echo "ERROR: Horovod was built without $want support" >&2
        rm -f "$VENV"/.horovod-nuq-check-*
        exit 1
    fi
done

# ---------------------------------------------------------------------------
# 6. The fused CPU kernels: compile now (cached per source and CPU), not at the first step
# ---------------------------------------------------------------------------
"$PY" -c 'import horovod_nuq.kernels as k; lib = k.load(); print("fused CPU kernels:", "ready" if lib else "unavailable (generic codec)")'

log "done. Now:  source scripts/env.sh"
if [[ $(id -u) -eq 0 ]]; then
    echo "    (running as root: env.sh exports OMPI_ALLOW_RUN_AS_ROOT=1 and"
    echo "     OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, which mpirun and horovodrun need)"
fi
