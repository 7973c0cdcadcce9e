"""Build and install Horovod for the frameworks already in this Python environment.

    python -m horovod_nuq.install_horovod            # detect, patch, build (or reuse), install, check
    python -m horovod_nuq.install_horovod --dry-run  # only print what it would do

Horovod 0.28.1, the last release, does not compile against current PyTorch / TensorFlow as
released. This command detects the installed torch and TensorFlow (versions and CUDA builds),
a CUDA toolkit and NCCL (then HOROVOD_GPU_OPERATIONS=NCCL), MPI (else Gloo only), applies to
Horovod's sdist only the patches those versions need, builds a wheel against the installed
frameworks (no build isolation), caches it in ~/.cache/horovod-nuq/wheels/<key> (the key names
every input, so a warm run only reinstalls or skips), installs it and prints Horovod's
check-build table. scripts/setup.sh uses it for the repository's own venv.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HOROVOD_VERSION = "0.28.1"
# The newest framework versions the patches were built and tested with; newer ones get the
# same patches and a warning.
TESTED_TORCH = (2, 13)
TESTED_TF = (2, 21)
# Distributions that provide the `tensorflow` package (the first one installed is used).
TF_DISTS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel", "tensorflow-macos")
# Horovod's setup.py needs these in the environment when built without isolation.
BUILD_REQUIREMENTS = {"setuptools": "setuptools", "wheel": "wheel", "cffi": "cffi>=1.4.0",
                      "cloudpickle": "cloudpickle", "psutil": "psutil", "pyyaml": "pyyaml",
                      "packaging": "packaging"}


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    """(major, minor, ...) of a version string such as '2.13.0+cpu' or '2.21.0rc1'; None for None."""
    if version is None:
        return None
    nums = re.match(r"\d+(?:\.\d+)*", version)
    if not nums:
        raise ValueError(f"cannot read version {version!r}")
    return tuple(int(p) for p in nums.group(0).split("."))


# ---------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Environment:
    """What the build depends on: framework versions and CUDA builds, toolchain, MPI, NCCL."""

    python_tag: str                      # e.g. cp311
    torch: str | None = None             # e.g. 2.13.0+cpu
    torch_cuda: str | None = None        # CUDA version torch was built with
    tensorflow: str | None = None        # e.g. 2.21.0
    tensorflow_cuda: str | None = None
    cuda_home: str | None = None         # a CUDA toolkit with bin/nvcc
    cuda_version: str | None = None      # of that toolkit
    nccl_include: str | None = None      # directory with nccl.h
    nccl_lib: str | None = None          # directory with libnccl.so*
    nccl_version: str | None = None
    mpi: str | None = None               # e.g. "Open MPI 4.1.4"; None: no MPI compiler wrapper
    cmake: str | None = None
    cxx: str | None = None


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def _package_file(package: str, *parts: str) -> Path | None:
    """A file inside an installed package, found without importing it (imports take seconds)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc, *parts)
        if path.exists():
            return path
    return None


def parse_torch_cuda(version_py: str) -> str | None:
    """The CUDA version in torch/version.py's text (`cuda = '12.1'`), None for a CPU build."""
    m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", version_py, re.MULTILINE)
    return m.group(1) if m else None


def parse_tensorflow_cuda(build_info_py: str) -> str | None:
    """The CUDA version in tensorflow/python/platform/build_info.py's text, None for a CPU build."""
    if not re.search(r"['\"]is_cuda_build['\"],\s*True", build_info_py):
        return None
    m = re.search(r"['\"]cuda_version['\"],\s*['\"]([^'\"]+)['\"]", build_info_py)
    return m.group(1) if m else "unknown"


def _torch_cuda() -> str | None:
    path = _package_file("torch", "version.py")
    return parse_torch_cuda(path.read_text()) if path else None


def _tensorflow_cuda() -> str | None:
    path = _package_file("tensorflow", "python", "platform", "build_info.py")
    return parse_tensorflow_cuda(path.read_text()) if path else None


