"""Reliability under real collectives (torch): mismatched ranks, non-finite gradients, odd layouts."""
import horovod.torch as hvd
import numpy as np
import pytest
import torch
from harness import digest, rank_gradient

import horovod_nuq.torch as nuq

hvd.init(process_sets="dynamic")  # lets a test add a process set
N, RANK = hvd.size(), hvd.rank()
pytestmark = pytest.mark.skipif(N < 2, reason="needs at least 2 ranks")


def test_mismatched_bits_allreduce_names_every_rank():
    comp = nuq.QSGDCompressor(bits=4 if RANK == 0 else 3)
    with pytest.raises(ValueError, match=r"different compressor settings \(rank 0: .*bits=4.*rank 1: .*bits=3"):
        hvd.allreduce(torch.ones(1000), compression=comp)


def test_mismatched_scheme_allgather_is_detected():
    cls = nuq.QSGDCompressor if RANK == 0 else nuq.NUQCompressor
    comp = cls(bits=4, protocol="allgather")
    payload, ctx = comp.compress_for_allgather(torch.ones(1000))
    with pytest.raises(ValueError, match="other compressor settings"):
        comp.decompress_gathered(hvd.allgather(payload), ctx)


@pytest.mark.parametrize("protocol", ["allreduce", "allgather"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_propagates_to_its_bucket_only(protocol, bad):
    comp = nuq.QSGDInfCompressor(bucket_size=256, protocol=protocol)
    g = torch.from_numpy(rank_gradient(RANK, 1024))
    if RANK == 1:
        g[300] = bad  # bucket 1
    if protocol == "allreduce":
        out = hvd.allreduce(g, compression=comp)
    else:
        payload, ctx = comp.compress_for_allgather(g)
        out = comp.decompress_gathered(hvd.allgather(payload), ctx)
    finite = torch.isfinite(out).view(4, 256)
    assert not finite[1].any(), "a non-finite gradient must not decode to finite values"
    assert finite[[0, 2, 3]].all(), "other buckets must be unaffected"


def test_non_contiguous_and_channels_last():
    base = torch.from_numpy(rank_gradient(RANK, 2 * 3 * 8 * 8)).view(2, 3, 8, 8)
    for t in (base.transpose(2, 3), base.to(memory_format=torch.channels_last), base[:, :, ::2]):
        out = hvd.allreduce(t, compression=nuq.NUQCompressor(seed=1))
        ref = hvd.allreduce(t.contiguous(), compression=nuq.NUQCompressor(seed=1))
        assert out.shape == t.shape
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_same_seed_same_result_run_to_run():
    g = torch.from_numpy(rank_gradient(RANK, 3000))
    a = hvd.allreduce(g, compression=nuq.TNQCompressor(seed=42))
    b = hvd.allreduce(g, compression=nuq.TNQCompressor(seed=42))
    c = hvd.allreduce(g, compression=nuq.TNQCompressor(seed=43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = torch.from_numpy(digest(a.numpy()))
    assert (hvd.allgather(d.unsqueeze(0)) == d).all()


def test_integer_tensor_is_refused():
    with pytest.raises(TypeError, match="floating-point"):
        hvd.allreduce(torch.arange(10), compression=nuq.QSGDCompressor())


def test_too_many_ranks_for_the_word_is_refused():
    comp = nuq.QSGDCompressor(bits=8)  # 255 values per field: fine for 2 ranks, not for 2^20
    with pytest.raises(ValueError, match="fewer bits"):
        comp.codec.layout(1 << 20)


@pytest.mark.parametrize("protocol", ["allreduce", "allgather"])
def test_process_set_sizes_the_fields_and_reduces_over_its_ranks(protocol):
    """A compressor over a 2-rank process set of a larger world averages those ranks only."""
    if N < 3:
        pytest.skip("needs a process set smaller than the world (run with 4 ranks)")
    ps = hvd.add_process_set([0, 1])
    try:
        if RANK in (0, 1):
            comp = nuq.QSGDInfCompressor(bits=8, process_set=ps, protocol=protocol)
            g = torch.from_numpy(rank_gradient(RANK, 1000))
            if protocol == "allreduce":
                out = hvd.allreduce(g, compression=comp, process_set=ps)
                assert comp.codec.layout(ps.size()).ranks == 2
            else:
                payload, ctx = comp.compress_for_allgather(g)
                out = comp.decompress_gathered(hvd.allgather(payload, process_set=ps), ctx)
            want = (rank_gradient(0, 1000) + rank_gradient(1, 1000)) / 2
            assert np.abs(out.numpy() - want).max() < 0.02 * np.abs(want).max()
    finally:
        hvd.remove_process_set(ps)
