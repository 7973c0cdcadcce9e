"""Framework-agnostic multi-rank statistics: unbiasedness, variance and agreement checks.

Each rank calls `run_rounds` with a `reduce_once` that performs one compressed reduction of
its own gradient and returns the decoded average as a numpy array. Every rank can rebuild
every other rank's gradient from its seed, so the true average and the exact variance of
the decoded average are known in closed form and the tolerances are computed, not guessed.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

from horovod_nuq import reference
from horovod_nuq.schemes import Scheme


def rank_gradient(rank: int, d: int, seed: int = 1234) -> np.ndarray:
    """A gradient-like vector: Gaussian with a rank-dependent scale, a sparse part, some zeros."""
    rng = np.random.default_rng(seed + 7919 * rank)
    g = rng.standard_normal(d) * (0.5 + rank)
    g[rng.random(d) < 0.05] *= 20.0  # heavy entries
    g[rng.random(d) < 0.1] = 0.0
    return g.astype(np.float32)


def exact_variance_of_average(grads: list[np.ndarray], scheme: Scheme, shared: bool) -> np.ndarray:
    """Per-coordinate Var of (1/n) sum_i Q(g_i), ranks independent; shared => Max-agreed scales."""
    n = len(grads)
    scales = None
    if shared:
        scales = np.max([reference.bucket_scales(g, scheme) for g in grads], axis=0)
    return sum(reference.coordinate_variance(g, scheme, scales) for g in grads) / n**2


def run_rounds(reduce_once: Callable[[], np.ndarray], rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the decoded averages over `rounds`, and each round's decoded average."""
    outs = np.stack([np.asarray(reduce_once(), dtype=np.float64) for _ in range(rounds)])
    return outs.mean(axis=0), outs


def mean_z2(mean: np.ndarray, true: np.ndarray, var: np.ndarray, rounds: int) -> tuple[float, float]:
    """Mean squared z-score of the per-coordinate means, and its 6-sigma tolerance around 1."""
    live = var > 1e-12 * max(var.max(), 1e-30)
    z = (mean[live] - true[live]) / np.sqrt(var[live] / rounds)
    return float(np.mean(z * z)), 6.0 * np.sqrt(2.0 / live.sum())


def check_unbiased(mean: np.ndarray, true: np.ndarray, var: np.ndarray, rounds: int) -> float:
    """Assert the mean squared z-score is 1 within its tolerance; return it."""
    z2, tol = mean_z2(mean, true, var, rounds)
    assert abs(z2 - 1.0) < tol, f"mean z^2 = {z2:.3f}, expected 1 +- {tol:.3f}: biased or wrong variance"
    return z2


def check_variance(outs: np.ndarray, true: np.ndarray, var: np.ndarray) -> tuple[float, float]:
    """Measured E||avg - true||^2 against the exact value, within 5 standard errors."""
    err = np.sum((outs - true) ** 2, axis=1)
    measured, expected = float(err.mean()), float(var.sum())
    tol = 5.0 * float(err.std(ddof=1)) / np.sqrt(len(err))
    assert abs(measured - expected) < tol, f"variance {measured:.4g} vs exact {expected:.4g} (+- {tol:.3g})"
    assert measured > 0
    return measured, expected


def digest(x: np.ndarray) -> np.ndarray:
    """A 16-byte digest of an array's bytes, as uint8, for comparing results across ranks."""
    return np.frombuffer(hashlib.md5(np.ascontiguousarray(x).tobytes()).digest(), dtype=np.uint8).copy()


def check_near(out: np.ndarray, want: np.ndarray, var: np.ndarray, what: str = "") -> None:
    """One draw of a reduction is near its expectation: the squared error summed over
    coordinates is below 3x its exact expectation `var.sum()` (it concentrates around 1x over
    many coordinates), and a doubled or halved decode is far above it."""
    err = float(np.sum((np.asarray(out, np.float64) - want) ** 2))
    assert err <= 3.0 * float(var.sum()) + 1e-12, f"{what}: squared error {err:.4g} vs expected {var.sum():.4g}"


def assert_hsq_average(got: np.ndarray, grads: list[np.ndarray], scheme, factor: float) -> None:
    """`got`, a decoded HSQ reduction, against factor * the sum over ranks of each rank's HSQ
    oracle reconstruction with exact scalars (reference.hsq): equal to float32 precision at
    scalar_bits = 32; with quantized scalars, within what rounding each rank's scalars onto
    its own min-max grid can move a coordinate, |factor| sum_r step_r |c_k,i|, and off the
    exact value almost everywhere (the scalars were rounded, not sent whole). Chunks with a
    near tie of |c . x| on any rank (float32 may pick the other codeword) are left out."""
    from horovod_nuq import hsq

    codebook = hsq.codebook(scheme.codebook_size, scheme.dim, scheme.codebook_seed).astype(np.float64)
    want, slack, clear = 0.0, 0.0, True
    for g in grads:
        ref = reference.hsq(g, codebook, scheme.dim)
        want = want + ref.q
        clear = clear & np.repeat(ref.gap > 1e-5 * np.abs(ref.u), scheme.dim)[:g.size]
        if scheme.quantized_scalars:
            step = (ref.u.max() - ref.u.min()) / ((1 << scheme.scalar_bits) - 1)
            slack = slack + step * np.abs(codebook[ref.idx]).reshape(-1)[:g.size]
    want, slack = factor * want, abs(factor) * np.broadcast_to(slack, np.shape(want))
    got = np.asarray(got, np.float64).reshape(-1)
    assert got.shape == want.shape and clear.mean() > 0.95
    err = np.abs(got - want)[clear]
    tol = 1e-4 * np.abs(want[clear]) + 1e-5 * np.abs(want).max()
    worst = np.max(err - slack[clear] * (1 + 1e-5) - tol)
    assert worst <= 0, f"HSQ decode off the oracle by {worst:.3g} more than the rounding allows"
    if scheme.quantized_scalars:
        assert np.mean(err > tol) > 0.5, "quantized scalars decoded exactly: were they rounded?"
