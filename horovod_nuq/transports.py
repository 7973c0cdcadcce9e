"""How a quantized tensor travels through Horovod: three transports over one TensorCodec.

- `Summable` (protocol "allreduce"): ranks agree on per-bucket scales (a Max allreduce),
  quantize onto that shared grid and hand Horovod summable float64 words to reduce.
- `Gathered` (protocol "allgather", horovod_nuq's optimizer and tape): each rank's scales and
  bit-packed codes; the caller allgathers them and every rank decodes all in rank order.
- `SentinelGather` (protocol "allgather" under Horovod's own optimizers, which only
  allreduce): `compress` starts the allgather of the packed codes itself and hands Horovod a
  3-word sentinel instead; Horovod reduces it with whatever op and scale factors it uses, and
  `decompress` waits for the gather and scales the decoded sum by what the sentinel reads.
- `DeferredSummable` (protocol "allreduce" under Horovod's own optimizers, eager): `compress`
  starts the scale agreement without waiting and hands Horovod the sentinel; `decompress`
  submits the summable words of every tensor whose scales have arrived, then waits for its own.
  No backward hook blocks on a round trip. (Inside graphs, `Summable` does not block either.)
Transports take the codec, the collectives and the byte counters explicitly. Each compress
takes an optional `keep` callback that receives this rank's own decoded contribution Q(v)
once it is encoded (error feedback's residual, memory.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import wire
from .backends import backend_for
from .tensor_codec import Context, TensorCodec

Keep = Callable[[Any], None] | None


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


@dataclass
class DeferredContext:
    """A tensor whose summable words wait for its scale agreement (started in compress)."""

    tensor: Context
    engine: Any
    work: Any
    scale_handle: Any
    tag: int
    name: str
    layout: wire.SumLayout
    process_set: Any
    words_handle: Any = None
    scale: Any = None
    keep: Callable[[Any], None] | None = None


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
                 describe: str, scale: Any = None, keep: Keep = None) -> tuple[Any, SummedContext]:
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
        if keep is not None:
            keep(codec.decode_sums(payload, r, layout, ctx))  # this rank's words alone: its Q(v)
        coll.record(stats, layout.payload_bytes(ctx.n_buckets * codec.scheme.bucket_size) + agreement,
                    ctx.numel)
        return payload, SummedContext(ctx, r, layout)

    def decompress(self, codec: TensorCodec, payload: Any, ctx: SummedContext) -> Any:
        return codec.decode_sums(payload, ctx.scale, ctx.layout, ctx.tensor)


def agree(codec: TensorCodec, coll: Any, xp: Any, r: Any, process_set: Any, describe: str,
          name: str | None = None) -> Any:
    """Max over ranks of the per-bucket scales, plus a check that all ranks share one config."""
    cid = codec.settings_id(None)
    agreed = coll.allreduce_max(xp.concat([r, xp.constant(np.array([cid, -cid], np.float32), r)]),
                                process_set, name)
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

    def compress(self, codec: TensorCodec, coll: Any, stats: Any, tensor: Any,
                 keep: Keep = None) -> tuple[Any, GatheredContext]:
        payload, ctx = _encode_codes(codec, coll, tensor, keep)
        coll.record(stats, backend_for(payload).numel(payload), ctx.numel)
        return payload, GatheredContext(ctx)

    def decompress(self, codec: TensorCodec, gathered: Any, ctx: GatheredContext) -> Any:
        return codec.decode_codes(gathered, ctx.tensor, None if ctx.average else 1.0)


def _encode_codes(codec: TensorCodec, coll: Any, tensor: Any, keep: Keep) -> tuple[Any, Context]:
    payload, ctx = codec.encode_codes(tensor, coll)
    if keep is not None:
        keep(codec.decode_codes(payload, ctx, 1.0))  # this rank's payload alone: its Q(v)
    return payload, ctx


def _take_slot(coll: Any, kind: str, numel: int) -> int:
    """The lowest slot of this kind and size not in flight on these collectives (one object
    per framework and process, shared by every compressor), see SentinelGather. Slots whose
    operation belongs to an earlier Horovod session (an elastic reset abandoned it) are free."""
    slots = coll.in_flight[kind, numel]
    for stale in [s for s, h in slots.items() if h is not None and not coll.alive(h)]:
        del slots[stale]
    slot = next(i for i in range(len(slots) + 1) if i not in slots)
    slots[slot] = None  # reserved; the handle is recorded once the operation starts
    return slot


def _hold_slot(coll: Any, kind: str, numel: int, slot: int, handle: Any) -> None:
    coll.in_flight[kind, numel][slot] = handle


def _release_slot(coll: Any, kind: str, numel: int, slot: int) -> None:
    coll.in_flight[kind, numel].pop(slot, None)


def _scaled(xp: Any, decode: Any, reduced: Any, tag: int, ctx: Context, ranks: Any) -> Any:
    """decode(factor) scaled by the reduction the sentinel reports: decode(c*n / ranks) where
    the factor can be read on the host, else decode(1 / ranks) times the sentinel's c*n."""
    scale = wire.read_sentinel(xp, xp.cast(reduced, "float64"), tag, f"a tensor of {ctx.numel} elements")
    if xp.symbolic(scale) or not xp.on_host(scale):  # no host read: scale the average
        return decode(None) * xp.cast(scale, ctx.dtype)
    return decode(float(xp.to_numpy(scale).reshape(-1)[0]) / ranks())


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
                 process_set: Any, keep: Keep = None) -> tuple[Any, InFlightContext]:
        payload, ctx = _encode_codes(codec, coll, tensor, keep)
        xp = backend_for(payload)
        tag, name = 0, None
        if getattr(coll, "stable_names", False):
            tag = _take_slot(coll, "g", ctx.numel)
            name = f"horovod_nuq.g.{ctx.numel}.{tag}"
        try:
            handle = coll.allgather_async(payload, name, process_set)
        except Exception:
            self._release(coll, ctx.numel, tag, name)
            raise
        if name is not None:
            _hold_slot(coll, "g", ctx.numel, tag, handle)
        coll.record(stats, xp.numel(payload) + 8 * wire.SENTINEL_WORDS, ctx.numel)
        return xp.constant(wire.sentinel(tag), payload), InFlightContext(ctx, handle, tag, name)

    def decompress(self, codec: TensorCodec, coll: Any, reduced: Any, ctx: InFlightContext) -> Any:
        try:
            gathered = coll.wait(ctx.handle)
        finally:
            self._release(coll, ctx.tensor.numel, ctx.tag, ctx.name)
        return _scaled(backend_for(reduced), lambda f: codec.decode_codes(gathered, ctx.tensor, f),
                       reduced, ctx.tag, ctx.tensor, lambda: codec.ranks_in(gathered, ctx.tensor))

    def _release(self, coll: Any, numel: int, tag: int, name: str | None) -> None:
        if name is not None:
            _release_slot(coll, "g", numel, tag)


