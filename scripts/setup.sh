#!/usr/bin/env bash
# Set up everything horovod_nuq needs on a Debian 12 machine (CPU only):
#
#   1. apt: Open MPI + build tools (skipped when already installed)
#   2. a venv at <repo>/.venv
#   3. pinned Python deps: torch 2.13.0 (CPU), tensorflow-cpu 2.21.0, ...
#   4. Horovod 0.28.1 built from the PyPI sdist with small local patches so it
#      compiles against torch >= 2.1 and TensorFlow >= 2.18; the built wheel is
#      cached in ${HOROVOD_NUQ_CACHE:-$HOME/.cache/horovod-nuq}/wheels
#   5. this repo installed editable
#   6. `horovodrun --check-build` must show TensorFlow, PyTorch, MPI and Gloo
#
# Idempotent: a warm run (everything already in place) takes seconds.
# Use it as:  bash scripts/setup.sh && source scripts/env.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
CACHE="${HOROVOD_NUQ_CACHE:-$HOME/.cache/horovod-nuq}"

HOROVOD_VERSION=0.28.1
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
    rm -f "$VENV"/.horovod-nuq-deps-*
    touch "$deps_marker"
fi

# ---------------------------------------------------------------------------
# 4. Horovod from source, patched, cached as a wheel
# ---------------------------------------------------------------------------
# Patches for the Horovod 0.28.1 sdist.  Run inside the unpacked sdist.
# (The function body is part of the cache key: editing it rebuilds.)
patch_horovod() {
    # (a) torch >= 2.1 headers need C++17 ("C++17 or later compatible compiler
    #     is required").  Horovod 0.28.1 sets C++14 globally and again for
    #     its PyTorch extension.
    sed -i 's/^set(CMAKE_CXX_STANDARD 14)$/set(CMAKE_CXX_STANDARD 17)/' CMakeLists.txt
    sed -i 's/^\( *\)set(CMAKE_CXX_STANDARD 14)$/\1set(CMAKE_CXX_STANDARD 17)/' horovod/torch/CMakeLists.txt
    # (b) Bundled Gloo hard-codes -std=c++11.  Mixing it with the C++17 gloo
    #     copy Horovod makes for TF gives "multiple definition of
    #     gloo::rendezvous::Store::kDefaultTimeout" (a static constexpr member
    #     is an inline definition in C++17 but a strong one in C++11).
    sed -i 's/-std=c++11 -fPIC/-std=c++17 -fPIC/' third_party/gloo/CMakeLists.txt
    # (c) TensorFlow >= 2.18 wheels no longer ship highwayhash headers that
    #     xla_mpi_ops.cc includes; drop the XLA ops (not needed on CPU).
    sed -i '/xla_mpi_ops\.cc/d' horovod/tensorflow/CMakeLists.txt
    # (d) Build 'Release' (-O3) instead of 'RelWithDebInfo' (-O3 -g): same
    #     code, but a faster compile and a much smaller wheel.
    sed -i "s/else 'RelWithDebInfo'/else 'Release'/" setup.py
    # (e) Horovod's tf.keras frontend imports `keras.backend`, which is Keras 3
    #     beside TF >= 2.16, so its callbacks crash (MetricAverageCallback:
    #     "keras.backend has no attribute constant").  Use the backend of the
    #     Keras that tf.keras resolves to (tf_keras under TF_USE_LEGACY_KERAS=1).
    sed -i 's/^    from keras import backend as K$/    from tensorflow.keras import backend as K/' \
        horovod/tensorflow/keras/__init__.py horovod/tensorflow/keras/callbacks.py

    # Fail loudly if the sdist ever changes under us and a patch misses.
    grep -q '^set(CMAKE_CXX_STANDARD 17)$' CMakeLists.txt
    grep -q 'set(CMAKE_CXX_STANDARD 17)' horovod/torch/CMakeLists.txt
    ! grep -q 'set(CMAKE_CXX_STANDARD 14)' horovod/torch/CMakeLists.txt
    grep -q -- '-std=c++17 -fPIC' third_party/gloo/CMakeLists.txt
    ! grep -q 'xla_mpi_ops' horovod/tensorflow/CMakeLists.txt
    grep -q "else 'Release'" setup.py
    grep -q 'from tensorflow.keras import backend as K' horovod/tensorflow/keras/__init__.py
    grep -q 'from tensorflow.keras import backend as K' horovod/tensorflow/keras/callbacks.py
}

py_tag="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
patch_key="$(declare -f patch_horovod | sha256sum | cut -c1-8)"
wheel_key="horovod-${HOROVOD_VERSION}_torch-${TORCH_VERSION}_tf-${TF_VERSION}_${py_tag}_p${patch_key}"
wheel_dir="$CACHE/wheels/$wheel_key"
hvd_marker="$VENV/.horovod-nuq-hvd-$wheel_key"

find_wheel() { compgen -G "$wheel_dir/horovod-${HOROVOD_VERSION}-*.whl" | head -n1 || true; }

if [[ -f "$hvd_marker" ]]; then
    log "horovod already installed from $wheel_key"
