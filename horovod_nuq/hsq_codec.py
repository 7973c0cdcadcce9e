"""HSQ's tensor <-> payload steps: the codec object the gathered transports talk to.

It offers what `transports.Gathered` and `transports.SentinelGather` call on a
`TensorCodec` (encode_codes, decode_codes, ranks_in) and what the byte model asks
(gathered_payload_bytes), on any backend; it does no communication. HSQ's codeword indices
do not sum, so it has no summable form: `layout` refuses the allreduce protocol.
"""
from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from . import codec, hsq, hsq_scalar
from .backends import Backend, backend_for
from .collectives import LOCAL
from .tensor_codec import Context, frontend, rank_draws


class HSQCodec:
    """Encode a tensor as one scalar and one packed codeword index per chunk, and decode
    gathered payloads (see hsq.py for the scheme). The scalars are the tensor's min and max
    plus `scalar_bits`-bit codes, stochastically rounded from this rank's random stream
    (drawn from (seed, rank); hsq_scalar.py), or float32 at scalar_bits = 32. The codebook is
    rebuilt from its seed on every rank; its CRC is part of the settings id in each payload's
    header."""

    fused = None  # no fused kernels: the encoder is one matrix product (BLAS or the GPU)

    def __init__(self, scheme: hsq.HSQScheme, seed: int | None = None) -> None:
        self.scheme = scheme
        self.seed = seed
        self._draws: Any = None
        self.codebook = hsq.codebook(scheme.codebook_size, scheme.dim, scheme.codebook_seed)
        self._crc = hsq.codebook_crc(self.codebook)
        self._on_device: dict[Any, tuple[Any, Any]] = {}
        self._ids: dict[Any, float] = {}

    # ---- per tensor --------------------------------------------------------------------
    def frontend(self, tensor: Any) -> Backend:
        return frontend(tensor)

    def context(self, xp: Backend, tensor: Any) -> Context:
        numel = xp.numel(tensor)
        return Context(xp.shape(tensor), xp.dtype_name(tensor), numel, hsq.n_chunks(numel, self.scheme.dim))

    def settings_id(self, numel: int | None) -> float:
        """Settings, codebook and tensor size as a float32-exact integer ranks can compare."""
        if numel not in self._ids:
            text = f"{self.scheme.describe()}/{self._crc}/{numel}"
            self._ids[numel] = float(zlib.crc32(text.encode()) % (1 << 24))
        return self._ids[numel]

    def codewords(self, xp: Backend, like: Any) -> tuple[Any, Any]:
        """(C [K, dim], C^T [dim, K]) on `like`'s device, cached outside graphs."""
        make = lambda: (xp.constant(np.array(self.codebook), like),  # writable copies: frameworks
                        xp.constant(np.array(self.codebook.T, order="C"), like))  # adopt them
        if not xp.can_cache(like):
            return make()
        key = (xp.name, xp.device_key(like))
        if key not in self._on_device:
            self._on_device[key] = make()
        return self._on_device[key]

    def draws(self, coll: Any) -> Any:
        """This rank's random stream for the scalars' rounding (coll None: one local rank)."""
        self._draws = rank_draws(self.seed, self._draws, coll if coll is not None else LOCAL)
        return self._draws

    def layout(self, ranks: int) -> Any:
        raise ValueError("HSQ sends codeword indices, which do not sum: it runs over the allgather "
                         "protocol only; use protocol='allgather' or 'auto'")

    # ---- packed payloads (allgather) ---------------------------------------------------
    def gathered_payload_bytes(self, numel: int) -> int:
        return hsq.payload_bytes(self.scheme, numel)

    def encode_codes(self, tensor: Any, coll: Any = None) -> tuple[Any, Context]:
        """This rank's payload, all uint8: settings id (float32), the chunks' scalars (float32
        min and max, then packed codes; or float32 each), packed indices. `coll` gives the
        rank whose random stream rounds the scalars (None: a single process)."""
        xp = self.frontend(tensor)
        ctx = self.context(xp, tensor)
        chunks = hsq.to_chunks(xp, tensor, self.scheme.dim)
        _, codewords_t = self.codewords(xp, chunks)
        u, k = hsq.encode(xp, chunks, codewords_t)
        header = xp.constant(np.array([self.settings_id(ctx.numel)], dtype=np.float32), u)
        bits = self.scheme.scalar_bits
        if self.scheme.quantized_scalars:
            bounds, codes = hsq_scalar.quantize(xp, u, self.draws(coll).uniform(xp, u), bits)
            scalars = [xp.bitcast(bounds, "uint8"), hsq.pack_indices(xp, codes, bits)]
        else:
            scalars = [xp.bitcast(u, "uint8")]
        payload = xp.concat([xp.bitcast(header, "uint8"), *scalars,
                             hsq.pack_indices(xp, k, self.scheme.index_bits)])
        return payload, ctx

    def decode_codes(self, gathered: Any, ctx: Context, factor: float | None = None) -> Any:
        """`factor` times the sum of every rank's reconstruction, in rank order (default
        factor: 1 / ranks, the average)."""
        xp = backend_for(gathered)
        nc, per_rank = ctx.n_buckets, self.gathered_payload_bytes(ctx.numel)
        total = xp.numel(gathered)
        if total == 0 or total % per_rank:
            raise ValueError(f"HSQ allgather payload of {total} bytes is not a whole number of "
                             f"{per_rank}-byte rank payloads for a tensor of {ctx.numel} elements: "
                             "ranks used different compressor settings or tensor shapes, or the "
                             "payload was truncated")
        ranks = total // per_rank
        factor = 1.0 / ranks if factor is None else factor
        tid = np.float32(self.settings_id(ctx.numel))
        codewords, _ = self.codewords(xp, gathered)
        acc = None
        sbytes = hsq.scalar_bytes(self.scheme, nc)
        for i, part in enumerate(xp.split(xp.reshape(gathered, [-1]), [per_rank] * ranks)):
            header, scalars, packed = xp.split(part, [4, sbytes, per_rank - 4 - sbytes])
            xp.require(xp.max_all(xp.abs(xp.bitcast(header, "float32") - tid)) == 0,
                       f"HSQ allgather payload of rank {i} was made with other settings, another "
                       f"codebook or another tensor size than this rank's {self.scheme.describe()} "
                       f"for {ctx.numel} elements (or is corrupt). Give every rank the same compressor.")
            u = self._scalars(xp, scalars, nc, i)
            k = hsq.unpack_indices(xp, packed, self.scheme.index_bits, nc, self.scheme.codebook_size)
            q = hsq.decode(xp, u * np.float32(factor), k, codewords)
            acc = q if acc is None else acc + q
        return codec.from_buckets(xp, acc, ctx.numel, ctx.shape, ctx.dtype)

    def _scalars(self, xp: Backend, data: Any, nc: int, rank: int) -> Any:
        """The `nc` float32 scalars of one rank's payload bytes `data`."""
        if not self.scheme.quantized_scalars:
            return xp.bitcast(data, "float32")
        bits = self.scheme.scalar_bits
        bound_bytes, packed = xp.split(data, [hsq_scalar.BOUNDS_BYTES, xp.numel(data) - hsq_scalar.BOUNDS_BYTES])
        bounds = xp.bitcast(bound_bytes, "float32")
        hsq_scalar.check_bounds(xp, bounds, rank)
        return hsq_scalar.dequantize(xp, bounds, hsq.unpack_indices(xp, packed, bits, nc, 1 << bits), bits)

    def ranks_in(self, gathered: Any, ctx: Context) -> int:
        """How many rank payloads an allgather result holds."""
        return backend_for(gathered).numel(gathered) // self.gathered_payload_bytes(ctx.numel)