class DeferredSummable:
    """Protocol "allreduce" through Horovod's allreduce, eager (see module doc). Names:
    `horovod_nuq.s.<size>.<slot>` for the agreement, `horovod_nuq.w.<size>.<slot>` for the
    words; the sentinel carries the slot, as in SentinelGather."""

    protocol = "allreduce"

    def __init__(self) -> None:
        self._waiting: list[DeferredContext] = []  # agreements started, words not yet submitted

    def compress(self, codec: TensorCodec, coll: Any, stats: Any, tensor: Any,
                 process_set: Any, keep: Keep = None) -> tuple[Any, DeferredContext]:
        xp, engine, ctx, work, r = codec.local_scales(tensor)
        layout = codec.layout(coll.size(process_set))
        tag = _take_slot(coll, "s", ctx.numel)
        cid = codec.settings_id(None)
        ids = xp.constant(np.array([cid, -cid], np.float32), r)
        try:
            handle = coll.allreduce_max_async(xp.concat([r, ids]), f"horovod_nuq.s.{ctx.numel}.{tag}",
                                              process_set)
        except Exception:
            _release_slot(coll, "s", ctx.numel, tag)
            raise
        _hold_slot(coll, "s", ctx.numel, tag, handle)
        self._waiting = [e for e in self._waiting if coll.alive(e.scale_handle)]  # elastic resets
        entry = DeferredContext(ctx, engine, work, handle, tag, f"horovod_nuq.w.{ctx.numel}.{tag}",
                                layout, process_set, keep=keep)
        self._waiting.append(entry)
        words = layout.payload_bytes(ctx.n_buckets * codec.scheme.bucket_size)
        coll.record(stats, words + 4 * (ctx.n_buckets + 2) + 8 * wire.SENTINEL_WORDS, ctx.numel)
        return xp.constant(wire.sentinel(tag), r), entry

    def decompress(self, codec: TensorCodec, coll: Any, reduced: Any, ctx: DeferredContext) -> Any:
        try:
            for entry in list(self._waiting):  # every tensor whose scales have arrived, in order
                if entry is ctx or coll.poll(entry.scale_handle):
                    self._submit(codec, coll, entry)
            words = coll.wait(ctx.words_handle)
        finally:
            _release_slot(coll, "s", ctx.tensor.numel, ctx.tag)
        return _scaled(backend_for(reduced),
                       lambda f: _times(codec.decode_sums(words, ctx.scale, ctx.layout, ctx.tensor), f,
                                        ctx.layout.ranks),
                       reduced, ctx.tag, ctx.tensor, lambda: ctx.layout.ranks)

    def _submit(self, codec: TensorCodec, coll: Any, entry: DeferredContext) -> None:
        """Wait for the entry's agreed scales, encode its words and start their allreduce."""
        self._waiting.remove(entry)
        agreed = coll.wait(entry.scale_handle)
        xp = backend_for(agreed)
        nb = entry.tensor.n_buckets
        scale, ids = xp.split(agreed, [nb, 2])
        if not bool(xp.max_all(xp.abs(xp.row_sum(xp.reshape(ids, [1, 2])))) == 0):
            # every rank sees the same ids, so every rank raises here, after one gather
            listing = "; ".join(f"rank {i}: {c}" for i, c in
                                enumerate(coll.gather_text(codec.scheme.describe(), entry.process_set)))
            raise ValueError(f"ranks use different compressor settings ({listing}). "
                             "Give every rank the same compressor.")
        entry.scale = scale
        payload = codec.encode_sums(entry.engine, entry.work, scale, entry.layout, coll)
        if entry.keep is not None:
            entry.keep(codec.decode_sums(payload, scale, entry.layout, entry.tensor))
        entry.words_handle = coll.allreduce_average_async(payload, entry.name, entry.process_set)
        entry.work = None  # the encoded words replace it


def _times(out: Any, factor: float | None, ranks: int) -> Any:
    """The decoded average `out` as factor * sum (factor None: leave the average)."""
    return out if factor is None or factor * ranks == 1 else out * (factor * ranks)
