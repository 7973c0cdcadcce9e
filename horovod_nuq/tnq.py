"""TNQSGD's truncation threshold and level placement (arXiv 2402.01160), Laplace model.

For Laplace(0, b) coordinates, clipping at alpha and placing s = 2k intervals on
[-alpha, alpha] with density lambda(g) ~ exp(-|g| / 3b) gives the truncation-plus-rounding
error 27 b^2 / (s + 3 sqrt(6) / 2)^2 per coordinate at alpha* = 3 b ln(1 + sqrt(6) s / 9).
See docs/schemes.md for the derivation and what was checked against the paper.
"""
from __future__ import annotations

import math

import numpy as np

from . import levels as L

KAPPA = 3 * math.sqrt(6) / 2


def optimal_truncation(k: int) -> float:
    """alpha* / b for k non-zero levels per sign (s = 2k intervals on [-alpha, alpha])."""
    return 3.0 * math.log1p(2 * k / KAPPA)


def level_points(k: int, c: float) -> np.ndarray:
    """Level positions t_j / alpha, j = 1..k, for density ~ exp(-g / 3b) on [0, alpha = c b]."""
    j = np.arange(1, k + 1, dtype=np.float64)
    mass = -np.expm1(-c / 3.0)
    t = -3.0 * np.log1p(-(j / k) * mass) / c
    t[-1] = 1.0  # exact top level (alpha itself)
    return t


def tnq_levels(k: int, c: float, denominator: int | None = None) -> L.Levels:
    """The levels on an integer grid (default 8k steps), so shared-scale sums stay exact."""
    return L.from_points(level_points(k, c), denominator or 8 * k)


def error_per_coordinate(k: int, b: float = 1.0) -> float:
    """Truncation plus rounding mean squared error per coordinate at alpha*, Laplace(0, b)."""
    return 27.0 * b * b / (2 * k + KAPPA) ** 2
