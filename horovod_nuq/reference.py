"""NumPy reference quantizer, written straight from the papers' definitions: the test oracle.

Deliberately independent of codec.py (float64, one bucket at a time, levels looked up by
value), so agreement between the two checks the vectorized code.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .schemes import Scheme


def bucket_scales(v: np.ndarray, scheme: Scheme) -> np.ndarray:
    """r(v) per bucket in float64 (for TNQ: the truncation threshold alpha)."""
    out = []
    for b in _buckets(v, scheme.bucket_size):
        a = np.abs(b)
        if scheme.scale == "l2":
            out.append(np.sqrt(np.sum(b * b)))
        elif scheme.scale == "max":
            out.append(a.max())
        else:
            out.append(min(scheme.truncation * a.mean(), a.max()))
    return np.asarray(out)


def quantize(v: np.ndarray, scheme: Scheme, u: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
    """Q(v) with uniforms u (same shape as the zero-padded buckets); scales override r(v)."""
    lv = scheme.levels.values
    u = np.asarray(u).reshape(-1, scheme.bucket_size)
    out = []
    for i, (b, r, x, j) in enumerate(_positions(v, scheme, scales)):
        p = (x - lv[j]) / (lv[j + 1] - lv[j])
        level = np.where(u[i, : b.size] < p, lv[j + 1], lv[j])
        out.append(np.sign(b) * level * r)
    return np.concatenate(out).reshape(np.shape(v))


def coordinate_variance(v: np.ndarray, scheme: Scheme, scales: np.ndarray | None = None) -> np.ndarray:
    """Exact per-coordinate Var[Q(v)_i] = r^2 (l_{j+1} - x)(x - l_j), shaped like v."""
    lv = scheme.levels.values
    out = [r * r * (lv[j + 1] - x) * (x - lv[j]) for b, r, x, j in _positions(v, scheme, scales)]
    return np.concatenate(out).reshape(np.shape(v)) if out else np.zeros(np.shape(v))


def variance(v: np.ndarray, scheme: Scheme, scales: np.ndarray | None = None) -> float:
    """Exact E||Q(v) - E Q(v)||^2, the sum of coordinate_variance."""
    return float(np.sum(coordinate_variance(v, scheme, scales)))


def _positions(v: np.ndarray, scheme: Scheme, scales: np.ndarray | None):
    """Per bucket: the coordinates b, scale r, x = min(|b| / r, 1) and the lower level index j
    (x = j = 0 for an all-zero bucket, which then quantizes to exactly 0)."""
    lv = scheme.levels.values
    r_all = bucket_scales(v, scheme) if scales is None else np.asarray(scales, np.float64)
    for r, b in zip(r_all, _buckets(v, scheme.bucket_size)):
        x = np.minimum(np.abs(b) / r, 1.0) if r > 0 else np.zeros_like(b)
        yield b, r, x, np.clip(np.searchsorted(lv, x, side="right") - 1, 0, len(lv) - 2)


def _buckets(v: np.ndarray, size: int) -> list[np.ndarray]:
    flat = np.asarray(v, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        return []
    return [flat[i: i + size] for i in range(0, flat.size, size)]


class HSQOracle(NamedTuple):
    """reference.hsq's answer, per chunk where not said otherwise."""

    q: np.ndarray  # Q(v), flattened to v's length
    idx: np.ndarray  # codeword indices k
    u: np.ndarray  # projections c_k . x, before any scalar quantization
    gap: np.ndarray  # best minus second-best |c . x|: near ties float32 may break otherwise
    sent: np.ndarray  # the scalars decoded: u itself, or u rounded onto the min-max grid
    margin: np.ndarray  # |uniform - fraction| of the stochastic rounding (inf: no rounding)


def hsq(v: np.ndarray, codebook: np.ndarray, dim: int, scalar_bits: int = 32,
        uniforms: np.ndarray | None = None) -> HSQOracle:
    """HSQ (arXiv 1911.04655; the authors' nearest_neighbor_compressor.py), chunk by chunk in
    float64: for each chunk x of `dim` coordinates (the tail zero padded) the codeword c_k with
    the largest |c_k . x|, sent as k and u = c_k . x, decoded as u c_k. With scalar_bits < 32
    the scalars u of the whole tensor are sent as `hsq_scalars` rounds them with `uniforms`."""
    c = np.asarray(codebook, dtype=np.float64)
    flat = np.asarray(v, dtype=np.float64).reshape(-1)
    flat = np.concatenate([flat, np.zeros(-len(flat) % dim or (dim if len(flat) == 0 else 0))])
    idx, us, gaps = [], [], []
    for x in flat.reshape(-1, dim):
        scores = np.array([np.dot(ci, x) for ci in c])
        order = np.argsort(-np.abs(scores), kind="stable")
        k = int(order[0])
        idx.append(k)
        us.append(scores[k])
        gaps.append(abs(scores[k]) - abs(scores[order[1]]))
    us = np.asarray(us)
    if scalar_bits == 32:
        sent, margin = us, np.full(us.shape, np.inf)
    else:
        sent, _, margin = hsq_scalars(us, scalar_bits, uniforms)
    q = np.concatenate([s * c[k] for s, k in zip(sent, idx)])[:np.asarray(v).size]
    return HSQOracle(q, np.asarray(idx), us, np.asarray(gaps), sent, margin)


def hsq_scalars(u: np.ndarray, bits: int, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The HSQ authors' scalar quantizer (compressors/probabilistic_scalar_compressor.py) on
    2^bits levels: step = (max u - min u) / (2^bits - 1), x = (u - min u) / step, code =
    floor(x) + 1 with probability frac(x) (when uniform < frac(x)), decoded min u + code step.

    Returns (decoded scalars, codes, |uniform - frac(x)|: how far each draw is from flipping)."""
    u = np.asarray(u, np.float64)
    r = np.asarray(uniforms, np.float64).reshape(u.shape)
    lo, hi = u.min(), u.max()
    step = (hi - lo) / ((1 << bits) - 1)
    if step == 0:
        return np.full(u.shape, lo), np.zeros(u.shape, np.int64), np.full(u.shape, np.inf)
    x = np.minimum((u - lo) / step, (1 << bits) - 1)
    frac = x - np.floor(x)
    codes = (np.floor(x) + (r < frac)).astype(np.int64)
    return lo + codes * step, codes, np.abs(r - frac)
