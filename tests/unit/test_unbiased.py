"""E[Q(v)] = v for the unbiased schemes; the check detects deterministic rounding and TNQ's bias."""
from __future__ import annotations

import numpy as np
import pytest
from _helpers import FIGURES, UNBIASED_SCHEMES, draws, unbiasedness_check

from horovod_nuq import schemes

T = 400
D = 2048
B = 512


def _vector(kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        return rng.standard_normal(D)
    if kind == "mixed":  # buckets of very different magnitude, zeros, heavy tails
        x = rng.standard_t(2, D) * np.repeat(10.0 ** rng.uniform(-3, 2, D // 64), 64)
        x[rng.random(D) < 0.05] = 0.0
        return x
    if kind == "laplace_outliers":
        x = rng.laplace(0, 1, D)
        x[::97] = rng.choice([-1, 1], x[::97].size) * 40.0
        return x
    raise ValueError(kind)


CASES = [(n, b, kind) for n in UNBIASED_SCHEMES for b in (2, 4) for kind in ("gauss", "mixed")]
CASES += [("nuqsgd", 6, "mixed"), ("qsgd", 8, "gauss"),
          ("globalqsgd", 3, "gauss")]


@pytest.mark.parametrize("name,bits,kind", CASES)
def test_unbiased(name, bits, kind):
    scheme = schemes.make_scheme(name, bits=bits, bucket_size=B)
    x = _vector(kind, seed=bits)
    samples, r, x32 = draws(scheme, x, T, seed=1 + bits)
    res = unbiasedness_check(samples, x32, r, scheme.levels.values)
    FIGURES[f"unbiased mean z^2 {name} bits={bits} {kind}"] = (
        f"{res['mean_z2']:.4f} (tol +-{res['tol']:.4f}, d_eff={res['d_eff']}, "
        f"6*sqrt(2/d_eff)={6 * np.sqrt(2 / res['d_eff']):.4f})")
    assert res["d_eff"] > D // 8
    assert res["ok"], res


@pytest.mark.parametrize("name", UNBIASED_SCHEMES)
def test_negative_control_deterministic_rounding_is_detected(name):
    """Round-to-nearest (u = 0.5 for every draw) is biased; the same check must reject it."""
    scheme = schemes.make_scheme(name, bits=4, bucket_size=B)
    x = _vector("gauss", seed=4)
    samples, r, x32 = draws(scheme, x, T, u_const=0.5)
    res = unbiasedness_check(samples, x32, r, scheme.levels.values)
    FIGURES[f"negative control (round to nearest) mean z^2 {name}"] = f"{res['mean_z2']:.1f}"
    assert not res["ok"]
    assert res["mean_z2"] > 1 + 10 * res["tol"]


def test_tnq_is_biased_on_heavy_tails():
    """TNQ clips at alpha = c * mean|v|: the outliers come back as +-alpha, a bias the check
    detects.  Relative to the clipped vector it is unbiased (stochastic rounding)."""
    scheme = schemes.make_scheme("tnqsgd", bits=4, bucket_size=B)
    assert not scheme.unbiased
    x = _vector("laplace_outliers", seed=9)
    samples, r, x32 = draws(scheme, x, T, seed=3)
    res = unbiasedness_check(samples, x32, r, scheme.levels.values)
    FIGURES["TNQ bias check on Laplace+outliers"] = (
        f"rejected={not res['ok']}, clipped-coordinate max |E Q - v| / alpha = "
        f"{res['zero_var_max_err']:.2f}, mean z^2 on in-range coordinates {res['mean_z2']:.4f}")
    assert not res["ok"]
    assert res["zero_var_max_err"] > 1.0  # outliers at 40 vs alpha ~ 4.7: error of several alpha
    # against the clipped input the same draws pass
    clipped = np.sign(x32) * np.minimum(np.abs(x32), r)
    res_c = unbiasedness_check(samples, clipped, r, scheme.levels.values)
    assert res_c["ok"], res_c


def test_check_has_power_against_small_bias():
    """Sanity of the test itself: a bias of 0.75 standard errors of the mean per coordinate
    (invisible coordinate by coordinate) is rejected."""
    scheme = schemes.make_scheme("qsgd", bits=4, bucket_size=B)
    x = _vector("gauss", seed=2)
    samples, r, x32 = draws(scheme, x, T, seed=8)
    res = unbiasedness_check(samples, x32, r, scheme.levels.values)
    assert res["ok"], res
    from _helpers import exact_coordinate_variance
    sd = np.sqrt(exact_coordinate_variance(x32, r, scheme.levels.values) / T)
    res_b = unbiasedness_check(samples + 0.75 * sd, x32, r, scheme.levels.values)
    assert not res_b["ok"], res_b
