"""Error feedback (memory.py) on one process: its invariant, bounded residuals, state, errors."""
from __future__ import annotations

import numpy as np
import pytest
from _helpers import framework, to_fw, to_np

from horovod_nuq import bounds
from horovod_nuq.collectives import LOCAL
from horovod_nuq.compressor import COMPRESSORS
from horovod_nuq.memory import ErrorFeedback, gamma_for

PER_RANK = ("qsgd", "qsgdinf", "nuq", "tnq")
STEPS, D = 60, 3000


def gradient(rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
    g = rng.standard_normal(D)
    g[::7] *= 10  # heavy coordinates, which TNQ clips
    return g.astype(dtype)


def send(comp, g, protocol: str, path: str, key: str = "w"):
    """What one rank's step decodes to (here: its own gamma * Q(g + e)), by each public path."""
    if path == "gathered":
        payload, ctx = comp.compress_for_allgather(g, key=key)
        return comp.decompress_gathered(payload, ctx)
    if path == "agreed":
        scale = comp.agree_scales([g], [key])[0]
        return comp.decompress(*comp.compress(g, scale=scale, key=key))
    return comp.decompress(*comp.compress(g, key=key))


PATHS = [("allgather", "gathered"), ("allgather", "compress"), ("allreduce", "compress"),
         ("allreduce", "agreed")]


@pytest.mark.parametrize("protocol,path", PATHS)
@pytest.mark.parametrize("name", PER_RANK + ("globalqsgd",))
@pytest.mark.parametrize("bits", [2, 4])
def test_sent_plus_residual_is_every_gradient(name, bits, protocol, path):
    """sum_t sent_t + e_T == sum_t g_t: nothing is lost, however biased the compressor."""
    if name == "globalqsgd" and protocol == "allgather":
        pytest.skip("Global-QSGD only has the allreduce protocol")
    comp = COMPRESSORS[name](bits=bits, seed=3, protocol=protocol, collectives=LOCAL, error_feedback=True)
    rng = np.random.default_rng(5)
    total_g, total_sent, scale = np.zeros(D), np.zeros(D), 0.0
    for _ in range(STEPS):
        g = gradient(rng)
        total_g += g
        total_sent += send(comp, g, protocol, path)
        scale += np.abs(g).max()
    gap = np.abs(total_sent + comp.memory.residual("w") - total_g).max()
    # float64 rounding only: each step adds and subtracts values of magnitude <= scale
    assert gap <= 64 * np.finfo(np.float64).eps * scale * STEPS, gap
    assert np.abs(total_sent - total_g).max() > 1e3 * gap  # the residual is what closes the gap


@pytest.mark.parametrize("name", ["qsgd", "qsgdinf", "nuq"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_residual_stays_under_the_contraction_bound(name, bits):
    """With gamma = 1 / (1 + omega), C = gamma Q is a delta = gamma contraction, and
    E||e||^2 <= 2 (1 - d)(1 + 2/d) / d * G^2 for ||g||^2 <= G^2 (d = delta; derived in the
    test's docstring: e_t = x_t - C(x_t), x_t = g_t + e_(t-1), Young's inequality with rho = d/2)."""
    comp = COMPRESSORS[name](bits=bits, seed=1, protocol="allgather", collectives=LOCAL,
                             error_feedback=True)
    d = comp.memory.gamma
    omega = bounds.relative_variance(comp.scheme)
    assert d == (1 / (1 + omega) if omega >= 1 else 1.0)
    rng = np.random.default_rng(2)
    grads = [gradient(rng, np.float32) for _ in range(8)]
    g2 = max(float(np.sum(g.astype(np.float64) ** 2)) for g in grads)
    bound = 2 * (1 - d) * (1 + 2 / d) / d * g2 if d < 1 else 0.0
    worst = 0.0
    for t in range(200):
        send(comp, grads[t % 8], "allgather", "gathered")
        worst = max(worst, float(np.sum(comp.memory.residual("w").astype(np.float64) ** 2)))
    if d < 1:
        assert worst <= bound, (worst, bound)
    else:  # omega < 1: gamma = 1 is already contractive, the residual is a rounding error
        assert worst <= omega / (1 - omega) * g2 * 4


def test_without_gamma_a_two_bit_residual_explodes():
    """The negative control: gamma = 1 on 2-bit L2-scaled codes (omega ~ 22) is not contractive."""
    comp = COMPRESSORS["qsgd"](bits=2, seed=1, protocol="allgather", collectives=LOCAL,
                               error_feedback=1.0)
    rng = np.random.default_rng(2)
    g = gradient(rng, np.float32)
    for _ in range(60):
        send(comp, g, "allgather", "gathered")
    assert np.linalg.norm(comp.memory.residual("w")) > 100 * np.linalg.norm(g)


@pytest.mark.parametrize("fw", ["numpy", "torch", "tensorflow"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_residual_keeps_the_gradient_dtype_and_framework(fw, dtype):
    comp = COMPRESSORS["tnq"](bits=2, seed=1, protocol="allgather", collectives=LOCAL, error_feedback=True)
    g = to_fw(fw, gradient(np.random.default_rng(0)), dtype)
    send(comp, g, "allgather", "gathered")
    e = comp.memory.residual("w")
    assert type(e).__module__.split(".")[0] == type(g).__module__.split(".")[0]
    assert str(e.dtype).split(".")[-1].replace("'>", "") .endswith(dtype)
    np.testing.assert_allclose(to_np(comp.memory.state_dict()["w"]), to_np(e))


def test_state_dict_resumes_identically():
    """Saving after k steps and loading into a fresh compressor continues bit for bit."""
    def make():
        return COMPRESSORS["nuq"](bits=2, seed=9, protocol="allgather", collectives=LOCAL,
                                  error_feedback=True)
    rng = np.random.default_rng(4)
    grads = [gradient(rng, np.float32) for _ in range(10)]
    a = make()
    straight = [send(a, g, "allgather", "gathered") for g in grads]
    b = make()
    for g in grads[:5]:
        send(b, g, "allgather", "gathered")
    c = make()
    c.codec._draws = b.codec._draws  # the random stream is not checkpointed; the residual is
    c.memory.load_state_dict(b.memory.state_dict())
    resumed = [send(c, g, "allgather", "gathered") for g in grads[5:]]
    for x, y in zip(straight[5:], resumed):
        np.testing.assert_array_equal(x, y)
    d = make()  # without the residual the continuation differs
    d.codec._draws = make().codec._draws
    assert any(not np.array_equal(x, send(d, g, "allgather", "gathered")) for x, g in zip(straight[5:], grads[5:]))


def test_tf_function_carries_the_residual_between_runs():
    tf = framework("tensorflow")
    comp = COMPRESSORS["tnq"](bits=2, seed=1, protocol="allgather", collectives=LOCAL, error_feedback=True)
    eager = COMPRESSORS["tnq"](bits=2, seed=1, protocol="allgather", collectives=LOCAL, error_feedback=True)

    @tf.function
    def step(g):
        payload, ctx = comp.compress_for_allgather(g, key="w")
        return comp.decompress_gathered(payload, ctx)

    rng = np.random.default_rng(1)
    total_g, total_sent = 0, 0
    for _ in range(5):
        g = gradient(rng, np.float32)
        total_g = total_g + g.astype(np.float64)
        total_sent = total_sent + step(tf.constant(g)).numpy().astype(np.float64)
        send(eager, tf.constant(g), "allgather", "gathered")
    e = comp.memory.residual("w").numpy().astype(np.float64)
    np.testing.assert_allclose(total_sent + e, total_g, rtol=0, atol=1e-3)
    assert np.abs(e).max() > 1  # the residual did carry something


def test_errors_name_the_fix():
    comp = COMPRESSORS["tnq"](protocol="allgather", collectives=LOCAL, error_feedback=True)
    with pytest.raises(ValueError, match="which parameter"):
        comp.compress_for_allgather(np.ones(10, np.float32))
    comp.compress_for_allgather(np.ones(10, np.float32), key="w")
    with pytest.raises(ValueError, match="changed shape"):
        comp.compress_for_allgather(np.ones(11, np.float32), key="w")
    for bad in (0.0, 1.5, -1, "yes"):
        with pytest.raises(ValueError, match="error_feedback must be"):
            COMPRESSORS["qsgd"](error_feedback=bad)
    fresh = ErrorFeedback()
    fresh.load_state_dict({"w": np.zeros(3)})
    with pytest.raises(ValueError, match="saved residual"):
        fresh.compensate("w", np.ones(4))


def test_gamma_choice():
    scheme = COMPRESSORS["qsgd"](bits=2).scheme
    assert gamma_for(scheme, True) == pytest.approx(1 / (1 + np.sqrt(512)))
    assert gamma_for(COMPRESSORS["nuq"](bits=4).scheme, True) == 1.0  # omega < 1
    assert gamma_for(COMPRESSORS["tnq"](bits=2).scheme, True) == 1.0  # no bound: plain EF
    assert gamma_for(scheme, 0.5) == 0.5
    assert COMPRESSORS["qsgd"]().memory is None
