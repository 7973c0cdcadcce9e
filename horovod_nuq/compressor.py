"""Horovod compression plugins: one class per scheme, working on torch and tf tensors alike.

Horovod calls `compress(tensor) -> (payload, ctx)`, reduces the payload, then calls
`decompress(payload, ctx)`. A compressor composes the pieces below it: the scheme's
`TensorCodec` (tensor <-> payload), a transport per protocol (`transports.py`), the routing
policy that picks the protocol for the number of ranks (`policy.py`), the byte counters
(`WireStats`) and the collectives of the tensor's framework (`collectives.py`).

Protocols (README.md, "Wire protocols"): "allgather", the papers' per-worker form (packed
codes gathered from every rank), and "allreduce", summable words on scales all ranks agree
on. "auto" (default) takes whichever puts fewer bytes on each rank's link for the process
set's size, under Horovod's own optimizers as under horovod_nuq's.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import collectives as _collectives
from . import hsq, policy, schemes, transports
from .backends import Backend, backend_for
from .horovod_calls import horovod_call_site
from .hsq_codec import HSQCodec
from .memory import ErrorFeedback, gamma_for
from .stats import WireStats
from .tensor_codec import TensorCodec


class Compressor:
    """A quantizing Horovod compressor. Subclasses fix the scheme; keywords configure it.

    bits / levels: code size per coordinate (sign included) or number of non-zero levels.
    bucket_size: coordinates that share one scale. seed: reproducible rounding (each rank
    draws its own stream from (seed, rank)). protocol: "auto" (default), "allreduce" or
    "allgather"; see `protocol_for`. process_set: the Horovod process set the tensors are
    reduced over (default: the one Horovod's caller names, else all ranks). fused: use the
    one-pass C kernels for tensors in host memory (None: when they build). collectives: the
    collectives to use (default: Horovod's, for the tensor's framework).
    error_feedback: keep each parameter's compression error and add it to its next gradient
    (memory.py): True sends gamma * Q(g + e) with gamma = 1 / (1 + omega) from the scheme's
    variance bound omega where omega >= 1 (else 1); a float sets gamma. Residuals are keyed by
    parameter name: horovod_nuq's optimizers, tape and Keras wrapper pass it, Horovod's torch
    optimizer and named `hvd.allreduce(..., name=...)` calls name it; `self.memory` holds them.
    collectives to use (default: Horovod's, for the tensor's framework). encoding (QSGD only):
    "fixed" (default; `bits` bits per coordinate) or "elias", the paper's Elias-coded gaps,
    signs and levels (elias.py), whose payloads differ in length from rank to rank and so
    travel by allgather only.
    """

    scheme_name = ""
    shared_scale_only = False
    gather_only = False  # codes that do not sum (HSQ's codeword indices): allgather only
    elias_coded = False  # whether encoding="elias" is offered (QSGD's code, with its bound)

    def __init__(self, bits: int | None = None, *, levels: int | None = None,
                 bucket_size: int = 512, seed: int | None = None, protocol: str = "auto",
                 process_set: Any = None, fused: bool | None = None, collectives: Any = None,
                 error_feedback: bool | float = False, encoding: str = "fixed",
                 **scheme_options: Any) -> None:
        _check_protocol(protocol)
        _check_seed(seed)
        if encoding == "elias" and not self.elias_coded:
            raise ValueError(f"encoding='elias' is QSGD's code (arXiv 1610.02132): use "
                             f"QSGDCompressor(encoding='elias'); {type(self).__name__} has "
                             "encoding='fixed' only")
        if encoding == "elias" and protocol == "allreduce":
            raise ValueError("encoding='elias' gives each rank a payload of its own length, which "
                             "cannot be summed: use protocol='allgather' or 'auto' (which gathers)")
        if self.shared_scale_only and protocol == "allgather":
            raise ValueError(f"{type(self).__name__} shares one scale across ranks, which only the "
                             "'allreduce' protocol does; use protocol='allreduce'")
        scheme = schemes.make_scheme(self.scheme_name, bits=bits, levels=levels,
                                     bucket_size=bucket_size, **scheme_options)
        self._setup(TensorCodec(scheme, seed, fused, encoding), protocol, process_set, collectives,
                    error_feedback)

    def _setup(self, codec: Any, protocol: str, process_set: Any, collectives: Any,
               error_feedback: bool | float) -> None:
        """Compose the codec (a TensorCodec, or HSQCodec) with the transports and counters."""
        self.codec = codec
        self.protocol = protocol
        self.process_set = process_set
        self.collectives = collectives
        self.stats = WireStats()
        self.memory = (ErrorFeedback(gamma_for(codec.scheme, error_feedback))
                       if error_feedback is not False else None)
        self._protocols: dict[tuple, str] = {}
        self._summable, self._gathered = transports.Summable(), transports.Gathered()
        self._sentinel_gather, self._deferred = transports.SentinelGather(), transports.DeferredSummable()
        if protocol == "allreduce":
            self.codec.layout(1)  # refuse now what cannot be packed even for one rank (auto: at use)

    @property
    def scheme(self) -> schemes.Scheme:
        return self.codec.scheme

    @property
    def seed(self) -> int | None:
        return self.codec.seed

    @property
    def fused(self) -> bool | None:
        return self.codec.fused

    @property
    def encoding(self) -> str:
        return getattr(self.codec, "encoding", "fixed")

    def __repr__(self) -> str:
        ef = "" if self.memory is None else f", error_feedback(gamma={self.memory.gamma:.3g})"
        enc = f", encoding={self.encoding!r}" if self.encoding != "fixed" else ""
        return f"{type(self).__name__}({self.scheme.describe()}, protocol={self.protocol!r}{enc}{ef})"

    # ---- Horovod's compression API ------------------------------------------------------
    def compress(self, tensor: Any, *, scale: Any = None, key: str | None = None) -> tuple[Any, Any]:
        """What Horovod should allreduce for `tensor`, and the context to decode it with.

        Over the process set Horovod's caller names, the protocol `protocol_for` picks:
        "allgather" starts an allgather of this rank's packed codes and returns a 3-word
        sentinel; "allreduce" returns summable words on scales agreed with the other ranks
        (or on `scale`, this tensor's entry of `agree_scales`), except in eager torch, where
        it starts the agreement, returns the sentinel and sends the words from decompress,
        so that no backward hook waits for a round trip. `key`: the parameter's name, for
        error feedback (default: the name Horovod's caller gives the tensor).
        """
        site = horovod_call_site()
        xp = self.codec.frontend(tensor)
        coll = self._coll(xp)
        if site.op is not None and site.op not in coll.linear_ops:
            raise ValueError(f"horovod_nuq compressors decode Average or Sum reductions (with any "
                             f"scale factors), not op {site.op!r}: use op=hvd.Average or op=hvd.Sum, "
                             "or compression=hvd.Compression.none for Adasum, Min, Max, Product")
        process_set = self._process_set(site.process_set)
        if scale is not None and self.gather_only:
            raise ValueError(f"{type(self).__name__} runs over the allgather protocol only: call "
                             "compress(tensor) without scale (agree_scales does not apply)")
        if scale is not None and self.encoding == "elias":
            raise ValueError("encoding='elias' payloads are gathered, not summed: compress(tensor) "
                             "without scale= (agree_scales belongs to the allreduce protocol)")
        tensor, keep = self._feedback(tensor, key if key is not None else site.name)
        if scale is None and self.protocol_for(coll.size(process_set)) == "allgather":
            return self._sentinel_gather.compress(self.codec, coll, self.stats, tensor, process_set, keep)
        if scale is None and getattr(coll, "stable_names", False):  # eager: do not block
            return self._deferred.compress(self.codec, coll, self.stats, tensor, process_set, keep)
        return self._summable.compress(self.codec, coll, self.stats, tensor, process_set,
                                       repr(self), scale, keep)

    def decompress(self, payload: Any, ctx: Any) -> Any:
        """Decode what Horovod reduced: the average (op Average) or sum (op Sum) of the ranks'
        Q(v), times any pre/postscale factors (and error feedback's gamma)."""
        if ctx is None:  # Horovod reduced this tensor without compress (its sparse-gradient path)
            return payload
        if isinstance(ctx, transports.InFlightContext):
            coll = self._coll(backend_for(payload))
            out = self._sentinel_gather.decompress(self.codec, coll, payload, ctx)
        elif isinstance(ctx, transports.DeferredContext):
            coll = self._coll(backend_for(payload))
            out = self._deferred.decompress(self.codec, coll, payload, ctx)
        elif isinstance(ctx, transports.GatheredContext):  # routed by horovod_nuq's optimizer/tape
            out = self._gathered.decompress(self.codec, payload, ctx)
        else:
            out = self._summable.decompress(self.codec, payload, ctx)
        return self._gamma(out)

    def agree_scales(self, tensors: list, keys: list | None = None) -> list:
        """Every tensor's per-bucket scales, agreed over the ranks in one Max allreduce (all
        ranks must pass the same tensor sizes in the same order). Passing each result to
        `compress(t, scale=..., key=...)` replaces one blocking round trip per tensor by one
        per step. `keys`: the parameters' names, for error feedback."""
        if self.gather_only:
            raise ValueError(f"{type(self).__name__} runs over the allgather protocol only, which "
                             "needs no scale agreement")
        if not tensors:
            return []
        xp = self.codec.frontend(tensors[0])
        keys = keys if keys is not None else [None] * len(tensors)
        local = [self.codec.local_scales(self._feedback(t, k)[0])[4] for t, k in zip(tensors, keys)]
        # one name whatever the sizes: ranks that pass different tensor lists get Horovod's
        # shape-mismatch error instead of waiting for each other under different names
        agreed = transports.agree(self.codec, self._coll(xp), xp, xp.concat(local),
                                  self._process_set(None), repr(self), "horovod_nuq.step_scales")
        self.stats.record_overhead(8)  # the two config ids (float32) that ride along
        return list(xp.split(agreed, [xp.shape(r)[0] for r in local]))

    # ---- protocol "allgather" for callers that gather themselves ------------------------
    def compress_for_allgather(self, tensor: Any, key: str | None = None) -> tuple[Any, transports.GatheredContext]:
        """This rank's float32 scales and bit-packed codes as one uint8 payload (`key`: the
        parameter's name, for error feedback)."""
        if self.shared_scale_only:
            raise RuntimeError(f"{type(self).__name__} shares one scale across ranks, which only the "
                               "'allreduce' protocol does")
        xp = self.codec.frontend(tensor)
        tensor, keep = self._feedback(tensor, key)
        return self._gathered.compress(self.codec, self._coll(xp), self.stats, tensor, keep)

    def decompress_gathered(self, gathered: Any, ctx: Any, average: bool = True) -> Any:
        """Decode every rank's payload in rank order and return their average (or sum)."""
        ctx = ctx if isinstance(ctx, transports.GatheredContext) else transports.GatheredContext(ctx)
        return self._gamma(self.codec.decode_codes(gathered, ctx.tensor, None if average else 1.0))

    # ---- the byte model and the protocol choice -----------------------------------------
    def payload_bytes(self, numel: int, ranks: int | None = None, protocol: str | None = None) -> int:
        """Bytes one rank hands to the collectives for a tensor of `numel` elements over
        `ranks` ranks (default 1), with `protocol` (default: `protocol_for(ranks)`)."""
        ranks = ranks if ranks is not None else 1
        return policy.payload_bytes(self.codec, numel, ranks, protocol or self.protocol_for(ranks))

    def protocol_for(self, ranks: int) -> str:
        """The protocol used over `ranks` ranks: `protocol`, or for "auto" the one that puts
        fewer bytes on each rank's link (policy.py)."""
        key = (self.protocol, ranks)  # compress asks every call: the byte model runs once per size
        if key not in self._protocols:
            self._protocols[key] = policy.protocol_for(self.codec, self.protocol, self.shared_scale_only,
                                                       ranks, self.gather_only)
        return self._protocols[key]

    # ---- helpers -------------------------------------------------------------------------
    def _feedback(self, tensor: Any, key: str | None) -> tuple[Any, Any]:
        """With error feedback: (g + e, the callback that stores e <- g + e - gamma Q(g + e))."""
        if self.memory is None:
            return tensor, None
        if key is None:
            raise ValueError(
                "error_feedback keeps one residual per parameter, but this call does not say which "
                "parameter the tensor is: use horovod_nuq.torch.DistributedOptimizer / "
                "horovod_nuq.tensorflow.DistributedGradientTape / horovod_nuq.keras."
                "DistributedOptimizer or Horovod's torch optimizer, pass name=... to hvd.allreduce, "
                "or key=... to compress")
        compensated = self.memory.compensate(key, tensor)
        return compensated, lambda own: self.memory.keep(key, compensated, own)

    def _gamma(self, out: Any) -> Any:
        gamma = 1.0 if self.memory is None else self.memory.gamma
        return out if gamma == 1.0 else out * gamma

    def _coll(self, xp: Backend) -> Any:
        if self.collectives is not None:
            return self.collectives
        return _collectives.for_framework(xp.name)

    def _process_set(self, called_with: Any) -> Any:
        """The compressor's process set, or else the one Horovod's caller reduces over."""
        if self.process_set is None:
            return called_with
        if called_with is not None and _set_id(called_with) != _set_id(self.process_set):
            raise ValueError("the compressor was made for another process set than the one this "
                             "reduction runs over; give both the same process set")
        return self.process_set


def _check_protocol(protocol: str) -> None:
    if protocol not in policy.PROTOCOLS:
        raise ValueError(f"protocol must be one of {policy.PROTOCOLS}, got {protocol!r}")


def _check_seed(seed: Any) -> None:
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")


def _set_id(process_set: Any) -> Any:
    return getattr(process_set, "process_set_id", process_set)


def _compressor(name: str, scheme: str, doc: str, shared_scale_only: bool = False,
                elias_coded: bool = False) -> type:
    return type(name, (Compressor,), {"scheme_name": scheme, "__doc__": doc,
                                      "shared_scale_only": shared_scale_only, "elias_coded": elias_coded})


QSGDCompressor = _compressor("QSGDCompressor", "qsgd",
                             "QSGD: uniform levels, L2 scale per bucket (default 4 bits, bucket 512); "
                             "encoding='elias' sends the paper's Elias-coded payload.", elias_coded=True)
QSGDInfCompressor = _compressor("QSGDInfCompressor", "qsgdinf",
                                "QSGDinf: uniform levels, max-norm scale per bucket.")
NUQCompressor = _compressor("NUQCompressor", "nuqsgd",
                            "NUQSGD: exponentially spaced levels {0, 2^-(k-1), ..., 1/2, 1}, L2 scale.")
TNQCompressor = _compressor("TNQCompressor", "tnqsgd",
                            "TNQSGD: truncation at alpha = c * mean|v| and non-uniform levels (biased).")
GlobalQSGDCompressor = _compressor("GlobalQSGDCompressor", "globalqsgd",
                                   "Global-QSGD: a scale shared by all ranks; linear or exponential levels.",
                                   shared_scale_only=True)



class HSQCompressor(Compressor):
    """HSQ, hyper-sphere quantization (arXiv 1911.04655; horovod_nuq/hsq.py): each chunk of
    `dim` coordinates as a scalar and the index of one of `codebook_size` unit codewords
    (ceil(log2 K) bits). The scalars take `scalar_bits` bits each (the authors' 6 by default:
    min-max levels per tensor, unbiased stochastic rounding, hsq_scalar.py), 0.875 bits per
    coordinate at the defaults (K = 256, dim = 16); `scalar_bits=32` sends float32 scalars
    (2.5 bits per coordinate).

    Biased (the nearest codeword): pair it with error feedback (`error_feedback=True`).
    Allgather protocol only ("auto" picks it; "allreduce" is refused): indices do not sum.
    The codebook is rebuilt on every rank from `codebook_seed`, never sent. `seed`:
    reproducible rounding of the scalars (each rank draws its own stream from (seed, rank));
    `fused` may be None or False (the encoder is one matrix product, BLAS on the host, the
    GPU's kernels on a GPU).
    """

    scheme_name = "hsq"
    gather_only = True

    def __init__(self, codebook_size: int = hsq.DEFAULT_CODEBOOK_SIZE, dim: int = hsq.DEFAULT_DIM, *,
                 scalar_bits: int = hsq.DEFAULT_SCALAR_BITS,
                 codebook_seed: int = hsq.DEFAULT_CODEBOOK_SEED, protocol: str = "auto",
                 process_set: Any = None, collectives: Any = None, seed: int | None = None,
                 fused: bool | None = None, bits: Any = None, levels: Any = None,
                 bucket_size: Any = None, error_feedback: bool | float = False) -> None:
        _check_protocol(protocol)
        _check_seed(seed)
        for name, value in (("bits", bits), ("levels", levels), ("bucket_size", bucket_size)):
            if value is not None:
                raise ValueError(f"HSQCompressor has no {name}: its size is set by codebook_size "
                                 "(K codewords, ceil(log2 K) index bits per chunk) and dim (the "
                                 "chunk length), e.g. HSQCompressor(codebook_size=256, dim=16)")
        if fused:
            raise ValueError("HSQCompressor has no fused kernels (its encoder is a matrix product "
                             "that already runs on BLAS or the GPU): use fused=None or False")
        self._setup(HSQCodec(hsq.HSQScheme(codebook_size, dim, codebook_seed, scalar_bits), seed),
                    protocol, process_set, collectives, error_feedback)


# the public names, as in hvd.Compression.<name> and the examples' --compression
COMPRESSORS = {"qsgd": QSGDCompressor, "qsgdinf": QSGDInfCompressor, "nuq": NUQCompressor,
               "tnq": TNQCompressor, "globalqsgd": GlobalQSGDCompressor, "hsq": HSQCompressor}
