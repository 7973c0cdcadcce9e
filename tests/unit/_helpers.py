"""Helpers shared by the unit tests: framework conversion, codec pipelines, exact statistics."""
from __future__ import annotations

import numpy as np
import pytest

from horovod_nuq import codec, collectives
from horovod_nuq.backends import backend_for

# Figures printed at the end of the run (see conftest.pytest_terminal_summary).
FIGURES: dict[str, str] = {}

FRAMEWORKS = ("numpy", "torch", "tensorflow")

# Scheme name and keyword options used across tests.
UNBIASED_SCHEMES = ("qsgd", "qsgdinf", "nuqsgd", "globalqsgd")
ALL_SCHEMES = UNBIASED_SCHEMES + ("tnqsgd",)


def framework(fw: str):
    if fw == "torch":
        return pytest.importorskip("torch")
    if fw == "tensorflow":
        return pytest.importorskip("tensorflow")
    return np


def to_fw(fw: str, a: np.ndarray, dtype: str | None = None):
    """A numpy array as a tensor of framework `fw` (optionally cast to `dtype`)."""
    a = np.asarray(a)
    if fw == "numpy":
        return a if dtype is None else a.astype(dtype)
    if fw == "torch":
        torch = framework("torch")
        t = torch.from_numpy(np.array(a, order="C"))  # keeps 0-d arrays 0-d
        return t if dtype is None else t.to(getattr(torch, dtype))
    tf = framework("tensorflow")
    t = tf.constant(a)
    return t if dtype is None else tf.cast(t, getattr(tf, dtype))


def to_np(t) -> np.ndarray:
    """Any tensor as a numpy array (float16/bfloat16 widened to float32/float64 as needed)."""
    if isinstance(t, np.ndarray):
        return t
    mod = type(t).__module__
    if mod.startswith("torch"):
        import torch
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.detach().cpu().numpy()
    import tensorflow as tf
    if t.dtype == tf.bfloat16:
        t = tf.cast(t, tf.float32)
    return t.numpy()


def fw_dtype_name(t) -> str:
    return backend_for(t).dtype_name(t)


def codec_roundtrip(fw: str, x: np.ndarray, scheme, u: np.ndarray):
    """Decode Q(x) through the codec on framework `fw` with uniforms `u` [n_buckets, B].

    Returns (decoded values as float64 numpy of x's shape, scales r as float64 numpy).
    """
    t = to_fw(fw, np.asarray(x, np.float32))
    xp = backend_for(t)
    tables = codec.Tables(scheme)
    numel = int(np.size(x))
    v = codec.to_buckets(xp, t, scheme.bucket_size)
    r = codec.local_scale(xp, v, scheme, numel)
    idx = codec.quantize(xp, v, r, tables, to_fw(fw, np.asarray(u, np.float32)))
    q = codec.dequantize(xp, idx, r, tables)
    y = codec.from_buckets(xp, q, numel, np.shape(x), "float32")
    return to_np(y).astype(np.float64), to_np(r).astype(np.float64)


def _draw_backend():
    try:
        import torch  # noqa: F401
        return "torch"
    except ImportError:  # pragma: no cover
        return "numpy"


def draws(scheme, x: np.ndarray, T: int, seed: int = 0, u_const: float | None = None):
    """T independent draws of Q(x) from the codec (torch backend when available, else numpy).

    Returns (samples [T, n] float64, per-coordinate float32 scale r as float64 [n],
    the float32 input as float64 [n]).  All T draws are done in one batched call by
    stacking T copies of the buckets.
    """
    fw = _draw_backend()
    x32 = np.asarray(x, np.float32).reshape(-1)
    n = x32.size
    B = scheme.bucket_size
    t = to_fw(fw, x32)
    xp = backend_for(t)
    tables = codec.Tables(scheme)
    v = codec.to_buckets(xp, t, B)
    r = codec.local_scale(xp, v, scheme, n)
    nb = xp.shape(v)[0]
    v_np, r_np = to_np(v), to_np(r)
    vrep = to_fw(fw, np.tile(v_np, (T, 1)))
    rrep = to_fw(fw, np.tile(r_np, T))
    if u_const is not None:
        u = np.full((T * nb, B), u_const, np.float32)
    else:
        u = np.random.default_rng(seed).random((T * nb, B), dtype=np.float32)
    idx = codec.quantize(xp, vrep, rrep, tables, to_fw(fw, u))
    q = to_np(codec.dequantize(xp, idx, rrep, tables)).astype(np.float64)
    samples = q.reshape(T, nb * B)[:, :n]
    r_coord = np.repeat(r_np.astype(np.float64), B)[:n]
    return samples, r_coord, x32.astype(np.float64)


