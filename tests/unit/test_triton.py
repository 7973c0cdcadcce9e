"""The Triton engine (GPU path) against the fused C kernels: same payloads, same decoded bits.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before
triton is imported) on CPU tensors; skipped when triton is not installed. scripts/gpu_check.py
runs the same comparisons on a GPU.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import horovod_nuq as H
from horovod_nuq import engines, engines_cuda, kernels, reference, wire
from horovod_nuq.backends import backend_for

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no C compiler for the fused kernels")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CLASSES = [H.QSGDCompressor, H.QSGDInfCompressor, H.NUQCompressor, H.TNQCompressor, H.GlobalQSGDCompressor]


class _Key:
    def __init__(self, key):
        self._key = key

    def key(self):
        return self._key


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * rng.random(n) ** 3).astype(np.float32)
    x[rng.random(n) < 0.1] = 0.0
    return x


def _pair(comp):
    xp = backend_for(torch.zeros(1))
    lib = kernels.load()
    return (engines_cuda.TritonEngine(xp, comp.scheme, comp.codec.tables),
            engines.FusedEngine(xp, comp.scheme, comp.codec.tables, lib))


def _on(t):
    return t.to(DEV)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("n,bucket", [(2001, 512), (1, 300), (1000, 300), (0, 512)])
def test_triton_stages_match_the_c_kernels_bit_for_bit(cls, n, bucket):
    comp = cls(bucket_size=bucket, protocol="allreduce")
    tri, cpu = _pair(comp)
    x = torch.from_numpy(_data(n))
    xg, r = tri.scales(_on(x), n)
    _, rc = cpu.scales(x, n)
    np.testing.assert_allclose(r.cpu().numpy(), rc.numpy(), rtol=2e-7)  # sum order may differ on a GPU
    nb = rc.numel()
    codes = tri.encode_codes(xg, _on(rc), _Key(0xDEADBEEF12345))
    codes_c = cpu.encode_codes(cpu.work(x), rc, _Key(0xDEADBEEF12345))
    assert codes.device.type == DEV and codes.dtype == torch.uint8 and codes.numel() == codes_c.numel()
    if DEV == "cpu":  # the interpreter computes like the C code; compiled GPU code may contract (fma)
        assert torch.equal(codes, codes_c)
    acc = tri.decode_codes(_on(codes_c), _on(rc), nb, None, 1.0)
    acc = tri.decode_codes(_on(codes_c), _on(rc), nb, acc, 0.5)
    acc_c = cpu.decode_codes(codes_c, rc, nb, cpu.decode_codes(codes_c, rc, nb, None, 1.0), 0.5)
    assert torch.equal(tri.finish_codes(acc, None, nb).cpu(), cpu.finish_codes(acc_c, x, nb))
    layout = comp.codec.layout(3)
    words = tri.encode_sums(xg, _on(rc), layout, _Key(77))
    words_c = cpu.encode_sums(cpu.work(x), rc, layout, _Key(77))
    assert words.dtype == torch.float64 and words.numel() == words_c.numel()
    if DEV == "cpu":
        assert torch.equal(words, words_c)
    reduced = words_c * 3 * 0.37  # three ranks' worth of sums under a prescale
    assert torch.equal(tri.decode_sums(_on(reduced), _on(rc), layout, nb).cpu(),
                       cpu.decode_sums(reduced, rc, layout, nb))


@pytest.mark.parametrize("cls", [H.QSGDCompressor, H.NUQCompressor], ids=lambda c: c.__name__)
@pytest.mark.parametrize("bits", [2, 3, 5, 6, 8])
def test_triton_every_code_width_matches_the_c_kernels(cls, bits):
    if cls is H.NUQCompressor and bits > 6:
        pytest.skip("NUQSGD has at most 62 levels")
    comp = cls(bits=bits, bucket_size=200)
    tri, cpu = _pair(comp)
    x = torch.from_numpy(_data(1001))
    xg, _ = tri.scales(_on(x), 1001)
    _, rc = cpu.scales(x, 1001)
    nb = rc.numel()
    codes_c = cpu.encode_codes(cpu.work(x), rc, _Key(3))
    if DEV == "cpu":
        assert torch.equal(tri.encode_codes(xg, _on(rc), _Key(3)), codes_c)
    shifted = torch.zeros(codes_c.numel() + 1, dtype=torch.uint8)
    shifted[1:] = codes_c  # a misaligned view, as inside a gathered payload
    acc = tri.decode_codes(_on(shifted)[1:], _on(rc), nb, None, 0.25)
    assert torch.equal(tri.finish_codes(acc, None, nb).cpu(), cpu.finish_codes(cpu.decode_codes(codes_c, rc, nb, None, 0.25), x, nb))
    try:
        layout = comp.codec.layout(2)
    except ValueError:  # too wide for summable words
        return
    words_c = cpu.encode_sums(cpu.work(x), rc, layout, _Key(4))
    if DEV == "cpu":
        assert torch.equal(tri.encode_sums(xg, _on(rc), layout, _Key(4)), words_c)
    assert torch.equal(tri.decode_sums(_on(words_c * 2), _on(rc), layout, nb).cpu(),
                       cpu.decode_sums(words_c * 2, rc, layout, nb))


@pytest.mark.parametrize("per_word", [False, True])
def test_triton_both_sum_decoders_match_the_c_kernels(per_word):
    comp = H.TNQCompressor(bucket_size=100)
    tri, cpu = _pair(comp)
    tri.SHAPES = {**tri.SHAPES, "decode_sums": (256, 4, per_word)}
    x = torch.from_numpy(_data(1500))
    _, rc = cpu.scales(x, 1500)
    layout = comp.codec.layout(4)
    words = cpu.encode_sums(cpu.work(x), rc, layout, _Key(8))
    words[:-1] *= 1.3  # the words alone rescaled: not integers after undoing the sentinel's scale
    with pytest.raises(ValueError, match="not integer"):
        tri.decode_sums(_on(words), _on(rc), layout, rc.numel())
    words = cpu.encode_sums(cpu.work(x), rc, layout, _Key(8)) * 2.5
    assert torch.equal(tri.decode_sums(_on(words), _on(rc), layout, rc.numel()).cpu(),
                       cpu.decode_sums(words, rc, layout, rc.numel()))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_triton_reads_narrow_and_wide_floats_like_their_float32_cast(dtype):
    comp = H.NUQCompressor(bucket_size=256)
    tri, cpu = _pair(comp)
    x = torch.from_numpy(_data(1000)).to(getattr(torch, dtype))
    xg, r = tri.scales(_on(x), 1000)
    _, rc = cpu.scales(x.float(), 1000)
    np.testing.assert_allclose(r.cpu().numpy(), rc.numpy(), rtol=2e-7)
    if DEV == "cpu":
        assert torch.equal(tri.encode_codes(xg, rc, _Key(5)), cpu.encode_codes(cpu.work(x.float()), rc, _Key(5)))


def test_triton_nonfinite_bucket_gets_an_infinite_scale():
    comp = H.QSGDCompressor()
    tri, _ = _pair(comp)
    x = torch.from_numpy(_data(1024))
    x[5] = float("nan")
    x[600] = float("inf")
    _, r = tri.scales(_on(x), 1024)
    assert torch.isinf(r).all()


def test_triton_decoders_refuse_corrupt_payloads():
    comp = H.QSGDCompressor(bits=3)  # k = 3: codes 7 are invalid
    tri, _ = _pair(comp)
    r = _on(torch.ones(2))
    codes = _on(torch.full((wire.packed_code_bytes(1024, 3),), 255, dtype=torch.uint8))
    acc = tri.decode_codes(codes, r, 2, None)
    with pytest.raises(ValueError, match="exceeds 2k"):
        tri.finish_codes(acc, None, 2)
    layout = comp.codec.layout(1)
    good = tri.encode_sums(tri.work(_on(torch.ones(1024))), r, layout, _Key(1))
    half = good.clone()
    half[0] += 0.5
    with pytest.raises(ValueError, match="not integer"):
        tri.decode_sums(half, r, layout, 2)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        p = good.clone()
        p[-1] = bad
        with pytest.raises(ValueError, match="sentinel"):
            tri.decode_sums(p, r, layout, 2)
    with pytest.raises(ValueError, match="float64 words"):
        tri.decode_sums(good[:-2], r, layout, 2)


def _roundtrip(comp, x):
    if comp.protocol == "allreduce":
        p, ctx = comp.compress(x)
        return comp.decompress(p, ctx)
    p, ctx = comp.compress_for_allgather(x)
    return comp.decompress_gathered(p, ctx)


def _through_triton(comp):
    """Route the compressor's tensors to the Triton engine (on CPU tensors under the interpreter)."""
    tri, _ = _pair(comp)
    comp.codec.engine = lambda xp, tensor: tri
    return comp


