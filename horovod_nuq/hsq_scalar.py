"""HSQ's scalar quantizer: a tensor's chunk scalars on 2^b evenly spaced levels between their
minimum and maximum, rounded stochastically (unbiased), the way the HSQ authors send them.

Followed from the authors' code, xinyandai/gradient-quantization (HEAD bae06ab):
- compressors/nearest_neighbor_compressor.py, lines 13-14, 59-61, 75-76, 82-83: with
  `--n-bit` b != 32, the vector of one tensor's scalars u (one per chunk, the signed
  projection c_k . v) goes through ProbabilisticScalarCompressor(b) before it is sent, and
  back through it before decoding; b = 32 sends the scalars as float32;
- compressors/probabilistic_scalar_compressor.py, lines 12-33: per call, i.e. per tensor
  (quantizers/ps_quantizer.py lines 15-19 make one compressor per parameter), lower = min u
  and upper = max u of the signed scalars (no norm scaling); x = (u - lower) / (upper - lower)
  * s with s = 2^b; l = floor(x) clamped to [0, s - 1], then, with `random` (main.py line 94,
  default True), l + 1 with probability x - l: unbiased stochastic rounding, E[decoded] = u.
  Decoded: l (upper - lower) / s + lower; upper == lower sends l = 0 (decoded: lower);
- README.md line 3 and its HSQ commands: "HSQ(d=16, m=2^8=256, 6bit for norm quantization)",
  `--n-bit 6`, so b = 6 (main.py's own default is 8). 6 + 8 bits per 16-coordinate chunk is
  the paper's 0.875 bits per coordinate.

One deliberate deviation: the authors' grid has s + 1 points, l in 0..s (a scalar in the top
interval rounds up to l = s), which needs b + 1 bits; they keep l in int32, so it never
showed. Here the grid has exactly 2^b points, l in 0..2^b - 1, spanning [min, max] with step
(max - min) / (2^b - 1): the same unbiased min-max stochastic rounding in exactly b bits.
HSQ as a whole stays biased (the nearest codeword); only the scalar's rounding is unbiased.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .backends import Backend

Array = Any
BOUNDS_BYTES = 8  # the tensor's min and max scalar, float32 each
_TINY = np.float32(np.finfo(np.float32).tiny)


def quantize(xp: Backend, u: Array, uniforms: Array, bits: int) -> tuple[Array, Array]:
    """(bounds [min u, max u] as float32 [2], codes int64 [n] in [0, 2^bits - 1]) for float32
    scalars u [n], rounding up where `uniforms` (U[0, 1), like u) fall below the fraction.

    Differences of halves keep (u - min) / (max - min) free of overflow for any finite
    scalars. A non-finite scalar makes both bounds NaN, so the whole tensor decodes
    non-finite instead of silently finite (its codes are then 0)."""
    top = np.float32((1 << bits) - 1)
    # [0], or [NaN] if any u is inf/NaN. NumPy, torch and TF on CPU already propagate NaN
    # through max and inf through the decode; this also covers reductions that skip NaN.
    poison = xp.row_sum(xp.reshape(u * np.float32(0), [1, -1]))
    lo = -xp.max_all(-u) + poison
    hi = xp.max_all(u) + poison
    half_span = hi * np.float32(0.5) - lo * np.float32(0.5)
    x = (u * np.float32(0.5) - lo * np.float32(0.5)) / xp.maximum(half_span, _TINY) * top
    x = xp.where(x == x, xp.minimum(xp.maximum(x, np.float32(0)), top), np.float32(0))  # noqa: PLR0124  (NaN -> 0)
    low = xp.floor(x)
    codes = low + xp.cast(uniforms < x - low, "float32")
    return xp.concat([lo, hi]), xp.cast(codes, "int64")


def dequantize(xp: Backend, bounds: Array, codes: Array, bits: int) -> Array:
    """The scalars min + t (max - min), t = code / (2^bits - 1), as float32 [n]: computed as
    min (1 - t) + max t, which is exact at both ends and cannot overflow."""
    lo, hi = xp.split(bounds, [1, 1])
    t = xp.cast(codes, "float32") / np.float32((1 << bits) - 1)
    return lo * (np.float32(1) - t) + hi * t


def check_bounds(xp: Backend, bounds: Array, rank: int) -> None:
    """Refuse a payload whose minimum exceeds its maximum (corrupt); NaN bounds, which the
    encoder sends for a non-finite tensor, pass and decode to NaN."""
    lo, hi = xp.split(bounds, [1, 1])
    xp.require(xp.max_all(xp.cast(lo > hi, "float32")) == 0,
               f"HSQ allgather payload of rank {rank}: its scalars' minimum exceeds their maximum; "
               "the payload is corrupt or was made with other settings")
