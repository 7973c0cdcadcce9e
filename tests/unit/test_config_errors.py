"""Bad configurations fail early with a clear ValueError/TypeError."""
from __future__ import annotations

import types

import numpy as np
import pytest
from _helpers import to_fw

import horovod_nuq as H
from horovod_nuq import collectives, schemes, wire
from horovod_nuq.backends import backend_for

NAMES = ("qsgd", "qsgdinf", "nuqsgd", "tnqsgd", "globalqsgd")
COMPRESSORS = (H.QSGDCompressor, H.QSGDInfCompressor, H.NUQCompressor, H.TNQCompressor,
               H.GlobalQSGDCompressor)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bits", [1, 0, -3, 9, 16])
def test_bits_out_of_range(name, bits):
    with pytest.raises(ValueError, match="bits must be between 2 and 8"):
        schemes.make_scheme(name, bits=bits)


@pytest.mark.parametrize("bits", [4.0, "4", True, 4.5])
def test_bits_wrong_type(bits):
    with pytest.raises(TypeError, match="bits must be an int"):
        schemes.make_scheme("qsgd", bits=bits)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("levels", [0, -1, 2.5, True])
def test_levels_invalid(name, levels):
    with pytest.raises(ValueError, match="levels"):
        schemes.make_scheme(name, levels=levels)


def test_levels_too_many():
    with pytest.raises(ValueError, match="<= 127"):
        schemes.make_scheme("qsgd", levels=128)
    with pytest.raises(ValueError, match="at most 62"):
        schemes.make_scheme("nuqsgd", bits=7)
    with pytest.raises(ValueError, match="at most 62"):
        schemes.make_scheme("nuqsgd", levels=63)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bucket_size", [0, -1, 512.0, "512", True, None])
def test_bucket_size_invalid(name, bucket_size):
    with pytest.raises(ValueError, match="bucket_size must be a positive int"):
        schemes.make_scheme(name, bits=4, bucket_size=bucket_size)


@pytest.mark.parametrize("name", ["foo", "qsgd2", "", "powersgd"])
def test_unknown_scheme(name):
    with pytest.raises(ValueError, match="unknown scheme"):
        schemes.make_scheme(name)


def test_scheme_name_aliases():
    assert schemes.make_scheme("NUQ-SGD", bits=3).name == "nuqsgd"
    assert schemes.make_scheme("TNQ_SGD", bits=3).name == "tnqsgd"
    assert schemes.make_scheme("Global-QSGD", bits=3).name == "globalqsgd"


@pytest.mark.parametrize("name", NAMES)
def test_bits_and_levels_both_given(name):
    with pytest.raises(ValueError, match="either bits or levels, not both"):
        schemes.make_scheme(name, bits=4, levels=7)


