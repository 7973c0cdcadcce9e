"""The sentinel-plus-gather transport on simulated ranks, and registration with Horovod."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _helpers import GatheringRank

import horovod_nuq as H
from horovod_nuq import wire


def _ranks(cls, n, world, **kw):
    return [cls(seed=i, protocol="allgather", collectives=GatheringRank(i, n, world), **kw) for i in range(n)]


REDUCTIONS = {"average": lambda s, n: s / n, "sum": lambda s, n: s,
              "scaled": lambda s, n: s * 0.5 * 3.0, "predivided": lambda s, n: s * 0.25 / n * 4.0}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("cls", [H.QSGDCompressor, H.NUQCompressor, H.TNQCompressor])
@pytest.mark.parametrize("n", [2, 3])
def test_sentinel_decodes_every_linear_reduction(cls, n, reduction):
    """decompress(reduced sentinel) = the reduction's factor times the sum of every rank's
    decoded codes, for Average, Sum and pre/postscale factors, on every rank alike."""
    world = {}
    comps = _ranks(cls, n, world, bucket_size=128)
    rng = np.random.default_rng(n)
    xs = [rng.standard_normal(700).astype(np.float32) * (i + 1) for i in range(n)]
    sent = [c.compress(x) for c, x in zip(comps, xs)]
    reduce = REDUCTIONS[reduction]
    reduced = reduce(np.sum([s for s, _ in sent], axis=0), n)
    gathered = np.concatenate([world[sent[0][1].name][i] for i in range(n)])
    total = comps[0].decompress_gathered(gathered, sent[0][1].tensor, average=False).astype(np.float64)
    outs = [c.decompress(reduced, ctx) for c, (_, ctx) in zip(comps, sent)]
    for out in outs:
        np.testing.assert_array_equal(out, outs[0])
    np.testing.assert_allclose(outs[0], reduce(total, n), rtol=1e-6, atol=1e-6 * np.abs(total).max())
    assert np.abs(total - np.sum(xs, axis=0)).max() < np.abs(np.sum(xs, axis=0)).max()
    assert comps[0].stats.total_bytes == comps[0].payload_bytes(700, n, "allgather") + 24


def test_sentinel_refuses_non_linear_reductions_and_mispairing():
    n, world = 2, {}
    comps = _ranks(H.QSGDCompressor, n, world)
    x = np.ones(600, np.float32)
    sent = [c.compress(x) for c in comps]
    with pytest.raises(ValueError, match="sentinel"):  # e.g. what Min or a negative scale leaves
        comps[0].decompress(-np.sum([s for s, _ in sent], axis=0), sent[0][1])
    # rank 1 gathers another same-size tensor first: its gather of x gets slot 1, rank 0's slot 0
    world = {}
    comps = _ranks(H.QSGDCompressor, n, world)
    first = comps[1].compress(np.zeros(600, np.float32))
    a, b = comps[0].compress(x), comps[1].compress(x)
    other = comps[0].compress(np.zeros(600, np.float32))  # pairs by name with rank 1's first
    reduced = a[0] + b[0]  # Horovod pairs the sentinels by parameter name: x with x
    for comp, ctx in ((comps[0], a[1]), (comps[1], b[1])):
        with pytest.raises(ValueError, match="different orders"):
            comp.decompress(reduced, ctx)
    assert (a[1].tag, b[1].tag, first[1].tag, other[1].tag) == (0, 1, 0, 1)


def test_slots_are_reused_step_after_step():
    """The same names every step (Horovod's response cache) and none twice in flight."""
    world = {}
    comp = _ranks(H.NUQCompressor, 1, world)[0]
    for _ in range(3):
        ctxs = [comp.compress(np.ones(n, np.float32))[1] for n in (10, 10, 20)]
        assert [c.name for c in ctxs] == ["horovod_nuq.g.10.0", "horovod_nuq.g.10.1", "horovod_nuq.g.20.0"]
        for c in ctxs:
            comp.decompress(wire.sentinel(c.tag), c)
    assert not any(comp.collectives.in_flight.values())


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("order", ["nuq_first", "horovod_first"])
@pytest.mark.parametrize("fw", ["torch", "tensorflow"])
def test_registration_in_either_import_order(fw, order):
    """`import horovod_nuq` registers with Horovod frontends imported before or after it, and
    each access of hvd.Compression.<name> is a new compressor (no shared counters, streams,
    process sets)."""
    pytest.importorskip(f"horovod.{fw}")
    imports = ["import horovod_nuq", f"import horovod.{fw} as hvd"]
    if order == "horovod_first":
        imports.reverse()
    out = _python("; ".join(imports) + "\n"
                  "a, b = hvd.Compression.nuq, hvd.Compression.nuq\n"
                  "names = [n for n in horovod_nuq.COMPRESSORS if isinstance(getattr(hvd.Compression, n), "
                  "horovod_nuq.COMPRESSORS[n])]\n"
                  "print(type(a).__name__, a is not b, a.stats is not b.stats, len(names))")
    assert out.split() == ["NUQCompressor", "True", "True", str(len(H.COMPRESSORS))]


def test_slots_of_an_abandoned_session_are_freed():
    """An elastic reset (Horovod's init() again) abandons operations in flight; their slots
    must not shift the names of the next session's gathers."""
    world = {}
    comp = _ranks(H.NUQCompressor, 1, world)[0]
    live = {"ok": True}
    comp.collectives.alive = lambda handle: live["ok"]
    comp.compress(np.ones(10, np.float32))  # never decompressed: the session dies
    live["ok"] = False
    assert comp.compress(np.ones(10, np.float32))[1].name == "horovod_nuq.g.10.0"
