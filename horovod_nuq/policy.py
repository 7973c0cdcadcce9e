"""Which protocol carries a compressor's payload over n ranks, and what it costs on the wire.

One policy for every frontend (Horovod's own optimizers, horovod_nuq's optimizer and tape,
the Keras 3 wrapper): protocol "auto" takes the one that puts fewer bytes on each rank's
link. A ring allreduce sends 2(n-1)/n payloads, whose fields widen with n; an allgather sends
n-1 payloads of fixed size. So allgather wins at small n, allreduce at large n.
"""
from __future__ import annotations

from typing import Any

from . import codec as _codec
from .tensor_codec import TensorCodec

PROTOCOLS = ("auto", "allreduce", "allgather")
# "auto" takes allreduce only when it moves at least 10% fewer bytes: allgather needs no scale
# agreement and keeps per-rank scales (lower variance). At a byte tie (NUQ, 8 ranks: 28.1 vs
# 28.4 bits per coordinate) allgather measured 11% faster (benchmarks/results/slow_link_n8.md).
ALLREDUCE_MARGIN = 0.9
SENTINEL_BYTES = 24  # the 3 float64 words Horovod reduces beside a gathered payload


def payload_bytes(tc: TensorCodec, numel: int, ranks: int, protocol: str) -> int:
    """Bytes one rank hands to the collectives for a tensor of `numel` elements over `ranks`
    ranks: allgather, its packed payload; allreduce, the summable words plus the scale
    agreement (float32 scales and two config ids). Elias-coded payloads depend on the data:
    their size here is `elias_payload_bytes`, an estimate (see there)."""
    if getattr(tc, "encoding", "fixed") == "elias":
        if protocol != "allgather":
            raise ValueError("encoding='elias' payloads travel by allgather only")
        return elias_payload_bytes(tc, numel)
    if protocol == "allgather":
        return tc.gathered_payload_bytes(numel)
    nb = _codec.n_buckets(numel, tc.scheme.bucket_size)
    return tc.layout(ranks).payload_bytes(nb * tc.scheme.bucket_size) + 4 * (nb + 2)


def elias_payload_bytes(tc: TensorCodec, numel: int) -> int:
    """Estimated bytes of one rank's Elias payload for `numel` elements: the frame (header,
    float32 scales, chunk offsets) plus, per bucket of d coordinates, the expected code bits
    that QSGD's Theorem 3.2 bounds (bounds.qsgd_elias_bits, without its 32-bit norm, which the
    scales count) where the theorem's condition s^2 + sqrt(d) <= d/2 holds. Elsewhere (dense
    codes, s near sqrt(d)) no bound applies to this sparse code and the fixed-width code's
    size stands in, an overestimate there (measured: benchmarks/results/elias_bits.md)."""
    from . import bounds, elias

    bs, s = tc.scheme.bucket_size, tc.scheme.levels.k
    nb = _codec.n_buckets(numel, bs)
    last = numel - (nb - 1) * bs
    bits = 0.0
    for d, count in ((bs, nb - 1), (last, 1)):
        if count == 0:
            continue
        if bounds.qsgd_elias_applies(d, s):
            bits += count * (bounds.qsgd_elias_bits(d, s) - 32)
        else:
            bits += count * d * tc.scheme.code_bits
    return elias.prefix_bytes(nb, nb * bs) + int(-(-bits // 8)) + 4 * elias.chunks(nb * bs)  # + terminators


def protocol_for(tc: TensorCodec, protocol: str, shared_scale_only: bool, ranks: int,
                 gather_only: bool = False) -> str:
    """The protocol `protocol` ("auto", "allreduce" or "allgather") resolves to over `ranks`
    (`gather_only`: codes that do not sum, such as HSQ's codeword indices; Elias-coded payloads
    of per-rank lengths do not sum either)."""
    if protocol != "auto":
        return protocol
    if gather_only or getattr(tc, "encoding", "fixed") == "elias":
        return "allgather"
    if shared_scale_only or ranks <= 1:
        return "allreduce"
    numel = 1 << 20  # payload sizes are linear in numel: one large tensor decides
    gather = (ranks - 1) * payload_bytes(tc, numel, ranks, "allgather")
    try:
        reduce = 2 * (ranks - 1) / ranks * payload_bytes(tc, numel, ranks, "allreduce")
    except ValueError:  # the sums do not fit a float64 word usefully
        return "allgather"
    return "allreduce" if reduce <= ALLREDUCE_MARGIN * gather else "allgather"


def route(compression: Any, process_set: Any, op: Any, average: Any, sum_: Any) -> str | None:
    """How a frontend reduces gradients with `compression` over `process_set` with `op`:
    "allgather" or "allreduce" for horovod_nuq compressors, None for any other (Horovod's
    own path). Binds the compressor to the process set (see `bind_process_set`)."""
    if not hasattr(compression, "protocol_for"):
        return None
    bind_process_set(compression, process_set)
    chosen = compression.protocol_for(process_set.size())
    if chosen == "allgather" and op not in (average, sum_):
        raise ValueError("the allgather protocol averages or sums decoded gradients: use "
                         "op=hvd.Average or op=hvd.Sum (Adasum is not supported)")
    return chosen


def bind_process_set(compression: Any, process_set: Any) -> None:
    """Give a compressor made without a process set the frontend's (its field widths and
    gathers follow the ranks that reduce); refuse two different ones."""
    if getattr(process_set, "process_set_id", 0) == 0:
        return  # the global set: the default everywhere
    if compression.process_set is None:
        compression.process_set = process_set
    elif compression.process_set is not process_set:
        raise ValueError("the compressor and the optimizer name different process sets; give both the same")
