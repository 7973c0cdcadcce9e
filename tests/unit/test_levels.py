"""Level sets: exactly the documented values, and TNQ's closed form."""
from __future__ import annotations

import math

import numpy as np
import pytest

from horovod_nuq import bounds, codec, schemes, tnq
from horovod_nuq import levels as L


@pytest.mark.parametrize("k", [1, 2, 3, 7, 15, 31, 63, 127])
def test_uniform_levels_are_j_over_k(k):
    lv = L.uniform(k)
    assert lv.k == k
    assert lv.denominator == k
    assert lv.numerators == tuple(range(k + 1))
    np.testing.assert_array_equal(lv.values, np.arange(k + 1) / k)


@pytest.mark.parametrize("k", [1, 2, 3, 7, 15, 31, 62])
def test_exponential_levels_are_powers_of_two(k):
    lv = L.exponential(k)
    expected = [0.0] + [2.0 ** -(k - 1 - j) for j in range(k)]  # {0, 2^-(k-1), ..., 1/2, 1}
    assert lv.k == k
    np.testing.assert_array_equal(lv.values, np.array(expected))
    assert lv.values[-1] == 1.0 and lv.values[1] == 2.0 ** -(k - 1)
    if k >= 2:
        assert lv.values[-2] == 0.5


def test_exponential_levels_reject_k_above_62():
    with pytest.raises(ValueError, match="k <= 62"):
        L.exponential(63)


@pytest.mark.parametrize("bits,k", [(2, 1), (3, 3), (4, 7), (5, 15), (6, 31), (7, 63), (8, 127)])
def test_bits_to_levels(bits, k):
    assert L.levels_for_bits(bits) == k
    s = schemes.make_scheme("qsgd", bits=bits)
    assert s.levels.k == k
    assert len(s.levels.values) == k + 1
    assert s.code_bits == bits  # signed index in [-k, k] fits exactly `bits` bits
    assert 2 * k + 1 <= 2 ** bits < 2 * (2 * k + 1)


def test_bits4_gives_seven_levels_for_every_scheme():
    for name in ("qsgd", "qsgdinf", "nuqsgd", "tnqsgd", "globalqsgd"):
        s = schemes.make_scheme(name, bits=4)
        assert s.levels.k == 7, name
        assert s.code_bits == 4, name


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 63, 64, 100, 127])
def test_code_bits_is_ceil_log2_of_2k_plus_1(k):
    assert L.uniform(k).code_bits == math.ceil(math.log2(2 * k + 1))


def test_levels_value_checks():
    with pytest.raises(ValueError, match="strictly increase"):
        L.Levels((0, 2, 1))
    with pytest.raises(ValueError, match="start at 0"):
        L.Levels((1, 2))
    with pytest.raises(ValueError, match="too small"):
        L.from_points([0.1, 0.2, 0.3, 1.0], denominator=3)
    with pytest.raises(ValueError, match="strictly increasing"):
        L.from_points([0.5, 0.4, 1.0], denominator=64)


def _closed_form_points(k: int, b: float = 1.0) -> np.ndarray:
    """docs/schemes.md §4, written independently: quantiles of exp(-|g|/3b) on [-a*, a*],
    s = 2k intervals, a* = 3b ln(1 + sqrt(6) s / 9); returns positive points / a*."""
    s = 2 * k
    alpha = 3 * b * math.log(1 + math.sqrt(6) * s / 9)
    zj = (2 * np.arange(k + 1, s + 1) / s) - 1  # the k positive quantiles z_j in (0, 1]
    x = -3 * b * np.log(1 - zj * (1 - math.exp(-alpha / (3 * b))))
    return x / alpha, alpha / b


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_tnq_levels_follow_closed_form(bits):
    s = schemes.make_scheme("tnqsgd", bits=bits)
    k = s.levels.k
    vals = s.levels.values
    assert vals[0] == 0.0 and vals[-1] == 1.0
    assert np.all(np.diff(vals) > 0)
    assert np.all(vals[1:] > 0) and np.all(vals <= 1)
    pts, c = _closed_form_points(k)
    assert s.truncation == pytest.approx(c, rel=1e-12)
    np.testing.assert_allclose(tnq.level_points(k, c), pts, rtol=1e-12, atol=1e-12)
    # snapped onto the grid j / (8k) (then reduced by the numerators' gcd): within half a
    # grid step of the closed form
    assert (8 * k) % s.levels.denominator == 0
    assert np.max(np.abs(vals[1:] - pts)) <= 0.5 / (8 * k) + 1e-12


@pytest.mark.parametrize("k", [1, 3, 7, 15, 127])
def test_tnq_threshold_minimizes_model_error(k):
    """alpha* and the error formula are the minimum of 27 b^2 (1-u)^3 / s^2 + 2 b^2 u^3,
    u = exp(-alpha / 3b), s = 2k (docs/schemes.md §4), found numerically here."""
    minimize_scalar = pytest.importorskip("scipy.optimize").minimize_scalar

    s, b = 2 * k, 1.7

    def err(alpha):
        u = math.exp(-alpha / (3 * b))
        return 27 * b * b * (1 - u) ** 3 / s**2 + 2 * b * b * u**3

    res = minimize_scalar(err, bounds=(1e-6, 60 * b), method="bounded",
                          options={"xatol": 1e-10})
    assert res.x == pytest.approx(tnq.optimal_truncation(k) * b, rel=1e-5)
    assert res.fun == pytest.approx(bounds.tnq_mse(k, b), rel=1e-9)
    assert tnq.error_per_coordinate(k, b) == pytest.approx(bounds.tnq_mse(k, b), rel=1e-12)


def test_tables_signed_values_are_symmetric():
    for name in ("qsgd", "nuqsgd", "tnqsgd"):
        s = schemes.make_scheme(name, bits=4)
        t = codec.Tables(s)
        sv = t._host["signed_values"]
        sn = t._host["signed_numerators"]
        assert len(sv) == 2 * s.levels.k + 1
        np.testing.assert_array_equal(sv, -sv[::-1])
        np.testing.assert_array_equal(sn, -sn[::-1])
        np.testing.assert_allclose(sv, sn / s.levels.denominator, rtol=1e-7)
