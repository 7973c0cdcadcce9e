"""Variance: measured E||Q(v) - v||^2 = reference.variance, which stays under the bounds;
TNQ's mean squared error against the Laplace-model formula."""
from __future__ import annotations

import numpy as np
import pytest
from _helpers import FIGURES, draws, rounding_terms

from horovod_nuq import bounds, reference, schemes

BOUND = {"qsgd": bounds.qsgd, "qsgdinf": bounds.qsgd_inf, "nuqsgd": bounds.nuq}


def _data(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        return rng.standard_normal(n)
    if kind == "sparse":  # 2% non-zeros
        x = np.zeros(n)
        i = rng.choice(n, max(1, n // 50), replace=False)
        x[i] = rng.standard_normal(i.size)
        return x
    if kind == "cauchy":
        return rng.standard_cauchy(n)
    if kind == "constant":  # the worst case of the L2 bounds: every |v_i| / ||v|| = 1 / sqrt(d)
        return np.where(rng.random(n) < 0.5, -1.0, 1.0)
    if kind == "onehot":
        x = np.zeros(n)
        x[:: max(1, n // 7)] = 1.0
        return x
    raise ValueError(kind)


def _bucket_sq_norms(x, B):
    flat = np.asarray(x, np.float64).reshape(-1)
    return np.array([np.sum(flat[i:i + B] ** 2) for i in range(0, flat.size, B)])


def _bucket_max(x, B):
    flat = np.abs(np.asarray(x, np.float64).reshape(-1))
    return np.array([flat[i:i + B].max() for i in range(0, flat.size, B)])


def _bound(name, B, k, x):
    if name == "globalqsgd":  # shared max-norm scale R per bucket (one rank: R = max|v|)
        return bounds.global_linear(B, k) * float(np.sum(_bucket_max(x, B) ** 2))
    return BOUND[name](B, k) * float(np.sum(_bucket_sq_norms(x, B)))


@pytest.mark.parametrize("name", ["qsgd", "qsgdinf", "nuqsgd", "globalqsgd"])
@pytest.mark.parametrize("B", [64, 512, 2048])
def test_exact_variance_within_bound(name, B):
    worst = 0.0
    for bits in (2, 3, 4, 6):
        scheme = schemes.make_scheme(name, bits=bits, bucket_size=B)
        k = scheme.levels.k
        for kind in ("gauss", "sparse", "cauchy", "constant", "onehot"):
            x = _data(kind, 3 * B + B // 3, seed=bits * 7 + B)  # partial last bucket
            var = reference.variance(x, scheme)
            bound = _bound(name, B, k, x)
            assert var <= bound * (1 + 1e-12), (bits, kind, var, bound)
            worst = max(worst, var / bound)
    FIGURES[f"variance exact/bound max over data, bits 2-6: {name} B={B}"] = f"{worst:.3f}"
    assert worst > 0.02  # the data reach a fair fraction of the bound


def test_qsgd_bound_is_nearly_tight_on_constant_vectors():
    """For v = (+-1, ...) and s = 1, each coordinate has variance x(1-x), x = 1/sqrt(d):
    the exact variance is sqrt(d) - 1 against the bound sqrt(d) (checks both directions)."""
    B = 256
    scheme = schemes.make_scheme("qsgd", bits=2, bucket_size=B)
    x = _data("constant", B, 0)
    var = reference.variance(x, scheme)
    expected = B * (1 / np.sqrt(B)) * (1 - 1 / np.sqrt(B)) * B  # r^2 = ||v||^2 = B
    assert var == pytest.approx(expected, rel=1e-12)
    assert var / (bounds.qsgd(B, 1) * B) == pytest.approx(1 - 1 / np.sqrt(B), rel=1e-12)


def _exact_moments(x, r, lv):
    """Sum of per-coordinate E(Q_i - x_i)^2 and of Var((Q_i - x_i)^2), given the scales used.

    (Q - x)^2 is r^2 D^2 p^2 w.p. 1-p and r^2 D^2 q^2 w.p. p (q = 1 - p), so its variance is
    r^4 D^4 p q (q - p)^2; truncation adds the deterministic (|x| - r)_+^2.
    """
    _, lo, hi, p = rounding_terms(x, r, lv)
    D = hi - lo
    q = 1 - p
    clip = np.maximum(np.abs(x) - r, 0.0)
    mean = np.sum(r * r * D * D * p * q + clip ** 2)
    var = np.sum((r * D) ** 4 * p * q * (q - p) ** 2)  # a clipped coordinate is constant
    return float(mean), float(var)


CASES = [(n, b, kind) for n in ("qsgd", "qsgdinf", "nuqsgd", "globalqsgd")
         for b in (2, 4) for kind in ("gauss", "cauchy")] + [("nuqsgd", 6, "gauss"), ("qsgd", 8, "gauss")]


@pytest.mark.parametrize("name,bits,kind", CASES)
def test_measured_variance_matches_reference(name, bits, kind):
    B, T = 512, 400
    scheme = schemes.make_scheme(name, bits=bits, bucket_size=B)
    x = _data(kind, 4 * B, seed=bits)
    samples, r, x32 = draws(scheme, x, T, seed=11 * bits)
    err2 = np.sum((samples - x32) ** 2, axis=1)  # T draws of ||Q(v) - v||^2
    measured = float(err2.mean())
    exp_mean, exp_var = _exact_moments(x32, r, scheme.levels.values)
    ref = reference.variance(x32, scheme)
    assert ref == pytest.approx(exp_mean, rel=1e-5)  # float32 vs float64 scale only
    tol = 6 * np.sqrt(exp_var / T) + 1e-5 * ref
    assert abs(measured - ref) <= tol, (measured, ref, tol)
    bound = _bound(name, B, scheme.levels.k, x32)
    FIGURES[f"variance measured/exact, measured/bound: {name} bits={bits} {kind}"] = (
        f"{measured / ref:.4f}, {measured / bound:.4f}")


@pytest.mark.parametrize("B", [512, 4096])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_tnq_mse_on_laplace(bits, B):
    """Per-coordinate MSE of Q(v) against the unclipped v (truncation + rounding), Laplace(0, b).

    The exact expectation given the scales is checked to CLT precision; the model formula
    27 b^2 / (2k + 3 sqrt(6)/2)^2 is an approximation (worst-case Delta^2/4 rounding, alpha
    from the true b, no cap at max|v|), so only measured <= 1.5 x formula is required.
    """
    b = 0.37
    n = 1 << 17
    scheme = schemes.make_scheme("tnqsgd", bits=bits, bucket_size=B)
    k = scheme.levels.k
    x = np.random.default_rng(bits + B).laplace(0, b, n)
    samples, r, x32 = draws(scheme, x, 1, seed=bits)
    se = (samples[0] - x32) ** 2
    mse = float(se.mean())
    exp_mean, exp_var = _exact_moments(x32, r, scheme.levels.values)
    assert abs(mse * n - exp_mean) <= 6 * np.sqrt(exp_var) + 1e-5 * exp_mean
    formula = bounds.tnq_mse(k, b)
    FIGURES[f"TNQ MSE/formula B={B} bits={bits:d} (k={k})"] = (
        f"{mse / formula:.3f} (mse/b^2={mse / b**2:.5f}, formula/b^2={formula / b**2:.5f}, "
        f"mean alpha/b={np.mean(r) / b:.2f} vs alpha*/b={scheme.truncation:.2f})")
    assert mse <= 1.5 * formula
