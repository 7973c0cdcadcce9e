"""One scheme's tensor <-> payload steps on any framework, below the transports.

A `TensorCodec` picks the engine for a tensor (fused C kernels for host tensors, the generic
codec elsewhere), owns this rank's random stream, and encodes or decodes the two payload
forms: a rank's packed codes (the papers' per-worker form) and summable words on a grid
shared by all ranks. It does no communication: transports call it around their collectives.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import codec, elias, engines, kernels, schemes, wire
from .backends import Backend, backend_for


@dataclass(frozen=True)
class Context:
    """What decoding a tensor needs besides the payload; identical on every rank."""

    shape: tuple
    dtype: str
    numel: int
    n_buckets: int


ENCODINGS = ("fixed", "elias")


class TensorCodec:
    """Encode and decode one scheme's payloads (see module doc). `fused`: None uses the C
    kernels for host tensors when they build, False never, True insists. `encoding`: the
    per-worker codes fixed-width ("fixed") or Elias coded ("elias", elias.py; always through
    the C kernels, on a host copy of the tensor)."""

    def __init__(self, scheme: schemes.Scheme, seed: int | None = None, fused: bool | None = None,
                 encoding: str = "fixed") -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if encoding == "elias":
            if fused is False:
                raise ValueError("encoding='elias' runs in the fused C kernels; fused=False turns them "
                                 "off. Drop fused=False or use encoding='fixed'.")
            if kernels.load() is None:
                raise RuntimeError("encoding='elias' needs the fused C kernels, which cannot be built "
                                   "here (no C compiler, or HOROVOD_NUQ_KERNELS=0): install gcc or set "
                                   "CC, or use encoding='fixed'")
        self.scheme = scheme
        self.seed = seed
        self.fused = fused
        self.encoding = encoding
        self.tables = codec.Tables(scheme)
        self._engines: dict[Any, engines.GenericEngine] = {}
        self._layouts: dict[int, wire.SumLayout] = {}
        self._ids: dict[Any, float] = {}
        self._draws: _Draws | None = None

    # ---- per tensor --------------------------------------------------------------------
    def frontend(self, tensor: Any) -> Backend:
        """The tensor's backend, refusing what cannot be quantized."""
        return frontend(tensor)

    def context(self, xp: Backend, tensor: Any) -> Context:
        numel = xp.numel(tensor)
        return Context(xp.shape(tensor), xp.dtype_name(tensor), numel,
                       codec.n_buckets(numel, self.scheme.bucket_size))

    def engine(self, xp: Backend, tensor: Any) -> engines.GenericEngine:
        """The fused kernels when available (and fused is not False): C for host tensors,
        Triton for torch CUDA tensors; else the generic codec."""
        elias_host = self.encoding == "elias"  # Elias coding: the C kernels on a host copy
        lib = kernels.load() if self.fused is not False and (xp.on_host(tensor) or elias_host) else None
        if lib is not None:
            cls = engines.GraphFusedEngine if xp.symbolic(tensor) else engines.FusedEngine
        elif self.fused is not False and xp.name == "torch" and _cuda().usable(tensor):
            cls = _cuda().TritonEngine
        elif self.fused:
            raise RuntimeError("fused=True, but no fused kernels can run here (a host tensor "
                               "without a C compiler, or a GPU tensor without triton)")
        else:
            cls = engines.GenericEngine
        key = (xp.name, cls)
        if key not in self._engines:  # built once: compress/decompress run every step
            self._engines[key] = (cls(xp, self.scheme, self.tables, lib) if lib is not None
                                  else cls(xp, self.scheme, self.tables))
        return self._engines[key]

    def settings_id(self, numel: int | None) -> float:
        """The settings (and tensor size, if given) as a float32-exact integer ranks can compare."""
        if numel not in self._ids:
            text = self.describe() + ("" if numel is None else f"/{numel}")
            self._ids[numel] = float(zlib.crc32(text.encode()) % (1 << 24))
        return self._ids[numel]

    def describe(self) -> str:
        """The scheme's settings, and the encoding where it is not the default."""
        return self.scheme.describe() + (f"+{self.encoding}" if self.encoding != "fixed" else "")

    def layout(self, ranks: int) -> wire.SumLayout:
        """Field widths of summable words for sums over `ranks` ranks (refused if useless)."""
        if ranks not in self._layouts:
            self._layouts[ranks] = wire.SumLayout(self.scheme.levels.denominator, ranks).check()
        return self._layouts[ranks]

    def draws(self, coll: Any) -> _Draws:
        """This rank's random stream, drawn from (seed, rank); made anew if the rank changes
        (elastic Horovod), so that ranks' streams stay independent."""
        self._draws = rank_draws(self.seed, self._draws, coll)
        return self._draws

    # ---- packed codes (per-worker form) ------------------------------------------------
    def gathered_payload_bytes(self, numel: int) -> int:
        """One rank's packed payload for a tensor of `numel` elements (the byte model's input)."""
        return self.gathered_bytes(codec.n_buckets(numel, self.scheme.bucket_size))

    def gathered_bytes(self, n_buckets: int) -> int:
        """One rank's packed payload: 4-byte settings id, float32 scales, packed codes."""
        codes = wire.packed_code_bytes(n_buckets * self.scheme.bucket_size, self.scheme.code_bits)
        return 4 + 4 * n_buckets + codes

    def encode_codes(self, tensor: Any, coll: Any) -> tuple[Any, Context]:
        """This rank's float32 scales and bit-packed (or Elias-coded) codes as one uint8 payload."""
        xp = self.frontend(tensor)
        engine, ctx = self.engine(xp, tensor), self.context(xp, tensor)
        work, r = engine.scales(tensor, ctx.numel)
        if self.encoding == "elias":
            return engine.encode_elias(work, r, self.draws(coll), self.settings_id(ctx.numel)), ctx
        header = xp.constant(np.array([self.settings_id(ctx.numel)], dtype=np.float32), r)
        payload = xp.concat([xp.bitcast(header, "uint8"), xp.bitcast(r, "uint8"),
                             engine.encode_codes(work, r, self.draws(coll))])
        return payload, ctx

    def decode_codes(self, gathered: Any, ctx: Context, factor: float | None = None) -> Any:
        """`factor` times the sum of every rank's decoded payload, in rank order (default
        factor: 1 / ranks, the average)."""
        xp = backend_for(gathered)
        nb = ctx.n_buckets
        if self.encoding == "elias":  # self-delimiting payloads of different lengths
            engine = self.engine(xp, gathered)
            acc, _ = engine.decode_elias(gathered, nb, self.settings_id(ctx.numel), factor, self.describe())
            acc = engine.finish_codes(acc, gathered, nb)
            return codec.from_buckets(xp, acc, ctx.numel, ctx.shape, ctx.dtype)
        per_rank = self.gathered_bytes(nb)
        total = xp.numel(gathered)
        if total == 0 or total % per_rank:
            raise ValueError(f"allgather payload of {total} bytes is not a whole number of "
                             f"{per_rank}-byte rank payloads for a tensor of {ctx.numel} elements: "
                             "ranks used different compressor settings or tensor shapes")
        ranks = total // per_rank
        factor = 1.0 / ranks if factor is None else factor
        tid = self.settings_id(ctx.numel)
        engine = self.engine(xp, gathered)
        acc = None
        for i, part in enumerate(xp.split(xp.reshape(gathered, [-1]), [per_rank] * ranks)):
            header, scale_bytes, codes = xp.split(part, [4, 4 * nb, per_rank - 4 - 4 * nb])
            xp.require(xp.max_all(xp.abs(xp.bitcast(header, "float32") - np.float32(tid))) == 0,
                       f"allgather payload of rank {i} was made with other compressor settings or "
                       f"another tensor size than this rank's {self.describe()} for "
                       f"{ctx.numel} elements (or is corrupt). Give every rank the same compressor.")
            acc = engine.decode_codes(codes, xp.bitcast(scale_bytes, "float32"), nb, acc, factor)
        acc = engine.finish_codes(acc, gathered, nb)
        return codec.from_buckets(xp, acc, ctx.numel, ctx.shape, ctx.dtype)

    def ranks_in(self, gathered: Any, ctx: Context) -> int:
        """How many rank payloads an allgather result holds."""
        xp = backend_for(gathered)
        if self.encoding == "elias":
            return len(elias.split_ranks(xp.to_numpy(gathered), ctx.n_buckets,
                                         ctx.n_buckets * self.scheme.bucket_size,
                                         self.settings_id(ctx.numel), self.describe()))
        return xp.numel(gathered) // self.gathered_bytes(ctx.n_buckets)

    # ---- summable words (shared grid) --------------------------------------------------
    def local_scales(self, tensor: Any) -> tuple[Backend, Any, Context, Any, Any]:
        """(backend, engine, context, the tensor as the encoder reads it, this rank's scales)."""
        xp = self.frontend(tensor)
        engine, ctx = self.engine(xp, tensor), self.context(xp, tensor)
        work, r = engine.scales(tensor, ctx.numel)
        return xp, engine, ctx, work, r

    def encode_sums(self, engine: Any, work: Any, r: Any, layout: wire.SumLayout, coll: Any) -> Any:
        """Summable float64 words (and the sentinel) of `work` on the agreed scales `r`."""
        return engine.encode_sums(work, r, layout, self.draws(coll))

    def decode_sums(self, payload: Any, scale: Any, layout: wire.SumLayout, ctx: Context) -> Any:
        """The reduced words as the average (op Average) or sum (op Sum) of the ranks' Q(v)."""
        xp = backend_for(payload)
        out = self.engine(xp, payload).decode_sums(payload, scale, layout, ctx.n_buckets)
        return codec.from_buckets(xp, out, ctx.numel, ctx.shape, ctx.dtype)


