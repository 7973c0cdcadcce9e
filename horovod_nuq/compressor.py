"""Horovod compression plugins: one class per scheme, working on torch and tf tensors alike.

Horovod calls `compress(tensor) -> (payload, ctx)`, reduces the payload, then calls
`decompress(payload, ctx)`. Two protocols (README.md, "Two wire protocols"):
- "allreduce": all ranks agree on a per-bucket scale (a tiny Max allreduce), quantize onto
  that shared grid and send summable float64 words, so stock hvd.DistributedOptimizer,
  DistributedGradientTape and hvd.allreduce carry it under op Average or Sum;
- "allgather": each rank sends its own scales and bit-packed codes (the papers' form);
  Horovod's optimizers cannot route this, so use horovod_nuq.torch.DistributedOptimizer or
  horovod_nuq.tensorflow.DistributedGradientTape.
The default, "auto", is "allreduce" under Horovod's own optimizers and, under horovod_nuq's,
whichever of the two puts fewer bytes on each rank's link for the number of ranks.
"""
from __future__ import annotations

import importlib
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import codec, engines, kernels, schemes, wire
from .backends import Backend, backend_for
from .stats import WireStats

PROTOCOLS = ("auto", "allreduce", "allgather")
# "auto" takes allreduce only when it moves at least 10% fewer bytes: allgather needs no scale
# agreement and keeps per-rank scales (lower variance). At a byte tie (NUQ, 8 ranks: 28.1 vs
# 28.4 bits per coordinate) allgather measured 11% faster (benchmarks/results/slow_link_n8.md).
ALLREDUCE_MARGIN = 0.9
_COLLECTIVES = {"torch": "horovod_nuq.torch.collectives",
                "tensorflow": "horovod_nuq.tensorflow.collectives"}


@dataclass(frozen=True)
class Context:
    """What decompress needs besides the payload; identical on every rank."""

    shape: tuple
    dtype: str
    numel: int
    n_buckets: int
    scale: Any = None  # protocol "allreduce": the agreed per-bucket scales
    average: bool = True  # protocol "allgather": average (op Average) or sum (op Sum)


