"""Variance bounds E||Q(v) - v||^2 <= coefficient * ||v||^2 for one bucket of d coordinates.

s is the number of non-zero levels per sign (k). Where a bound is derived here rather than
quoted from a paper, the docstring says so (see docs/schemes.md).
"""
from __future__ import annotations

import math


def qsgd(d: int, s: int) -> float:
    """QSGD, Lemma 3.1 of arXiv 1610.02132: min(d / s^2, sqrt(d) / s)."""
    return min(d / s**2, math.sqrt(d) / s)


def qsgd_inf(d: int, s: int) -> float:
    """QSGDinf (max-norm scale; derived here): min(d / (4 s^2), sqrt(d) / s)."""
    return min(d / (4 * s**2), math.sqrt(d) / s)


def nuq(d: int, s: int) -> float:
    """NUQSGD with levels {0, 2^-(s-1), ..., 1}, L2 scale (derived here, see docs/schemes.md).

    Above the smallest level l1 the relative variance is at most 1/8 per coordinate; below
    it each coordinate adds at most min(l1^2 / 4, l1 |v_i| / r) r^2.
    """
    l1 = 2.0 ** -(s - 1)
    return 1 / 8 + min(d * l1 * l1 / 4, math.sqrt(d) * l1)


def global_linear(d: int, s: int) -> float:
    """Shared max-norm scale R >= ||v||_inf, linear levels: d R^2 / (4 s^2) relative to R^2 (derived)."""
    return d / (4 * s**2)


def tnq_mse(s: int, b: float = 1.0) -> float:
    """TNQSGD mean squared error per coordinate for Laplace(0, b) coordinates at alpha*
    (truncation plus rounding): 27 b^2 / (2s + 3 sqrt(6) / 2)^2, arXiv 2402.01160."""
    return 27.0 * b * b / (2 * s + 3 * math.sqrt(6) / 2) ** 2


def qsgd_elias_applies(d: int, s: int) -> bool:
    """Whether Theorem 3.2 of arXiv 1610.02132 covers (d, s): its condition s^2 + sqrt(d) <= d/2."""
    return s * s + math.sqrt(d) <= d / 2


def qsgd_elias_bits(d: int, s: int) -> float:
    """Expected bits of QSGD's Elias code (Code_s) for one vector of d coordinates and s levels:
    Theorem 3.2 of arXiv 1610.02132 (the paper's theorem; the NeurIPS Theorem 3.4 prints
    s^2 + sqrt(d) where s(s + sqrt(d)) belongs),

        (3 + (3/2) log2(2 (s^2 + d) / (s (s + sqrt d)))) s (s + sqrt d) + 32,

    for any v, in expectation over the rounding, when s^2 + sqrt(d) <= d/2
    (`qsgd_elias_applies`); 32 bits are the float32 norm. The theorem's factor is
    (3/2 + o(1)): the o(1) term (vanishing as d grows) is dropped here, so this is the
    asymptotic bound, not a hard one for small d. Its proof counts the non-zeros by
    Lemma 3.1(iii), E||Q_s(v)||_0 <= s (s + sqrt d)."""
    if s < 1 or d < 1:
        raise ValueError(f"need d >= 1 and s >= 1, got d={d}, s={s}")
    nnz = s * (s + math.sqrt(d))
    return (3 + 1.5 * math.log2(2 * (s * s + d) / nnz)) * nnz + 32