def test_tnq_negative_truncation():
    with pytest.raises(ValueError, match="truncation must be > 0"):
        schemes.make_scheme("tnqsgd", bits=4, truncation=-1.0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("truncation", [0.0, float("nan"), float("inf")])
def test_tnq_degenerate_truncation_message(truncation):
    with pytest.raises(ValueError, match="truncation must be"):
        schemes.make_scheme("tnqsgd", bits=4, truncation=truncation)


def test_scheme_specific_options():
    with pytest.raises(ValueError, match="spacing must be 'linear' or 'exponential'"):
        schemes.make_scheme("globalqsgd", bits=4, spacing="log")
    with pytest.raises(TypeError):
        schemes.make_scheme("qsgd", bits=4, truncation=3.0)
    with pytest.raises(ValueError, match="unknown scale rule"):
        schemes.Scheme("x", schemes.L.uniform(3), scale="l1")
    with pytest.raises(ValueError, match="truncation is set exactly when"):
        schemes.Scheme("x", schemes.L.uniform(3), scale="l2", truncation=2.0)


@pytest.mark.parametrize("cls", COMPRESSORS)
def test_compressor_constructor_errors(cls):
    with pytest.raises(ValueError, match="protocol must be one of"):
        cls(bits=4, protocol="ring")
    with pytest.raises(ValueError, match="bits must be between 2 and 8"):
        cls(bits=1)
    with pytest.raises(ValueError, match="either bits or levels"):
        cls(bits=4, levels=7)
    with pytest.raises(ValueError, match="bucket_size"):
        cls(bits=4, bucket_size=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        cls(bits=4, seed=-1)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        cls(bits=4, seed="1")


def test_global_qsgd_refuses_allgather():
    with pytest.raises(ValueError, match="only the 'allreduce' protocol"):
        H.GlobalQSGDCompressor(bits=4, protocol="allgather")


def allreduce(tensor, op):  # stands for a Horovod function that calls compress
    return comp.compress(tensor)  # noqa: F821  (`comp` is in the globals given below)


def reducescatter(tensor, op):
    return comp.compress(tensor)  # noqa: F821


def _as_horovod(fn, comp):
    """fn with module name horovod.* (what horovod_calls looks for) and `comp` in its globals."""
    return types.FunctionType(fn.__code__, {"__name__": "horovod.fake", "comp": comp})


def test_compress_refuses_ops_it_cannot_decode():
    """Called from Horovod with op Adasum (or Min, Max, Product), compress raises before any
    collective starts, naming the ops it decodes; reducescatter is refused too."""

    class FakeCollectives(collectives.LocalCollectives):
        linear_ops = (0, 1)  # Average, Sum

    comp = H.QSGDCompressor(bits=4, protocol="allgather", collectives=FakeCollectives())
    with pytest.raises(ValueError, match="Average or Sum"):
        _as_horovod(allreduce, comp)(np.ones(8, np.float32), op=2)
    payload, _ = _as_horovod(allreduce, comp)(np.ones(8, np.float32), op=1)
    assert payload.shape == (3,)  # the sentinel; the packed codes travel by allgather
    with pytest.raises(ValueError, match="reducescatter"):
        _as_horovod(reducescatter, comp)(np.ones(8, np.float32), op=1)


@pytest.mark.parametrize("fw", ["numpy", "torch", "tensorflow"])
@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool"])
@pytest.mark.parametrize("protocol", ["allreduce", "allgather"])
def test_non_float_tensor_is_type_error(fw, dtype, protocol):
    x = to_fw(fw, np.arange(10).astype(dtype))
    c = H.QSGDCompressor(bits=4, protocol=protocol)
    fn = c.compress if protocol == "allreduce" else c.compress_for_allgather
    with pytest.raises(TypeError, match="floating-point"):
        fn(x)


def test_unsupported_array_type():
    with pytest.raises(TypeError, match="numpy arrays, torch tensors and tf tensors"):
        backend_for([1.0, 2.0])
    with pytest.raises(TypeError, match="numpy arrays, torch tensors and tf tensors"):
        H.QSGDCompressor(bits=4).compress([1.0, 2.0])


def test_layout_that_cannot_shrink_the_payload_is_refused():
    # NUQ with 6 bits: numerators up to 2^30 need 32-bit fields, one per word.
    with pytest.raises(ValueError, match="protocol='allgather'"):
        H.NUQCompressor(bits=6, protocol="allreduce")  # at construction
    auto = H.NUQCompressor(bits=6)  # auto: only when Horovod's own optimizer calls compress
    assert auto.protocol_for(2) == "allgather"
    with pytest.raises(ValueError, match="protocol='allgather'"):
        auto.compress(np.ones(16, np.float32))
    # ... while the allgather protocol works for the same scheme
    c = H.NUQCompressor(bits=6, protocol="allgather")
    p, ctx = c.compress_for_allgather(np.ones(16, np.float32))
    assert np.isfinite(c.decompress_gathered(p, ctx)).all()


def test_auto_protocol_picks_fewer_bytes_per_link():
    """Ring allreduce sends 2(N-1)/N payloads whose fields widen with N; allgather sends N-1
    fixed ones. auto must pick allreduce only where it is >= 10% smaller, for every N, and
    respect fixed choices."""
    n = 1 << 20
    for cls in (H.QSGDCompressor, H.NUQCompressor, H.TNQCompressor):
        c = cls()
        assert c.protocol == "auto" and c.protocol_for(1) == "allreduce"
        for ranks in (2, 3, 4, 8, 16, 64):
            gather = (ranks - 1) * c.payload_bytes(n, ranks, "allgather")
            reduce = 2 * (ranks - 1) / ranks * c.payload_bytes(n, ranks, "allreduce")
            assert c.protocol_for(ranks) == ("allreduce" if reduce <= 0.9 * gather else "allgather")
            assert c.payload_bytes(n, ranks) == c.payload_bytes(n, ranks, c.protocol_for(ranks))
        assert cls(protocol="allreduce").protocol_for(4) == "allreduce"
        assert cls(protocol="allgather").protocol_for(64) == "allgather"
    # small N favours allgather, large N allreduce (QSGD: 4.06 vs 9.1 bits at N = 4)
    assert H.QSGDCompressor().protocol_for(2) == "allgather"
    assert H.QSGDCompressor().protocol_for(64) == "allreduce"
    assert H.NUQCompressor().protocol_for(4) == "allgather"
    assert H.NUQCompressor().protocol_for(8) == "allgather"  # a byte tie: no agreement wins
    assert H.NUQCompressor().protocol_for(16) == "allreduce"
    # one shared scale: allreduce only, whatever N
    g = H.GlobalQSGDCompressor()
    assert {g.protocol_for(r) for r in (2, 4, 64)} == {"allreduce"}
    with pytest.raises(RuntimeError, match="only the 'allreduce' protocol"):
        g.compress_for_allgather(np.ones(16, np.float32))


def test_decompress_gathered_rejects_wrong_size():
    c = H.QSGDCompressor(bits=4, protocol="allgather")
    p, ctx = c.compress_for_allgather(np.ones(100, np.float32))
    with pytest.raises(ValueError, match="not a whole number"):
        c.decompress_gathered(p[:-1], ctx)
    with pytest.raises(ValueError, match="not a whole number"):
        c.decompress_gathered(np.concatenate([p, p[:3]]), ctx)


def test_unpack_codes_errors():
    xp = backend_for(np.zeros(1))
    data = wire.pack_codes(xp, np.zeros(16, np.int64), 7, 4)
    with pytest.raises(ValueError, match="expected 8 bytes"):
        wire.unpack_codes(xp, data[:-1], 7, 4, 16)
    bad = np.full(8, 0xFF, np.uint8)  # every code 15 > 2k = 14
    with pytest.raises(ValueError, match="exceeds 2k"):
        wire.unpack_codes(xp, bad, 7, 4, 16)


def test_unpack_sums_errors():
    xp = backend_for(np.zeros(1))
    layout = wire.SumLayout(7, 2).check()
    payload = wire.pack_sums(xp, np.zeros(20, np.int64), layout)
    with pytest.raises(ValueError, match="expected"):
        wire.unpack_sums(xp, payload[:-1], layout, 20)
    bad = payload.copy()
    bad[-1] = 0.0
    with pytest.raises(ValueError, match="sentinel"):
        wire.unpack_sums(xp, bad, layout, 20)
    bad[-1] = -1.0
    with pytest.raises(ValueError, match="sentinel"):
        wire.unpack_sums(xp, bad, layout, 20)
