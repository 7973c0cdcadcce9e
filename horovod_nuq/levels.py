"""Quantization level sets on [0, 1], stored as integers over a common denominator.

A level set 0 = l_0 < l_1 < ... < l_k = 1 is kept as integer numerators m_j with
l_j = m_j / D (D = m_k). Integers make sums of quantized values over ranks exact, which
is what lets a shared-scale payload travel through a plain allreduce.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Levels:
    """Levels l_j = numerators[j] / denominator, with numerators[0] = 0 and numerators[-1] = denominator."""

    numerators: tuple[int, ...]

    def __post_init__(self) -> None:
        m = self.numerators
        if len(m) < 2 or m[0] != 0 or any(b <= a for a, b in zip(m, m[1:])):
            raise ValueError(
                f"level numerators must start at 0 and strictly increase, got {m}"
            )

    @property
    def denominator(self) -> int:
        return self.numerators[-1]

    @property
    def k(self) -> int:
        """Number of non-zero levels."""
        return len(self.numerators) - 1

    @property
    def values(self) -> np.ndarray:
        """The levels as float64 in [0, 1]."""
        return np.asarray(self.numerators, dtype=np.float64) / self.denominator

    @property
    def code_bits(self) -> int:
        """Bits of a signed level index in [-k, k]: ceil(log2(2k + 1))."""
        return int(2 * self.k).bit_length()


def uniform(k: int) -> Levels:
    """QSGD levels {0, 1/k, ..., 1}."""
    _check_k(k)
    return Levels(tuple(range(k + 1)))


def exponential(k: int) -> Levels:
    """NUQSGD levels {0, 2^-(k-1), ..., 1/2, 1}: k non-zero levels, i.e. s = k - 1."""
    _check_k(k)
    if k > 62:
        raise ValueError(f"exponential levels need k <= 62 non-zero levels, got {k}")
    return Levels((0,) + tuple(1 << j for j in range(k)))


def from_points(points: Sequence[float], denominator: int) -> Levels:
    """Snap increasing points in (0, 1] onto the grid j / denominator (distinct, last = 1).

    Stochastic rounding is unbiased for any level set, so snapping changes variance a
    little but never the mean.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 1 or np.any(pts <= 0) or np.any(pts > 1) or np.any(np.diff(pts) <= 0):
        raise ValueError(f"points must be strictly increasing in (0, 1], got {pts}")
    m = [0]
    for p in pts[:-1]:
        q = max(round(p * denominator), m[-1] + 1)
        m.append(q)
    if m[-1] >= denominator:
        raise ValueError(
            f"denominator {denominator} is too small to keep {len(pts)} distinct levels"
        )
    m.append(denominator)
    g = math.gcd(*m)  # the smallest grid: narrower sum fields in the allreduce protocol
    return Levels(tuple(q // g for q in m))


def levels_for_bits(bits: int) -> int:
    """Non-zero levels k that a signed code of `bits` bits can hold: 2^(bits-1) - 1."""
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 2 <= bits <= 8:
        raise ValueError(
            f"bits must be between 2 and 8 (one sign bit plus at least one level bit), got {bits}"
        )
    return (1 << (bits - 1)) - 1


def _check_k(k: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"the number of non-zero levels must be an int >= 1, got {k!r}")
