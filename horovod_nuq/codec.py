"""Scheme math, written once for every backend: bucketing, scales, stochastic rounding, decoding.

All functions take a Backend `xp` first. Arrays are float32 buckets of shape
[n_buckets, bucket_size]; a tensor's last bucket is zero padded, which changes neither
the L2 nor the max scale.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .backends import Backend
from .schemes import Scheme

Array = Any


class Tables:
    """A scheme's constant lookup tables, materialized once per device."""

    def __init__(self, scheme: Scheme) -> None:
        lv = scheme.levels
        self.scheme = scheme
        self.k = lv.k
        self.denominator = lv.denominator
        self.uniform = scheme.spacing == "uniform" or lv.numerators == tuple(range(lv.k + 1))
        vals = lv.values.astype(np.float32)
        nums = np.asarray(lv.numerators, dtype=np.int64)
        self._host = {
            "levels": vals,
            "inner": vals[1:-1].copy(),  # interior levels, for searchsorted
            "signed_values": np.concatenate([-vals[::-1], vals[1:]]).astype(np.float32),
            "signed_numerators": np.concatenate([-nums[::-1], nums[1:]]),
        }
        self._on_device: dict[Any, dict[str, Array]] = {}

    def get(self, xp: Backend, like: Array) -> dict[str, Array]:
        if not xp.can_cache(like):  # e.g. while tracing a tf.function: constants belong to the graph
            return {k: xp.constant(v, like) for k, v in self._host.items()}
        key = (xp.name, xp.device_key(like))
        if key not in self._on_device:
            self._on_device[key] = {k: xp.constant(v, like) for k, v in self._host.items()}
        return self._on_device[key]


def n_buckets(numel: int, bucket_size: int) -> int:
    return max(1, -(-numel // bucket_size))


def to_buckets(xp: Backend, x: Array, bucket_size: int) -> Array:
    """Flatten `x` to float32 and reshape to [n_buckets, bucket_size], zero padding the tail."""
    flat = xp.reshape(xp.cast(x, "float32"), [-1])
    n = xp.numel(flat)
    nb = n_buckets(n, bucket_size)
    if nb * bucket_size != n:
        flat = xp.pad_to(flat, nb * bucket_size)
    return xp.reshape(flat, [nb, bucket_size])


def local_scale(xp: Backend, v: Array, scheme: Scheme, numel: int) -> Array:
    """Per-bucket scale r(v) of this worker: L2 norm, max norm, or the TNQ truncation threshold.

    A non-finite bucket gets scale +inf, so its decoded values are non-finite too (the way
    an uncompressed allreduce would propagate them) and a Max agreement keeps the inf.
    """
    if scheme.scale == "l2":
        r = xp.sqrt(xp.row_sum(v * v))
    else:
        a = xp.abs(v)
        amax = xp.row_max(a)
        if scheme.scale == "max":
            r = amax
        else:  # laplace: alpha = c * b_hat, b_hat = mean |v| (Laplace MLE), never above max |v|
            counts = np.full(xp.shape(v)[0], scheme.bucket_size, dtype=np.float32)
            counts[-1] = numel - scheme.bucket_size * (len(counts) - 1) or scheme.bucket_size
            b = xp.row_sum(a) / xp.constant(counts, v)
            r = xp.minimum(b * np.float32(scheme.truncation), amax)
    return xp.where(r == r, r, np.float32(np.inf))  # noqa: PLR0124  (NaN -> +inf)


def quantize(xp: Backend, v: Array, r: Array, tables: Tables, u: Array) -> Array:
    """Signed level indices in [-k, k] (int64) by stochastic rounding of |v| / r against uniforms u.

    Coordinates above r (only under truncation) are clipped to the top level.
    """
    t = tables.get(xp, v)
    k = tables.k
    nb = xp.shape(v)[0]
    safe = xp.where(r > 0, r, np.float32(1.0))
    x = xp.minimum(xp.abs(v) / xp.reshape(safe, [nb, 1]), np.float32(1.0))
    x = xp.where(x == x, x, np.float32(0.0))  # noqa: PLR0124  (NaN, from r = inf: any valid index)
    if tables.uniform:
        xk = x * np.float32(k)
        j = xp.minimum(xp.maximum(xp.floor(xk), np.float32(0.0)), np.float32(k - 1))
        p = xk - j
        j = xp.cast(j, "int64")
    else:
        j = xp.searchsorted(t["inner"], x)  # 0..k-1
        lo = xp.take(t["levels"], j)
        hi = xp.take(t["levels"], j + 1)
        p = (x - lo) / (hi - lo)
    idx = j + xp.cast(u < p, "int64")
    return xp.where(v < 0, -idx, idx)


def dequantize(xp: Backend, idx: Array, r: Array, tables: Tables) -> Array:
    """Values r * sign * level for signed level indices (the per-worker decode)."""
    t = tables.get(xp, r)
    nb = xp.shape(idx)[0]
    return xp.take(t["signed_values"], idx + tables.k) * xp.reshape(r, [nb, 1])


def numerators(xp: Backend, idx: Array, tables: Tables) -> Array:
    """Integer level numerators m (level = m / D) with sign: what the packed allreduce sums."""
    if tables.uniform:
        return idx
    return xp.take(tables.get(xp, idx)["signed_numerators"], idx + tables.k)


def from_numerator_sums(xp: Backend, sums: Array, r: Array, tables: Tables) -> Array:
    """Sum over ranks of r * m / D, given the summed numerators and the shared scale r."""
    nb = xp.shape(sums)[0]
    return xp.cast(sums, "float32") * xp.reshape(r / np.float32(tables.denominator), [nb, 1])


def from_buckets(xp: Backend, v: Array, numel: int, shape: tuple, dtype: str) -> Array:
    """Undo to_buckets: drop padding, restore shape and dtype."""
    flat = xp.reshape(v, [-1])
    if xp.numel(flat) != numel:
        flat = xp.split(flat, [numel, xp.numel(flat) - numel])[0]
    return xp.cast(xp.reshape(flat, list(shape)), dtype)
