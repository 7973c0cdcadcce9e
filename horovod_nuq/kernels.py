"""Fused CPU kernels (csrc/nuq_kernels.c), compiled once per machine and loaded with ctypes.

The C source ships inside the package (wheel and sdist) and `load()` compiles it with the
system C compiler (-march=native, OpenMP if available) into ~/.cache/horovod-nuq/kernels/ on
first use (scripts/setup.sh does it at install time). Compiling on the user's machine rather
than shipping a prebuilt extension keeps the wheel pure Python and gets each CPU's best code:
-march=native measured as fast as a portable -mavx2 -mfma build and ~3x faster than the x86-64
baseline (CHANGELOG 0.1.0). Without a compiler or the source, `load()` warns once and returns
None; callers then use the generic codec. HOROVOD_NUQ_KERNELS=0 turns the kernels off silently.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("csrc") / "nuq_kernels.c"
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet

# array arguments (float, double, uint8, uint32, int64 pointers) are passed as raw addresses (`ptr`):
# ~1 us per call instead of ~3 for data_as; the names only document the C types
_F = _D = _U8 = _U32 = _I64 = ctypes.c_void_p
_i64, _int, _u64, _f32, _f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_uint64, ctypes.c_float, ctypes.c_double

_SIGNATURES = {
    "nuq_scales": (None, [_F, _i64, _i64, _int, _f32, _F]),
    "nuq_encode_codes": (None, [_F, _i64, _i64, _F, _F, _int, _int, _u64, _int, _U8]),
    "nuq_encode_sums": (None, [_F, _i64, _i64, _F, _F, _I64, _int, _int, _u64, _int, _int, _i64, _D]),
    "nuq_decode_codes": (_int, [_U8, _i64, _i64, _F, _F, _int, _int, _f32, _F, _int]),
    "nuq_decode_sums": (_int, [_D, _i64, _i64, _f64, _int, _int, _i64, _F, _f32, _F]),
    "nuq_uniforms": (None, [_u64, _i64, _i64, _F]),
    "nuq_elias_encode": (_i64, [_F, _i64, _i64, _F, _F, _int, _int, _u64, _i64, _U8, _U32]),
    "nuq_elias_decode": (_int, [_U8, _U32, _i64, _i64, _F, _F, _int, _f32, _F, _int]),
    "nuq_omega8": (None, [_U8]),
}

# Compiler flag sets, best first: the first one the compiler accepts is used.
_FLAG_LADDER = (["-march=native", "-fopenmp"], ["-fopenmp"], [])


class KernelsUnavailable(RuntimeError):
    """The fused kernels cannot be built or loaded here (the message says why)."""


def _cache_dir() -> Path:
    root = os.environ.get("HOROVOD_NUQ_CACHE") or os.path.join(Path.home(), ".cache", "horovod-nuq")
    return Path(root) / "kernels"


def _find_compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise KernelsUnavailable("no C compiler found; install gcc or set CC")
    if shutil.which(cc) is None:
        raise KernelsUnavailable(f"C compiler {cc!r} (from CC) not found")
    return cc


def _compile(target: Path) -> None:
    cc = _find_compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        base = [cc, "-O3", "-fno-trapping-math", "-fno-math-errno", "-shared", "-fPIC", str(SOURCE),
                "-o", str(out), "-lm"]
        for extra in _FLAG_LADDER:
            r = subprocess.run(base[:2] + extra + base[2:], capture_output=True, text=True, check=False)
            if r.returncode == 0:
                break
        else:
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise KernelsUnavailable(f"{cc} could not compile {SOURCE.name}: {last}")
        os.replace(out, target)  # atomic: concurrent ranks never load a half-written file


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


def _build_and_load() -> ctypes.CDLL:
    try:
        source = SOURCE.read_bytes()
    except OSError as e:
        raise KernelsUnavailable(f"C source missing ({SOURCE}: {e.strerror})") from e
    # built with -march=native: the cache key includes this machine's CPU features
    digest = hashlib.sha256(source + _cpu_flags()).hexdigest()[:16]
    path = _cache_dir() / f"nuq_kernels_{digest}.so"
    if not path.exists():
        _compile(path)
    lib = ctypes.CDLL(str(path))
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def load() -> ctypes.CDLL | None:
    """The kernel library, compiling it on first use; None (after one warning) if impossible."""
    global _lib
    if _lib is not False:
        return _lib
    if os.environ.get("HOROVOD_NUQ_KERNELS", "1") == "0":
        _lib = None
        return None
    try:
        _lib = _build_and_load()
    except (OSError, KernelsUnavailable, AttributeError) as e:
        warnings.warn(f"horovod_nuq: fused CPU kernels unavailable ({e}); using the generic codec, "
                      "which is much slower", RuntimeWarning, stacklevel=2)
        _lib = None
    return _lib


def ptr(a: np.ndarray) -> int:
    """The address of a contiguous numpy array's data, for a kernel's pointer argument."""
    if not a.flags.c_contiguous:
        raise ValueError("fused kernels need contiguous arrays")
    return a.ctypes.data


def key_stream(seed: int):
    """Per-call 64-bit keys for the counter-based draws: SplitMix64 of (seed, call index)."""
    mask = (1 << 64) - 1
    state = seed & mask
    while True:
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        yield z ^ (z >> 31)


def uniforms(key: int, count: int, start: int = 0) -> np.ndarray:
    """The U[0,1) draws the encoders use for elements start .. start + count - 1 under `key`
    (for tests that replay a kernel call through the NumPy reference)."""
    lib = load()
    if lib is None:
        raise RuntimeError("fused CPU kernels unavailable")
    out = np.empty(count, np.float32)
    lib.nuq_uniforms(key, start, count, ptr(out))
    return out