@pytest.mark.parametrize("cls,protocol", [(H.NUQCompressor, "allreduce"), (H.QSGDCompressor, "allgather"),
                                          (H.TNQCompressor, "allgather")], ids=str)
def test_triton_is_unbiased_with_the_exact_variance(cls, protocol):
    """As test_fused_is_unbiased_with_the_exact_variance: z^2 of the mean over T runs averages 1."""
    n, T = 600, 120
    x = _data(n)
    comp = _through_triton(cls(seed=7, protocol=protocol, bucket_size=128))
    xt = _on(torch.from_numpy(x))
    outs = np.stack([_roundtrip(comp, xt).cpu().numpy() for _ in range(T)]).astype(np.float64)
    scales = reference.bucket_scales(x, comp.scheme).repeat(128)[:n]
    var = reference.coordinate_variance(x, comp.scheme)
    target = x if comp.scheme.unbiased else np.clip(x, -scales, scales)
    live = var > 0
    z = (outs.mean(0)[live] - target[live]) / np.sqrt(var[live] / T)
    assert abs(np.mean(z * z) - 1) < 6 * np.sqrt(2 / live.sum()), np.mean(z * z)
    np.testing.assert_allclose(outs[:, ~live], np.broadcast_to(target[~live], outs[:, ~live].shape), rtol=1e-6)


def test_compressor_picks_triton_for_gpu_tensors_only():
    comp = H.NUQCompressor()
    xp = backend_for(torch.zeros(1))
    assert not isinstance(comp.codec.engine(xp, torch.zeros(4)), engines_cuda.TritonEngine)
    if torch.cuda.is_available():
        assert isinstance(comp.codec.engine(xp, torch.zeros(4, device="cuda")), engines_cuda.TritonEngine)
        off = H.NUQCompressor(fused=False)
        assert type(off.codec.engine(xp, torch.zeros(4, device="cuda"))) is engines.GenericEngine