def frontend(tensor: Any) -> Backend:
    """The tensor's backend, refusing what cannot be quantized."""
    xp = backend_for(tensor)
    if not xp.is_floating(tensor):
        raise TypeError(
            f"horovod_nuq quantizes floating-point gradients (float16, bfloat16, float32, "
            f"float64); got {xp.dtype_name(tensor)}. Reduce integer tensors without compression.")
    return xp


def rank_draws(seed: int | None, current: _Draws | None, coll: Any) -> _Draws:
    """`current` if it belongs to this rank, else a new stream drawn from (seed, rank, its
    generation): each rank's stream independent of the others' (seed None: fresh entropy)."""
    rank = coll.rank()
    if current is not None and current.rank == rank:
        return current
    entropy = [seed] if seed is not None else [int.from_bytes(os.urandom(8), "little")]
    generation = 0 if current is None else current.generation + 1
    state = np.random.SeedSequence(entropy + [rank, generation]).generate_state(1, np.uint64)[0]
    return _Draws(int(state >> np.uint64(1)), coll, rank, generation)


def _cuda() -> Any:
    """engines_cuda, imported on first use (it imports torch)."""
    from . import engines_cuda

    return engines_cuda


class _Draws:
    """Independent per-rank randomness: a framework generator per device (generic engine,
    eager), keys drawn at run time inside graphs, and a stream of 64-bit keys for the fused
    kernels' counter-based draws."""

    def __init__(self, seed: int, coll: Any, rank: int, generation: int) -> None:
        self.seed, self.coll, self.rank, self.generation = seed, coll, rank, generation
        self._generators: dict[Any, Any] = {}
        self._keys = kernels.key_stream(seed)

    def uniform(self, xp: Backend, like: Any) -> Any:
        if xp.symbolic(like):  # a generator would be a tf.Variable made while tracing
            from .backends.tensorflow import run_time_call

            key = run_time_call(lambda: [self.key() >> 1, self.key() >> 1], size=2)
            return xp.keyed_uniform(xp.shape(like), key)
        dev = (xp.name, xp.device_key(like))
        if dev not in self._generators:
            self._generators[dev] = self.coll.make_rng(xp, self.seed, like)
        return xp.uniform(xp.shape(like), like, self._generators[dev])

    def key(self) -> int:
        return next(self._keys)
