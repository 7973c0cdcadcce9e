"""How a quantized tensor travels through Horovod: three transports over one TensorCodec.

- `Summable` (protocol "allreduce"): ranks agree on per-bucket scales (a Max allreduce),
  quantize onto that shared grid and hand Horovod summable float64 words to reduce.
- `Gathered` (protocol "allgather", horovod_nuq's optimizer and tape): each rank's scales and
  bit-packed codes; the caller allgathers them and every rank decodes all in rank order.
- `SentinelGather` (protocol "allgather" under Horovod's own optimizers, which only
  allreduce): `compress` starts the allgather of the packed codes itself and hands Horovod a
  3-word sentinel instead; Horovod reduces it with whatever op and scale factors it uses, and
  `decompress` waits for the gather and scales the decoded sum by what the sentinel reads.
Transports take the codec, the collectives and the byte counters explicitly.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import wire
from .backends import backend_for
from .tensor_codec import Context, TensorCodec


@dataclass(frozen=True)
class SummedContext:
    """Decoding summable words needs the agreed scales and the field layout."""

    tensor: Context
    scale: Any
    layout: wire.SumLayout


@dataclass(frozen=True)
class GatheredContext:
    """Decoding gathered codes: average (op Average) or sum (op Sum) of the ranks' Q(v)."""

    tensor: Context
    average: bool = True


@dataclass(frozen=True)
class InFlightContext:
    """A payload gathered beside Horovod's reduction of the sentinel tagged `tag`."""

    tensor: Context
    handle: Any
    tag: int
    name: str | None


class Summable:
    """Protocol "allreduce": summable words on scales agreed by a Max allreduce."""

    protocol = "allreduce"

    def compress(self, codec: TensorCodec, coll: Any, stats: Any, tensor: Any, process_set: Any,
                 describe: str, scale: Any = None) -> tuple[Any, SummedContext]:
        if scale is None:
            xp, engine, ctx, work, r = codec.local_scales(tensor)
            r, agreement = agree(codec, coll, xp, r, process_set, describe), 4 * (ctx.n_buckets + 2)
        else:  # agreed beforehand by agree_scales(), which counted the config ids
            xp = codec.frontend(tensor)
            engine, ctx = codec.engine(xp, tensor), codec.context(xp, tensor)
            if xp.shape(scale) != (ctx.n_buckets,):
                raise ValueError(f"scale has shape {xp.shape(scale)}, but a tensor of {ctx.numel} "
                                 f"elements has {ctx.n_buckets} buckets: pass this tensor's entry "
                                 "of agree_scales()")
            work, r, agreement = engine.work(tensor), scale, 4 * ctx.n_buckets
        layout = codec.layout(coll.size(process_set))
        payload = codec.encode_sums(engine, work, r, layout, coll)
        coll.record(stats, layout.payload_bytes(ctx.n_buckets * codec.scheme.bucket_size) + agreement,
                    ctx.numel)
        return payload, SummedContext(ctx, r, layout)

    def decompress(self, codec: TensorCodec, payload: Any, ctx: SummedContext) -> Any:
        return codec.decode_sums(payload, ctx.scale, ctx.layout, ctx.tensor)


def agree(codec: TensorCodec, coll: Any, xp: Any, r: Any, process_set: Any, describe: str) -> Any:
    """Max over ranks of the per-bucket scales, plus a check that all ranks share one config."""
    cid = codec.settings_id(None)
    agreed = coll.allreduce_max(xp.concat([r, xp.constant(np.array([cid, -cid], np.float32), r)]),
                                process_set)
    nb = xp.shape(r)[0]
    r, ids = xp.split(agreed, [nb, 2])
    # ids = [max_i id_i, -min_i id_i]: they cancel exactly when every rank has the same id
    same = xp.max_all(xp.abs(xp.row_sum(xp.reshape(ids, [1, 2])))) == 0
    if xp.symbolic(same):
        xp.require(same, f"ranks use different compressor settings; this rank uses "
                         f"{codec.scheme.describe()}. Give every rank the same compressor.")
    elif not bool(same):  # every rank sees the same ids, so every rank takes this branch
        configs = coll.gather_text(describe, process_set)
        listing = "; ".join(f"rank {i}: {c}" for i, c in enumerate(configs))
        raise ValueError(f"ranks use different compressor settings ({listing}). "
                         "Give every rank the same compressor.")
    return r


