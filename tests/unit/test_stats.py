"""WireStats: totals, ratios, summary text, steps and reset, on hand-computed numbers
(the figures users read to judge the compression)."""
from __future__ import annotations

import math

import numpy as np

import horovod_nuq as H
from horovod_nuq import stats
from horovod_nuq.stats import WireStats


def test_empty_stats_say_so_and_ratios_are_nan():
    s = WireStats()
    assert s.summary() == "no tensors compressed yet"
    assert math.isnan(s.ratio_vs_float32) and math.isnan(s.ratio_vs_float16)
    assert (s.tensors, s.total_bytes, s.total_float32_bytes) == (0, 0, 0)


def test_totals_ratios_and_summary():
    """1000 + 3000 elements (16 000 float32 bytes) sent as 500 + 1500 bytes: 8x vs float32,
    4x vs float16; an overhead record adds bytes but no tensor."""
    s = WireStats()
    s.record(500, 1000)
    s.record(1500, 3000)
    assert (s.tensors, s.total_bytes, s.total_float32_bytes) == (2, 2000, 16000)
    assert s.ratio_vs_float32 == 8.0 and s.ratio_vs_float16 == 4.0
    assert s.summary() == "2 tensors, 0.002 MB sent vs 0.016 MB float32 (8.00x smaller; 4.00x vs float16)"
    s.record_overhead(2000)
    assert (s.tensors, s.total_bytes) == (2, 4000)
    assert s.ratio_vs_float32 == 4.0 and s.ratio_vs_float16 == 2.0
    assert s.summary().startswith("2 tensors, 0.004 MB sent vs 0.016 MB float32 (4.00x smaller; 2.00x")


def test_mark_step_lists_bytes_and_tensors_per_step():
    s = WireStats()
    s.record(10, 40)
    s.record(20, 80)
    assert s.mark_step() == 30
    assert s.step_tensors == [(40, 10), (80, 20)]
    s.record(5, 4)
    s.record_overhead(3)
    assert s.mark_step() == 8
    assert s.steps == [30, 8] and s.step_tensors == [(4, 5)]
    assert s.mark_step() == 0 and s.step_tensors == []


def test_open_tensor_records_are_bounded(monkeypatch):
    """Stock Horovod optimizers never call mark_step(): the per-tensor list must not grow
    without bound, while the totals still count everything."""
    monkeypatch.setattr(stats, "OPEN_TENSORS_MAX", 5)
    s = WireStats()
    for i in range(12):
        s.record(1, i)
    assert s.tensors == 12 and s.total_bytes == 12
    s.mark_step()
    assert s.step_tensors == [(i, 1) for i in range(7, 12)]


def test_reset_clears_everything():
    s = WireStats()
    s.record(100, 200)
    s.mark_step()
    s.record(7, 7)
    assert (s.tensors, s.total_bytes, s.total_float32_bytes) == (2, 107, 828)
    s.reset()
    assert (s.tensors, s.total_bytes, s.total_float32_bytes) == (0, 0, 0)
    assert s.steps == [] and s.step_tensors == [] and s.summary() == "no tensors compressed yet"
    s.record(4, 4)
    assert s.mark_step() == 4  # the step start was reset too


def test_compressor_stats_count_the_payload_it_returns():
    """After compressing, total_bytes is the payload handed over (allgather: its size; the
    allreduce protocol adds the scale agreement) and the ratio matches payload_bytes."""
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    for protocol in ("allgather", "allreduce"):
        c = H.QSGDCompressor(bits=4, bucket_size=512, protocol=protocol, seed=0)
        if protocol == "allgather":
            payload, _ = c.compress_for_allgather(x)
            assert c.stats.total_bytes == np.asarray(payload).nbytes
        else:
            payload, _ = c.compress(x)
            assert c.stats.total_bytes == np.asarray(payload).nbytes + 4 * (10 + 2)
        assert c.stats.total_bytes == c.payload_bytes(5000, 1, protocol)
        assert c.stats.ratio_vs_float32 == 20000 / c.stats.total_bytes
        assert c.stats.tensors == 1
        c.stats.reset()
        assert c.stats.tensors == 0 and c.stats.total_bytes == 0
