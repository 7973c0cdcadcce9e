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


PER_WORKER = {"qsgd": qsgd, "qsgdinf": qsgd_inf, "nuqsgd": nuq}


def relative_variance(scheme: object) -> float | None:
    """omega with E||Q(v) - v||^2 <= omega ||v||^2 for one worker's own scales (gathered
    protocol), or None where no such bound exists (TNQ's truncation; Global-QSGD's shared scale)."""
    fn = PER_WORKER.get(getattr(scheme, "name", ""))
    return None if fn is None else fn(scheme.bucket_size, scheme.levels.k)