else
    wheel="$(find_wheel)"
    if [[ -z "$wheel" ]]; then
        log "building Horovod ${HOROVOD_VERSION} (takes ~4 min on 2 cores)"
        build_root="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
        trap 'rm -rf "$build_root"' EXIT
        # The sdist itself is cached too.
        sdist_dir="$CACHE/sdist"
        mkdir -p "$sdist_dir"
        sdist="$sdist_dir/horovod-${HOROVOD_VERSION}.tar.gz"
        if [[ ! -f "$sdist" ]]; then
            pip_quiet download -q --no-deps --no-binary :all: "horovod==${HOROVOD_VERSION}" -d "$sdist_dir"
        fi
        tar -xzf "$sdist" -C "$build_root"
        (cd "$build_root/horovod-${HOROVOD_VERSION}" && patch_horovod)

        ncpu="$(nproc)"
        (
            cd "$build_root/horovod-${HOROVOD_VERSION}"
            export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
            export HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
            # Horovod's setup.py passes -j8 to make unless MAKEFLAGS is set.
            export MAKEFLAGS="-j${ncpu}" CMAKE_BUILD_PARALLEL_LEVEL="${ncpu}"
            export TF_CPP_MIN_LOG_LEVEL=2
            # Build against the venv's torch/TF (hence no build isolation).
            "${PIP[@]}" wheel -v --no-build-isolation --no-deps . -w "$build_root/dist" \
                > "$build_root/build.log" 2>&1 || {
                    echo "Horovod build failed; last lines of the log:" >&2
                    tail -n 60 "$build_root/build.log" >&2
                    exit 1
                }
        )
        mkdir -p "$wheel_dir"
        cp "$build_root"/dist/horovod-"${HOROVOD_VERSION}"-*.whl "$wheel_dir/"
        rm -rf "$build_root"
        trap - EXIT
        wheel="$(find_wheel)"
    else
        log "using cached Horovod wheel $wheel"
    fi
    log "installing $(basename "$wheel")"
    pip_quiet install -q --no-deps --force-reinstall "$wheel"
    rm -f "$VENV"/.horovod-nuq-hvd-*
    touch "$hvd_marker"
fi

# ---------------------------------------------------------------------------
# 5. This repo, editable
# ---------------------------------------------------------------------------
# The marker is keyed on setup.py's content so a change to it reinstalls.
self_key="$(sha256sum "$REPO/setup.py" | cut -c1-16)"
self_marker="$VENV/.horovod-nuq-self-$self_key"
if [[ -f "$self_marker" ]] && "$PY" -c 'import horovod_nuq' 2>/dev/null; then
    log "horovod_nuq already installed editable"
else
    log "pip install -e $REPO"
    pip_quiet install -q --no-deps --no-build-isolation -e "$REPO"
    rm -f "$VENV"/.horovod-nuq-self-*
    touch "$self_marker"
fi

# Compile the fused CPU kernels now (cached per source and CPU), not at the first step.
"$PY" -c 'import horovod_nuq.kernels as k; lib = k.load(); print("fused CPU kernels:", "ready" if lib else "unavailable (generic codec)")'

# ---------------------------------------------------------------------------
# 6. Check the Horovod build
# ---------------------------------------------------------------------------
# `horovodrun --check-build` imports each framework several times (~20 s), so
# it runs once per (deps, horovod wheel) combination and its table is kept in
# the venv; warm runs print that table and do a quick import check instead.
# HOROVOD_NUQ_FULL_CHECK=1 forces the real check.
check_marker="$VENV/.horovod-nuq-check-${deps_key}-${wheel_key}"
if [[ -f "$check_marker" && "${HOROVOD_NUQ_FULL_CHECK:-0}" != 1 ]]; then
    log "horovodrun --check-build (cached table; quick import check below)"
    check="$(cat "$check_marker")"
    echo "$check"
    TF_CPP_MIN_LOG_LEVEL=2 "$PY" -c '
import horovod.torch as ht, horovod.tensorflow as htf
ok = ht.mpi_built() and ht.gloo_built() and htf.mpi_built() and htf.gloo_built()
print("quick check: horovod.torch + horovod.tensorflow import, MPI+Gloo built:", ok)
raise SystemExit(0 if ok else 1)'
else
    log "horovodrun --check-build"
    check="$(TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/horovodrun" --check-build 2>/dev/null)"
    echo "$check"
fi
for want in TensorFlow PyTorch MPI Gloo; do
    if ! grep -q "\[X\] $want" <<<"$check"; then
        echo "ERROR: Horovod was built without $want support" >&2
        rm -f "$check_marker"
        exit 1
    fi
done
rm -f "$VENV"/.horovod-nuq-check-*
printf '%s\n' "$check" > "$check_marker"

log "done. Now:  source scripts/env.sh"
if [[ $(id -u) -eq 0 ]]; then
    echo "    (running as root: env.sh exports OMPI_ALLOW_RUN_AS_ROOT=1 and"
    echo "     OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, which mpirun and horovodrun need)"
fi