class Compressor:
    """A quantizing Horovod compressor. Subclasses fix the scheme; keywords configure it.

    bits / levels: code size per coordinate (sign included) or number of non-zero levels.
    bucket_size: coordinates that share one scale. seed: reproducible rounding (each rank
    draws its own stream from (seed, rank)). protocol: "auto" (default), "allreduce" or
    "allgather"; see `protocol_for`.
    process_set: the Horovod process set the tensors are reduced over (default: all ranks).
    fused: use the one-pass C kernels for tensors in host memory (None: when they build).
    """

    scheme_name = ""
    shared_scale_only = False

    def __init__(self, bits: int | None = None, *, levels: int | None = None,
                 bucket_size: int = 512, seed: int | None = None, protocol: str = "auto",
                 process_set: Any = None, fused: bool | None = None, **scheme_options: Any) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        if self.shared_scale_only and protocol == "allgather":
            raise ValueError(f"{type(self).__name__} shares one scale across ranks, which only the "
                             "'allreduce' protocol does; use protocol='allreduce'")
        self.scheme = schemes.make_scheme(self.scheme_name, bits=bits, levels=levels,
                                          bucket_size=bucket_size, **scheme_options)
        self.protocol = protocol
        self.process_set = process_set
        self.seed = seed
        self.stats = WireStats()
        self._tables = codec.Tables(self.scheme)
        self.fused = fused
        self._engines: dict[Any, engines.GenericEngine] = {}
        self._rank_seed: int | None = None
        self._draw_state: _Draws | None = None
        self._layouts: dict[int, wire.SumLayout] = {}
        self._ids: dict[Any, float] = {}
        self._config_id = self._settings_id(None)
        if protocol == "allreduce":
            self._layout(1)  # refuse now what cannot be packed even for one rank (auto: at compress)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.scheme.describe()}, protocol={self.protocol!r})"

    # ---- Horovod's compression API (protocol "allreduce") ------------------------------
    def compress(self, tensor: Any, *, scale: Any = None) -> tuple[Any, Context]:
        """Quantize onto the ranks' shared grid; return summable float64 words and the context.

        scale: this tensor's entry from `agree_scales`, when all of a step's scales were agreed
        in one round trip; by default the scales are agreed here (one Max allreduce).
        """
        if self.protocol == "allgather":
            raise RuntimeError(
                f"{self!r} sends per-rank codes with allgather, which Horovod's own optimizers "
                "cannot route. Use horovod_nuq.torch.DistributedOptimizer / "
                "horovod_nuq.tensorflow.DistributedGradientTape, or protocol='allreduce'.")
        xp, coll = self._frontend(tensor)
        engine, ctx = self._engine(xp, tensor), self._context(xp, tensor)
        if scale is None:
            work, r = engine.scales(tensor, ctx.numel)
            r, agreement = self._agree_scale(xp, coll, r), 4 * (ctx.n_buckets + 2)
        elif xp.shape(scale) != (ctx.n_buckets,):
            raise ValueError(f"scale has shape {xp.shape(scale)}, but a tensor of {ctx.numel} elements "
                             f"has {ctx.n_buckets} buckets: pass this tensor's entry of agree_scales()")
        else:  # the config ids were counted by agree_scales
            work, r, agreement = engine.work(tensor), scale, 4 * ctx.n_buckets
        layout = self._layout(coll.size(self.process_set))
        payload = engine.encode_sums(work, r, layout, self._draws(xp, coll, tensor))
        padded = ctx.n_buckets * self.scheme.bucket_size
        coll.record(self.stats, layout.payload_bytes(padded) + agreement, ctx.numel)
        return payload, Context(ctx.shape, ctx.dtype, ctx.numel, ctx.n_buckets, r)

    def agree_scales(self, tensors: list) -> list:
        """Every tensor's per-bucket scales, agreed over the ranks in one Max allreduce (all
        ranks must pass the same tensor sizes in the same order). Passing each result to
        `compress(t, scale=...)` replaces one blocking round trip per tensor by one per step."""
        if not tensors:
            return []
        xp, coll = self._frontend(tensors[0])
        local = []
        for t in tensors:
            self._frontend(t)
            local.append(self._engine(xp, t).scales(t, xp.numel(t))[1])
        agreed = self._agree_scale(xp, coll, xp.concat(local))
        self.stats.record_overhead(8)  # the two config ids (float32) that ride along
        return list(xp.split(agreed, [xp.shape(r)[0] for r in local]))

    def decompress(self, payload: Any, ctx: Context | None) -> Any:
        """Decode the reduced words: the average (op Average) or sum (op Sum) of the ranks' Q(v)."""
        if ctx is None:  # Horovod reduced this tensor without compress (its sparse-gradient path)
            return payload
        if ctx.scale is None:  # routed by horovod_nuq's optimizer/tape through allgather
            return self.decompress_gathered(payload, ctx, ctx.average)
        xp = backend_for(payload)
        layout = self._layout(self._collectives(xp).size(self.process_set))
        out = self._engine(xp, payload).decode_sums(payload, ctx.scale, layout, ctx.n_buckets)
        return codec.from_buckets(xp, out, ctx.numel, ctx.shape, ctx.dtype)

    # ---- protocol "allgather" ----------------------------------------------------------
    def compress_for_allgather(self, tensor: Any) -> tuple[Any, Context]:
        """This rank's float32 scales and bit-packed codes as one uint8 payload."""
        if self.shared_scale_only:
            raise RuntimeError(f"{type(self).__name__} shares one scale across ranks, which only the "
                               "'allreduce' protocol does")
        xp, coll = self._frontend(tensor)
        engine, ctx = self._engine(xp, tensor), self._context(xp, tensor)
        work, r = engine.scales(tensor, ctx.numel)
        header = xp.constant(np.array([self._settings_id(ctx.numel)], dtype=np.float32), r)
        payload = xp.concat([xp.bitcast(header, "uint8"), xp.bitcast(r, "uint8"),
                             engine.encode_codes(work, r, self._draws(xp, coll, tensor))])
        coll.record(self.stats, xp.numel(payload), ctx.numel)
        return payload, ctx

    def payload_bytes(self, numel: int, ranks: int | None = None, protocol: str | None = None) -> int:
        """Bytes one rank hands to the collective for a tensor of `numel` elements over `ranks`
        ranks (default 1), with `protocol` (default: `protocol_for(ranks)`)."""
        ranks = ranks if ranks is not None else 1
        nb = codec.n_buckets(numel, self.scheme.bucket_size)
        if (protocol or self.protocol_for(ranks)) == "allgather":
            return self._gathered_bytes(nb)
        return self._layout(ranks).payload_bytes(nb * self.scheme.bucket_size) + 4 * (nb + 2)

    def protocol_for(self, ranks: int) -> str:
        """The protocol used over `ranks` ranks where either can be routed (horovod_nuq's
        optimizer and tape; Horovod's own always call `compress`, i.e. allreduce).

        "auto" picks the one that puts fewer bytes on each rank's link: a ring allreduce
        sends 2(N-1)/N payloads, whose fields widen with N; an allgather sends N-1 payloads
        of fixed size. So allgather wins at small N, allreduce at large N (README.md).
        """
        if self.protocol != "auto":
            return self.protocol
        if self.shared_scale_only or ranks <= 1:
            return "allreduce"
        numel = 1 << 20  # payload sizes are linear in numel: one large tensor decides
        gather = (ranks - 1) * self.payload_bytes(numel, ranks, "allgather")
        try:
            reduce = 2 * (ranks - 1) / ranks * self.payload_bytes(numel, ranks, "allreduce")
        except ValueError:  # the sums do not fit a float64 word usefully
            return "allgather"
        return "allreduce" if reduce <= ALLREDUCE_MARGIN * gather else "allgather"

    def decompress_gathered(self, gathered: Any, ctx: Context, average: bool = True) -> Any:
        """Decode every rank's payload in rank order and return their average (or sum)."""
        xp = backend_for(gathered)
        nb = ctx.n_buckets
        per_rank = self._gathered_bytes(nb)
        total = xp.numel(gathered)
        if total == 0 or total % per_rank:
            raise ValueError(f"allgather payload of {total} bytes is not a whole number of "
                             f"{per_rank}-byte rank payloads for a tensor of {ctx.numel} elements: "
                             "ranks used different compressor settings or tensor shapes")
        ranks = total // per_rank
        tid = self._settings_id(ctx.numel)
        engine = self._engine(xp, gathered)
        acc = None
        for i, part in enumerate(xp.split(xp.reshape(gathered, [-1]), [per_rank] * ranks)):
            header, scale_bytes, codes = xp.split(part, [4, 4 * nb, per_rank - 4 - 4 * nb])
            xp.require(xp.max_all(xp.abs(xp.bitcast(header, "float32") - np.float32(tid))) == 0,
                       f"allgather payload of rank {i} was made with other compressor settings or "
                       f"another tensor size than this rank's {self.scheme.describe()} for "
                       f"{ctx.numel} elements (or is corrupt). Give every rank the same compressor.")
            acc = engine.decode_codes(codes, xp.bitcast(scale_bytes, "float32"), nb, acc,
                                      1.0 / ranks if average else 1.0)
        acc = engine.finish_codes(acc, gathered, nb)
        return codec.from_buckets(xp, acc, ctx.numel, ctx.shape, ctx.dtype)

    # ---- helpers -------------------------------------------------------------------------
    def _frontend(self, tensor: Any) -> tuple[Backend, Any]:
        xp = backend_for(tensor)
        if not xp.is_floating(tensor):
            raise TypeError(
                f"{type(self).__name__} quantizes floating-point gradients (float16, bfloat16, "
                f"float32, float64); got {xp.dtype_name(tensor)}. Reduce integer tensors "
                "without compression.")
        return xp, self._collectives(xp)

    def _collectives(self, xp: Backend) -> Any:
        name = _COLLECTIVES.get(xp.name, "horovod_nuq.local")
        module = sys.modules.get(name) or importlib.import_module(name)
        return getattr(module, "COLLECTIVES", module)

    def _context(self, xp: Backend, tensor: Any) -> Context:
        numel = xp.numel(tensor)
        return Context(xp.shape(tensor), xp.dtype_name(tensor), numel,
                       codec.n_buckets(numel, self.scheme.bucket_size))

    def _engine(self, xp: Backend, tensor: Any) -> engines.GenericEngine:
        """Fused kernels when available (and fused is not False): C for host tensors, Triton for
        torch GPU tensors."""
        lib = kernels.load() if self.fused is not False and xp.on_host(tensor) else None
        if lib is not None:
            cls = engines.GraphFusedEngine if xp.symbolic(tensor) else engines.FusedEngine
        elif self.fused is not False and xp.name == "torch" and _cuda().usable(tensor):
            cls = _cuda().TritonEngine  # torch GPU tensors: fused Triton kernels
        elif self.fused:
            raise RuntimeError("fused=True, but no fused kernels can run here (host "
                               "tensor without a C compiler, or a GPU tensor without triton)")
        else:
            cls = engines.GenericEngine
        key = (xp.name, cls)
        if key not in self._engines:  # built once: compress/decompress run every step
            self._engines[key] = (cls(xp, self.scheme, self._tables, lib) if lib is not None
                                  else cls(xp, self.scheme, self._tables))
        return self._engines[key]

    def _agree_scale(self, xp: Backend, coll: Any, r: Any) -> Any:
        """Max over ranks of the per-bucket scales, plus a check that all ranks share one config."""
        cid = np.array([self._config_id, -self._config_id], dtype=np.float32)
        agreed = coll.allreduce_max(xp.concat([r, xp.constant(cid, r)]), self.process_set)
        nb = xp.shape(r)[0]
        r, ids = xp.split(agreed, [nb, 2])
        # ids = [max_i id_i, -min_i id_i]: they cancel exactly when every rank has the same id
        same = xp.max_all(xp.abs(xp.row_sum(xp.reshape(ids, [1, 2])))) == 0
        if xp.symbolic(same):
            xp.require(same, f"ranks use different compressor settings; this rank uses "
                             f"{self.scheme.describe()}. Give every rank the same compressor.")
        elif not bool(same):  # every rank sees the same ids, so every rank takes this branch
            configs = coll.gather_text(repr(self), self.process_set)
            listing = "; ".join(f"rank {i}: {c}" for i, c in enumerate(configs))
            raise ValueError(f"ranks use different compressor settings ({listing}). "
                             "Give every rank the same compressor.")
        return r

    def _gathered_bytes(self, n_buckets: int) -> int:
        """One rank's allgather payload: 4-byte settings id, float32 scales, packed codes."""
        codes = wire.packed_code_bytes(n_buckets * self.scheme.bucket_size, self.scheme.code_bits)
        return 4 + 4 * n_buckets + codes

    def _settings_id(self, numel: int | None) -> float:
        """The settings (and tensor size, if given) as a float32-exact integer ranks can compare."""
        if numel not in self._ids:
            text = self.scheme.describe() + ("" if numel is None else f"/{numel}")
            self._ids[numel] = float(zlib.crc32(text.encode()) % (1 << 24))
        return self._ids[numel]

    def _layout(self, ranks: int) -> wire.SumLayout:
        if ranks not in self._layouts:
            bound = self.scheme.levels.denominator
            self._layouts[ranks] = wire.SumLayout(bound, ranks).check()
        return self._layouts[ranks]

    def _draws(self, xp: Backend, coll: Any, like: Any) -> _Draws:
        if self._rank_seed is None:
            entropy = [self.seed] if self.seed is not None else [int.from_bytes(os.urandom(8), "little")]
            state = np.random.SeedSequence(entropy + [coll.rank()]).generate_state(1, np.uint64)[0]
            self._rank_seed = int(state >> np.uint64(1))
            self._draw_state = _Draws(self._rank_seed, coll)
        return self._draw_state