def _find_cuda_home() -> str | None:
    candidates = [os.environ.get(v) for v in ("HOROVOD_CUDA_HOME", "CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    candidates += [str(Path(nvcc).resolve().parent.parent) if nvcc else None, "/usr/local/cuda"]
    for home in candidates:  # a toolkit: nvcc and the runtime headers (not just an nvcc wrapper)
        if home and Path(home, "bin", "nvcc").exists() and Path(home, "include", "cuda_runtime.h").exists():
            return home
    return None


def _cuda_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([str(Path(cuda_home, "bin", "nvcc")), "--version"], check=False,
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _find_nccl(cuda_home: str | None) -> tuple[str | None, str | None]:
    """(include dir, lib dir) of NCCL: HOROVOD_NCCL_* settings, the CUDA toolkit, system paths, or
    the nvidia-nccl-cu* wheel that CUDA builds of torch install."""
    home = os.environ.get("HOROVOD_NCCL_HOME")
    include_dirs = [os.environ.get("HOROVOD_NCCL_INCLUDE"), home and f"{home}/include",
                    cuda_home and f"{cuda_home}/include", "/usr/include", "/usr/local/include"]
    lib_dirs = [os.environ.get("HOROVOD_NCCL_LIB"), home and f"{home}/lib", home and f"{home}/lib64",
                cuda_home and f"{cuda_home}/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                "/usr/lib64", "/usr/local/lib"]
    wheel = _package_file("nvidia", "nccl")
    if wheel:
        include_dirs.append(str(wheel / "include"))
        lib_dirs.append(str(wheel / "lib"))
    include = next((d for d in include_dirs if d and Path(d, "nccl.h").exists()), None)
    lib = next((d for d in lib_dirs if d and any(Path(d).glob("libnccl.so*"))), None)
    return include, lib


def _nccl_version(include: str) -> str | None:
    text = Path(include, "nccl.h").read_text(errors="replace")
    parts = [re.search(rf"#define\s+NCCL_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(p.group(1) for p in parts) if all(parts) else None


def _find_mpi() -> str | None:
    """The MPI flavour and version if an MPI C++ compiler wrapper is on PATH (Horovod needs it)."""
    if not (shutil.which("mpicxx") or shutil.which("mpic++") or shutil.which("mpiCC")):
        return None
    try:
        out = subprocess.run(["mpirun", "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "MPI (unknown version)"
    first = out.strip().splitlines()[0] if out.strip() else ""
    m = re.search(r"\((Open MPI)\)\s*(\S+)", first) or re.search(r"(HYDRA|MPICH|Intel).*?(\d[\d.]*)", out)
    return f"{m.group(1)} {m.group(2)}" if m else (first or "MPI")


def detect() -> Environment:
    """Inspect this Python environment and machine (without importing torch or TensorFlow)."""
    cuda_home = _find_cuda_home()
    nccl_include, nccl_lib = _find_nccl(cuda_home)
    torch = _dist_version("torch")
    tensorflow = _dist_version(*TF_DISTS)
    return Environment(
        python_tag=f"cp{sys.version_info[0]}{sys.version_info[1]}",
        torch=torch, torch_cuda=_torch_cuda() if torch else None,
        tensorflow=tensorflow, tensorflow_cuda=_tensorflow_cuda() if tensorflow else None,
        cuda_home=cuda_home, cuda_version=_cuda_version(cuda_home) if cuda_home else None,
        nccl_include=nccl_include, nccl_lib=nccl_lib,
        nccl_version=_nccl_version(nccl_include) if nccl_include else None,
        mpi=_find_mpi(), cmake=shutil.which("cmake"),
        cxx=os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"),
    )


# ---------------------------------------------------------------------------------------------
# The patches (the one copy of them: scripts/setup.sh calls this module)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """A regular-expression substitution in one file of the sdist; it must match at least once."""

    path: str
    pattern: str
    replacement: str


@dataclass(frozen=True)
class Patch:
    """Edits to Horovod's sdist, the condition under which they are needed, and checks
    (regex, must_match) that fail loudly if the sdist changes under us and an edit misses."""

    name: str
    why: str
    needed: Callable[[Environment], bool] = field(compare=False)
    edits: tuple[Edit, ...]
    checks: tuple[tuple[str, str, bool], ...]

    def fingerprint(self) -> str:
        """The text that identifies this patch in the wheel's cache key."""
        return repr((self.name, self.edits, self.checks))


def _at_least(version: str | None, minimum: tuple[int, ...]) -> bool:
    v = version_tuple(version)
    return v is not None and v >= minimum


PATCHES: tuple[Patch, ...] = (
    Patch("cxx17",
          "torch >= 2.1 headers need C++17; Horovod 0.28.1 sets C++14 globally and for its torch extension",
          lambda env: _at_least(env.torch, (2, 1)),
          (Edit("CMakeLists.txt", r"^set\(CMAKE_CXX_STANDARD 14\)$", "set(CMAKE_CXX_STANDARD 17)"),
           Edit("horovod/torch/CMakeLists.txt", r"^( *)set\(CMAKE_CXX_STANDARD 14\)$",
                r"\1set(CMAKE_CXX_STANDARD 17)")),
          (("CMakeLists.txt", r"^set\(CMAKE_CXX_STANDARD 17\)$", True),
           ("horovod/torch/CMakeLists.txt", r"set\(CMAKE_CXX_STANDARD 17\)", True),
           ("horovod/torch/CMakeLists.txt", r"set\(CMAKE_CXX_STANDARD 14\)", False))),
    Patch("gloo-cxx17",
          "with the C++17 build, bundled Gloo's hard-coded -std=c++11 clashes with the C++17 Gloo copy "
          "Horovod makes for TF (multiple definition of gloo::rendezvous::Store::kDefaultTimeout)",
          lambda env: _at_least(env.torch, (2, 1)),
          (Edit("third_party/gloo/CMakeLists.txt", r"-std=c\+\+11 -fPIC", "-std=c++17 -fPIC"),),
          (("third_party/gloo/CMakeLists.txt", r"-std=c\+\+17 -fPIC", True),)),
    Patch("no-xla-ops",
          "TensorFlow >= 2.18 wheels no longer ship the highwayhash headers xla_mpi_ops.cc includes; "
          "the XLA ops are dropped",
          lambda env: _at_least(env.tensorflow, (2, 18)),
          (Edit("horovod/tensorflow/CMakeLists.txt", r"^.*xla_mpi_ops\.cc.*\n", ""),),
          (("horovod/tensorflow/CMakeLists.txt", r"xla_mpi_ops", False),)),
    Patch("release-build",
          "build 'Release' (-O3) instead of 'RelWithDebInfo' (-O3 -g): same code, faster build, "
          "much smaller wheel",
          lambda env: True,
          (Edit("setup.py", r"else 'RelWithDebInfo'", "else 'Release'"),),
          (("setup.py", r"else 'Release'", True),)),
    Patch("keras-backend",
          "beside TF >= 2.16 `keras` is Keras 3, so Horovod's tf.keras callbacks must take the backend "
          "of the Keras tf.keras resolves to (tf_keras under TF_USE_LEGACY_KERAS=1)",
          lambda env: _at_least(env.tensorflow, (2, 16)),
          tuple(Edit(f, r"^    from keras import backend as K$", "    from tensorflow.keras import backend as K")
                for f in ("horovod/tensorflow/keras/__init__.py", "horovod/tensorflow/keras/callbacks.py")),
          tuple((f, r"from tensorflow\.keras import backend as K", True)
                for f in ("horovod/tensorflow/keras/__init__.py", "horovod/tensorflow/keras/callbacks.py"))),
)


class PatchError(RuntimeError):
    """A patch did not apply to the sdist as expected."""


def select_patches(env: Environment) -> list[Patch]:
    """The patches this environment's framework versions need, in order."""
    return [p for p in PATCHES if p.needed(env)]


def apply_patches(source_dir: str | Path, patches: Sequence[Patch]) -> None:
    """Apply `patches` to an unpacked Horovod sdist, then verify each one's checks."""
    root = Path(source_dir)
    for patch in patches:
        for edit in patch.edits:
            path = root / edit.path
            text, count = re.subn(edit.pattern, edit.replacement, path.read_text(), flags=re.MULTILINE)
            if count == 0:
                raise PatchError(f"patch {patch.name}: {edit.pattern!r} not found in {edit.path}")
            path.write_text(text)
    for patch in patches:
        for rel, pattern, must_match in patch.checks:
            if bool(re.search(pattern, (root / rel).read_text(), re.MULTILINE)) != must_match:
                raise PatchError(f"patch {patch.name}: check failed in {rel}: {pattern!r} "
                                 f"{'missing' if must_match else 'still present'}")


# ---------------------------------------------------------------------------------------------
# The build plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything one build needs: patches, Horovod's build variables, the wheel cache key."""

    env: Environment
    horovod_version: str
    patches: list[Patch]
    build_env: dict[str, str]
    gpu: bool
    key: str
    notes: list[str]


def plan_build(env: Environment, horovod_version: str = HOROVOD_VERSION, gpu: str = "auto") -> Plan:
    """Decide patches, HOROVOD_* variables and the cache key for `env`; raise if it cannot build.

    gpu: 'auto' (NCCL when a CUDA toolkit, NCCL and a CUDA build of a framework are present),
    'nccl' (require them) or 'none'."""
    if horovod_version != HOROVOD_VERSION:
        raise ValueError(f"only Horovod {HOROVOD_VERSION} is supported (its patches are version-specific)")
    if not env.torch and not env.tensorflow:
        raise ValueError("neither torch nor TensorFlow is installed; install the framework(s) first")
    notes = []
    for name, version, tested in (("torch", env.torch, TESTED_TORCH), ("TensorFlow", env.tensorflow, TESTED_TF)):
        if version and version_tuple(version)[:2] > tested:
            notes.append(f"{name} {version} is newer than tested ({'.'.join(map(str, tested))}); "
                         "applying the newest patch set")
    framework_cuda = env.torch_cuda or env.tensorflow_cuda
    gpu_ready = bool(env.cuda_home and env.nccl_include and env.nccl_lib and framework_cuda)
    if gpu == "nccl" and not gpu_ready:
        missing = [what for what, ok in (("a CUDA toolkit (nvcc)", env.cuda_home),
                                         ("NCCL (nccl.h and libnccl)", env.nccl_include and env.nccl_lib),
                                         ("a CUDA build of torch or TensorFlow", framework_cuda)) if not ok]
        raise ValueError("--gpu nccl: missing " + ", ".join(missing))
    use_gpu = gpu_ready and gpu != "none"
    if framework_cuda and not use_gpu and gpu != "none":
        notes.append(f"the frameworks are CUDA builds ({framework_cuda}) but the CUDA toolkit or NCCL was "
                     "not found (set HOROVOD_CUDA_HOME / HOROVOD_NCCL_HOME): building without GPU operations")
    build_env = {
        "HOROVOD_WITH_PYTORCH" if env.torch else "HOROVOD_WITHOUT_PYTORCH": "1",
        "HOROVOD_WITH_TENSORFLOW" if env.tensorflow else "HOROVOD_WITHOUT_TENSORFLOW": "1",
        "HOROVOD_WITHOUT_MXNET": "1",
        "HOROVOD_WITH_MPI" if env.mpi else "HOROVOD_WITHOUT_MPI": "1",
        "HOROVOD_WITH_GLOO": "1",
    }
    if use_gpu:
        build_env.update(HOROVOD_GPU_OPERATIONS="NCCL", HOROVOD_CUDA_HOME=env.cuda_home,
                         HOROVOD_NCCL_INCLUDE=env.nccl_include, HOROVOD_NCCL_LIB=env.nccl_lib,
                         HOROVOD_NCCL_LINK="SHARED")
    if not env.mpi:
        notes.append("no MPI compiler wrapper (mpicxx) found: Gloo controller only (horovodrun --gloo)")
    patches = select_patches(env)
    patch_key = hashlib.sha256("\n".join(p.fingerprint() for p in patches).encode()).hexdigest()[:8]
    key = (f"horovod-{horovod_version}_torch-{env.torch or 'none'}_tf-{env.tensorflow or 'none'}"
           f"_{env.python_tag}_p{patch_key}")
    if use_gpu:
        key += f"_cuda-{env.cuda_version or 'unknown'}_nccl-{env.nccl_version or 'unknown'}"
    if not env.mpi:
        key += "_nompi"
    return Plan(env, horovod_version, patches, build_env, use_gpu, key, notes)


def expected_features(plan: Plan) -> list[str]:
    """The entries that must be ticked in `horovodrun --check-build` after this build."""
    want = (["TensorFlow"] if plan.env.tensorflow else []) + (["PyTorch"] if plan.env.torch else [])
    want += (["MPI"] if plan.env.mpi else []) + ["Gloo"] + (["NCCL"] if plan.gpu else [])
    return want


def describe(plan: Plan) -> str:
    """A human-readable summary of the environment and the plan."""
    e = plan.env
    lines = [f"Horovod {plan.horovod_version} for Python {sys.version.split()[0]} ({e.python_tag})",
             f"  torch:      {e.torch or '-'}" + (f" (CUDA {e.torch_cuda})" if e.torch_cuda else ""),
             f"  TensorFlow: {e.tensorflow or '-'}" + (f" (CUDA {e.tensorflow_cuda})" if e.tensorflow_cuda else ""),
             f"  CUDA:       {(e.cuda_home + ' ' + (e.cuda_version or '')) if e.cuda_home else '-'}",
             f"  NCCL:       {e.nccl_version or '-'}" + (f" ({e.nccl_include})" if e.nccl_include else ""),
             f"  MPI:        {e.mpi or '- (Gloo only)'}",
             "  patches:    " + (", ".join(p.name for p in plan.patches) or "none"),
             "  build env:  " + " ".join(f"{k}={v}" for k, v in plan.build_env.items()),
             f"  cache key:  {plan.key}"]
    return "\n".join(lines + [f"  note: {n}" for n in plan.notes])


# ---------------------------------------------------------------------------------------------
# Build, cache, install, check
# ---------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """$HOROVOD_NUQ_CACHE or ~/.cache/horovod-nuq (shared with the fused kernels' cache)."""
    return Path(os.environ.get("HOROVOD_NUQ_CACHE") or Path.home() / ".cache" / "horovod-nuq")


def _log(msg: str) -> None:
    print(f"==> [install_horovod] {msg}", flush=True)


def _pip(*args: str) -> None:
    """Run pip quietly in this environment, dropping its notes about unreachable index locations."""
    r = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    out = [line for line in r.stdout.splitlines() if "it is neither a file nor a directory" not in line]
    if out:
        print("\n".join(out), flush=True)
    if r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, ["pip", *args])


def _missing_build_requirements() -> list[str]:
    missing = [req for dist, req in BUILD_REQUIREMENTS.items() if _dist_version(dist) is None]
    return missing


def _cached_wheel(wheel_dir: Path, version: str) -> Path | None:
    return next(iter(sorted(wheel_dir.glob(f"horovod-{version}-*.whl"))), None)


def _fetch_sdist(version: str, cache: Path) -> Path:
    sdist_dir = cache / "sdist"
    sdist = sdist_dir / f"horovod-{version}.tar.gz"
    if not sdist.exists():
        _log(f"downloading the Horovod {version} sdist")
        sdist_dir.mkdir(parents=True, exist_ok=True)
        _pip("download", "--no-deps", "--no-binary", ":all:", f"horovod=={version}", "-d", str(sdist_dir))
    return sdist


def build_wheel(plan: Plan, cache: Path, jobs: int | None = None) -> Path:
    """Patch and build Horovod into the wheel cache; returns the cached wheel."""
    sdist = _fetch_sdist(plan.horovod_version, cache)
    with tempfile.TemporaryDirectory(prefix="horovod-build.") as tmp:
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse paths outside tmp
                tar.extractall(tmp, filter="data")
            else:
                tar.extractall(tmp)
        src = Path(tmp) / f"horovod-{plan.horovod_version}"
        apply_patches(src, plan.patches)
        env = dict(os.environ, **plan.build_env)
        if plan.gpu and not any(Path(plan.build_env["HOROVOD_NCCL_LIB"]).glob("libnccl.so")):
            # the nvidia-nccl wheel ships only libnccl.so.2; CMake's find_library wants libnccl.so
            shim = Path(tmp, "nccl-lib")
            shim.mkdir()
            target = min(Path(plan.build_env["HOROVOD_NCCL_LIB"]).glob("libnccl.so*"))
            (shim / "libnccl.so").symlink_to(target)
            env["HOROVOD_NCCL_LIB"] = str(shim)
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        ncpu = str(jobs or usable or 1)  # like nproc: the CPUs this process may run on
        # Horovod's setup.py passes -j8 to make unless MAKEFLAGS is set
        env.update(MAKEFLAGS=f"-j{ncpu}", CMAKE_BUILD_PARALLEL_LEVEL=ncpu, TF_CPP_MIN_LOG_LEVEL="2")
        log = Path(tmp, "build.log")
        _log(f"building Horovod {plan.horovod_version} with {ncpu} jobs (minutes; log: {log})")
        with open(log, "w") as f:
            r = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "-v",
                                "--no-build-isolation", "--no-deps", ".", "-w", str(Path(tmp, "dist"))],
                               cwd=src, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
        if r.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-60:]
            raise RuntimeError("Horovod build failed; last lines of the log:\n" + "\n".join(tail))
        built = _cached_wheel(Path(tmp, "dist"), plan.horovod_version)
        wheel_dir = cache / "wheels" / plan.key
        wheel_dir.mkdir(parents=True, exist_ok=True)
        part = wheel_dir / (built.name + ".part")
        shutil.copyfile(built, part)
        os.replace(part, wheel_dir / built.name)  # atomic: a killed build leaves no broken wheel
        return wheel_dir / built.name


def _state_file(kind: str, key: str) -> Path | None:
    """A marker in this venv recording an install or a check; None outside a venv (not ours to write)."""
    if sys.prefix == getattr(sys, "base_prefix", sys.prefix) or not os.access(sys.prefix, os.W_OK):
        return None
    return Path(sys.prefix, f".horovod-nuq-{kind}-{key}")


def _clear_markers(kind: str) -> None:
    if _state_file(kind, "x") is not None:
        for old in Path(sys.prefix).glob(f".horovod-nuq-{kind}-*"):
            old.unlink()


def _replace_marker(kind: str, key: str, content: str = "") -> None:
    marker = _state_file(kind, key)
    if marker is not None:
        _clear_markers(kind)
        marker.write_text(content)


_QUICK_CHECK = """
import importlib, sys
bad = []
for fw in sys.argv[1:]:
    m = importlib.import_module("horovod." + fw)
    if not (m.gloo_built() and (m.mpi_built() or "--nompi" in sys.argv)):
        bad.append(fw)
print("quick check: horovod." + " + horovod.".join(a for a in sys.argv[1:] if not a.startswith("-")),
      "import; controllers built:", not bad)
raise SystemExit(1 if bad else 0)
"""


def check_build(plan: Plan, full: bool = False) -> str:
    """Print Horovod's check-build table (cached per build key in the venv: the real check imports
    each framework several times, ~20 s) and fail if an expected entry is not ticked."""
    marker = _state_file("check", plan.key)
    if marker is not None and marker.exists() and not full:
        table = marker.read_text()
        print(table)
        fws = (["torch"] if plan.env.torch else []) + (["tensorflow"] if plan.env.tensorflow else [])
        r = subprocess.run([sys.executable, "-c", _QUICK_CHECK, *fws] + ([] if plan.env.mpi else ["--nompi"]),
                           capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                           check=False)
        print(r.stdout.rstrip("\n"))
        if r.returncode != 0:  # the frameworks' import-time log lines only matter when it fails
            raise RuntimeError(f"quick check failed:\n{r.stderr[-3000:]}")
    else:
        horovodrun = "from horovod.runner.launch import run_commandline; run_commandline()"
        r = subprocess.run([sys.executable, "-c", horovodrun, "--check-build"], capture_output=True,
                           text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), check=False)
        table = r.stdout.rstrip("\n")
        print(table)
        if r.returncode != 0:
            raise RuntimeError(f"horovodrun --check-build failed:\n{r.stderr[-3000:]}")
    missing = [f for f in expected_features(plan) if not re.search(rf"\[X\] {f}\b", table)]
    if missing:
        _clear_markers("check")
        raise RuntimeError(f"Horovod was built without {', '.join(missing)} support")
    _replace_marker("check", plan.key, table)
    return table


def install(plan: Plan, cache: Path, deps: bool = True, force: bool = False, rebuild: bool = False,
            jobs: int | None = None) -> Path:
    """Build (or reuse the cached wheel) and pip-install it unless this venv already has it."""
    wheel_dir = cache / "wheels" / plan.key
    wheel = None if rebuild else _cached_wheel(wheel_dir, plan.horovod_version)
    marker = _state_file("hvd", plan.key)
    installed = _dist_version("horovod") == plan.horovod_version
    if wheel and installed and marker is not None and marker.exists() and not force:
        _log(f"Horovod already installed from {plan.key}")
        return wheel
    if wheel is None:
        missing = _missing_build_requirements()
        if missing:
            _log(f"installing build requirements: {' '.join(missing)}")
            _pip("install", *missing)
        for tool, path in (("cmake", plan.env.cmake), ("a C++ compiler", plan.env.cxx)):
            if not path:
                raise RuntimeError(f"building Horovod needs {tool} (e.g. apt-get install cmake g++)")
        wheel = build_wheel(plan, cache, jobs)
    else:
        _log(f"using cached Horovod wheel {wheel}")
    _log(f"installing {wheel.name}")
    _pip("install", "--force-reinstall", *([] if deps else ["--no-deps"]), str(wheel))
    _replace_marker("hvd", plan.key)
    return wheel


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m horovod_nuq.install_horovod",
                                 description="Build Horovod for this environment's torch / TensorFlow.")
    ap.add_argument("--dry-run", action="store_true", help="print the detected environment and plan only")
    ap.add_argument("--print-key", action="store_true", help="print only the wheel cache key")
    ap.add_argument("--gpu", choices=["auto", "nccl", "none"], default="auto",
                    help="GPU operations: auto-detect CUDA + NCCL (default), require them, or none")
    ap.add_argument("--cache", type=Path, default=None, help="cache root (default: $HOROVOD_NUQ_CACHE "
                    "or ~/.cache/horovod-nuq); wheels go to <cache>/wheels/<key>")
    ap.add_argument("--no-deps", action="store_true", help="install the wheel without Horovod's dependencies")
    ap.add_argument("--force", action="store_true", help="reinstall even if this venv has this build")
    ap.add_argument("--rebuild", action="store_true", help="rebuild even if the wheel is cached")
    ap.add_argument("--no-check", action="store_true", help="skip the check-build table")
    ap.add_argument("--full-check", action="store_true",
                    help="run horovodrun --check-build even if its table is cached (also HOROVOD_NUQ_FULL_CHECK=1)")
    ap.add_argument("-j", "--jobs", type=int, default=None, help="parallel build jobs (default: all CPUs)")
    args = ap.parse_args(argv)
    try:
        plan = plan_build(detect(), gpu=args.gpu)
    except ValueError as e:
        print(f"install_horovod: {e}", file=sys.stderr)
        return 2
    if args.print_key:
        print(plan.key)
        return 0
    print(describe(plan), flush=True)
    if args.dry_run:
        return 0
    try:
        install(plan, args.cache or cache_root(), deps=not args.no_deps, force=args.force,
                rebuild=args.rebuild, jobs=args.jobs)
        if not args.no_check:
            _log("horovodrun --check-build")
            check_build(plan, full=args.full_check or os.environ.get("HOROVOD_NUQ_FULL_CHECK") == "1")
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        print(f"install_horovod: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