class Gathered:
    """Protocol "allgather" for callers that allgather the payload themselves."""

    protocol = "allgather"

    def compress(self, codec: TensorCodec, coll: Any, stats: Any, tensor: Any) -> tuple[Any, GatheredContext]:
        payload, ctx = codec.encode_codes(tensor, coll)
        coll.record(stats, backend_for(payload).numel(payload), ctx.numel)
        return payload, GatheredContext(ctx)

    def decompress(self, codec: TensorCodec, gathered: Any, ctx: GatheredContext) -> Any:
        return codec.decode_codes(gathered, ctx.tensor, None if ctx.average else 1.0)


# gather slots in flight per tensor size, shared by every compressor of this process, so
# that names stay unique among operations in flight
_IN_FLIGHT: dict[int, set] = defaultdict(set)


class SentinelGather:
    """Protocol "allgather" through Horovod's allreduce (see module doc).

    Gathers are named `horovod_nuq.g.<size>.<slot>`, the lowest slot not in flight for that
    size: equal on every rank that submits same-size tensors in the same order, unique among
    operations in flight, and the same from step to step (Horovod's response cache). The
    sentinel, which Horovod names after the parameter, carries the slot; a rank that paired
    another tensor's gather makes its reduced tags disagree, and every rank raises.
    Inside graphs Horovod names the gather after its graph node, so the slot is 0.
    """

    protocol = "allgather"

    def compress(self, codec: TensorCodec, coll: Any, stats: Any, tensor: Any,
                 process_set: Any) -> tuple[Any, InFlightContext]:
        payload, ctx = codec.encode_codes(tensor, coll)
        xp = backend_for(payload)
        tag, name = 0, None
        if getattr(coll, "stable_names", False):
            slots = _IN_FLIGHT[ctx.numel]
            tag = next(i for i in range(len(slots) + 1) if i not in slots)
            slots.add(tag)
            name = f"horovod_nuq.g.{ctx.numel}.{tag}"
        try:
            handle = coll.allgather_async(payload, name, process_set)
        except Exception:
            self._release(ctx.numel, tag, name)
            raise
        coll.record(stats, xp.numel(payload) + 8 * wire.SENTINEL_WORDS, ctx.numel)
        return xp.constant(wire.sentinel(tag), payload), InFlightContext(ctx, handle, tag, name)

    def decompress(self, codec: TensorCodec, coll: Any, reduced: Any, ctx: InFlightContext) -> Any:
        try:
            gathered = coll.wait(ctx.handle)
        finally:
            self._release(ctx.tensor.numel, ctx.tag, ctx.name)
        xp = backend_for(reduced)
        what = f"a tensor of {ctx.tensor.numel} elements"
        scale = wire.read_sentinel(xp, xp.cast(reduced, "float64"), ctx.tag, what)  # c * n
        ranks = codec.ranks_in(gathered, ctx.tensor)
        if xp.symbolic(scale) or not xp.on_host(scale):  # no host read: scale the average
            return codec.decode_codes(gathered, ctx.tensor) * xp.cast(scale, ctx.tensor.dtype)
        c_n = float(xp.to_numpy(scale).reshape(-1)[0])
        return codec.decode_codes(gathered, ctx.tensor, c_n / ranks)

    def _release(self, numel: int, tag: int, name: str | None) -> None:
        if name is not None:
            _IN_FLIGHT[numel].discard(tag)