def rounding_terms(x: np.ndarray, r: np.ndarray, level_values: np.ndarray):
    """Per coordinate: x_clipped = min(|x|/r, 1), bracketing levels lo/hi and p = P(round up).

    Coordinates with r == 0 get x = 0 (the codec outputs exact zeros there).
    """
    lv = np.asarray(level_values, np.float64)
    safe = np.where(r > 0, r, 1.0)
    xn = np.where(r > 0, np.minimum(np.abs(x) / safe, 1.0), 0.0)
    j = np.clip(np.searchsorted(lv, xn, side="right") - 1, 0, len(lv) - 2)
    lo, hi = lv[j], lv[j + 1]
    p = (xn - lo) / (hi - lo)
    return xn, lo, hi, p


def exact_coordinate_variance(x, r, level_values):
    """Exact Var[Q(x)_i] = r^2 (hi - x)(x - lo) of stochastic rounding, per coordinate."""
    xn, lo, hi, _ = rounding_terms(x, r, level_values)
    return r * r * (hi - xn) * (xn - lo)


def unbiasedness_check(samples, x, r, level_values, sigmas: float = 6.0):
    """Test H0: E[Q(x)] = x from T draws.

    Coordinates with T p (1-p) >= 1 contribute z_i = (mean_i - x_i) / sqrt(var_i / T); under H0
    each z_i^2 has mean 1 and (binomial fourth moment) variance 2 - 6/T + 1/(T p (1-p)), so the
    mean of z^2 must lie within `sigmas` standard errors of 1.  Coordinates with zero rounding
    variance (on a level, zero, or clipped) must be reproduced exactly in every draw.

    Returns a dict with ok, mean_z2, tol, d_eff, zero_var_max_err.
    """
    T = samples.shape[0]
    mean = samples.mean(axis=0)
    _, lo, hi, p = rounding_terms(x, r, level_values)
    pq = p * (1 - p)
    var = r * r * (hi - lo) ** 2 * pq
    sel = T * pq >= 1
    d_eff = int(sel.sum())
    z2 = (mean[sel] - x[sel]) ** 2 / (var[sel] / T)
    var_z2 = 2 - 6 / T + 1 / (T * pq[sel])
    mean_z2 = float(z2.mean())
    tol = sigmas * float(np.sqrt(var_z2.sum())) / d_eff
    zero = pq == 0
    err0 = np.abs(samples[:, zero] - x[zero]) / np.maximum(r[zero], 1e-30)
    zero_var_max_err = float(err0.max()) if err0.size else 0.0
    ok = abs(mean_z2 - 1) <= tol and zero_var_max_err <= 1e-5
    return {"ok": ok, "mean_z2": mean_z2, "tol": tol, "d_eff": d_eff,
            "zero_var_max_err": zero_var_max_err}


class SimulatedRank(collectives.LocalCollectives):
    """Rank `rank` of `ranks`: its Max allreduce returns `agreed` (default: its input), and
    the settings it gathers for error messages are `texts` (default: its own, on every rank)."""

    def __init__(self, rank: int, ranks: int, agreed=None, texts=None) -> None:
        super().__init__()
        self._rank, self._ranks, self._agreed, self._texts = rank, ranks, agreed, texts

    def rank(self) -> int:
        return self._rank

    def size(self, process_set=None) -> int:
        return self._ranks

    def allreduce_max(self, x, process_set=None, name=None):
        return x if self._agreed is None else self._agreed

    def gather_text(self, text, process_set=None) -> list:
        return [text] * self._ranks if self._texts is None else [text, *self._texts]


class GatheringRank(collectives.LocalCollectives):
    """Rank `rank` of `ranks` whose allgathers are collected in `world` by name and return
    every rank's payload in rank order (in the payloads' framework) once all have submitted."""

    stable_names = True

    def __init__(self, rank: int, ranks: int, world: dict) -> None:
        super().__init__()
        self._rank, self._ranks, self.world = rank, ranks, world

    def rank(self) -> int:
        return self._rank

    def size(self, process_set=None) -> int:
        return self._ranks

    def allgather_async(self, x, name, process_set=None):
        self.world.setdefault(name, {})[self._rank] = x
        return name

    def wait(self, handle):
        parts = self.world[handle]
        assert len(parts) == self._ranks, f"{handle}: only ranks {sorted(parts)} submitted"
        ordered = [parts[i] for i in range(self._ranks)]
        return backend_for(ordered[0]).concat(ordered)