def _cuda():
    """engines_cuda, imported on first use (it imports torch)."""
    from . import engines_cuda

    return engines_cuda


class _Draws:
    """Independent per-rank randomness: a framework generator per device (generic engine)
    and a stream of 64-bit keys for the fused kernels' counter-based draws."""

    def __init__(self, seed: int, coll: Any) -> None:
        self.seed, self.coll = seed, coll
        self._generators: dict[Any, Any] = {}
        self._keys = kernels.key_stream(seed)

    def uniform(self, xp: Backend, like: Any) -> Any:
        dev = (xp.name, xp.device_key(like))
        if dev not in self._generators:
            self._generators[dev] = self.coll.make_rng(xp, self.seed, like)
        return xp.uniform(xp.shape(like), like, self._generators[dev])

    def key(self) -> int:
        return next(self._keys)


def _compressor(name: str, scheme: str, doc: str, shared_scale_only: bool = False) -> type:
    return type(name, (Compressor,), {"scheme_name": scheme, "__doc__": doc,
                                      "shared_scale_only": shared_scale_only})


QSGDCompressor = _compressor("QSGDCompressor", "qsgd",
                             "QSGD: uniform levels, L2 scale per bucket (default 4 bits, bucket 512).")
QSGDInfCompressor = _compressor("QSGDInfCompressor", "qsgdinf",
                                "QSGDinf: uniform levels, max-norm scale per bucket.")
NUQCompressor = _compressor("NUQCompressor", "nuqsgd",
                            "NUQSGD: exponentially spaced levels {0, 2^-(k-1), ..., 1/2, 1}, L2 scale.")
TNQCompressor = _compressor("TNQCompressor", "tnqsgd",
                            "TNQSGD: truncation at alpha = c * mean|v| and non-uniform levels (biased).")
GlobalQSGDCompressor = _compressor("GlobalQSGDCompressor", "globalqsgd",
                                   "Global-QSGD: a scale shared by all ranks; linear or exponential levels.",
                                   shared_scale_only=True)

COMPRESSORS = {"qsgd": QSGDCompressor, "qsgdinf": QSGDInfCompressor, "nuq": NUQCompressor,
               "nuqsgd": NUQCompressor, "tnq": TNQCompressor, "tnqsgd": TNQCompressor,
               "globalqsgd": GlobalQSGDCompressor}
