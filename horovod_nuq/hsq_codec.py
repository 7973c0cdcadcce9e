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

from . import codec, hsq
from .backends import Backend, backend_for
from .tensor_codec import Context, frontend


class HSQCodec:
    """Encode a tensor as one float32 scalar and one packed codeword index per chunk, and
    decode gathered payloads (see hsq.py for the scheme). The codebook is rebuilt from its
    seed on every rank; its CRC is part of the settings id in each payload's header."""

    seed = None  # HSQ draws no random numbers
    fused = None  # no fused kernels: the encoder is one matrix product (BLAS or the GPU)

    def __init__(self, scheme: hsq.HSQScheme) -> None:
        self.scheme = scheme
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

    def layout(self, ranks: int) -> Any:
        raise ValueError("HSQ sends codeword indices, which do not sum: it runs over the allgather "
                         "protocol only; use protocol='allgather' or 'auto'")

    # ---- packed payloads (allgather) ---------------------------------------------------
    def gathered_payload_bytes(self, numel: int) -> int:
        return hsq.payload_bytes(self.scheme, numel)

    def encode_codes(self, tensor: Any, coll: Any = None) -> tuple[Any, Context]:
        """This rank's payload: settings id (float32), the chunks' scalars (float32), packed
        indices; all uint8. `coll` is unused (no random stream), kept for the transports."""
        xp = self.frontend(tensor)
        ctx = self.context(xp, tensor)
        chunks = hsq.to_chunks(xp, tensor, self.scheme.dim)
        _, codewords_t = self.codewords(xp, chunks)
        u, k = hsq.encode(xp, chunks, codewords_t)
        header = xp.constant(np.array([self.settings_id(ctx.numel)], dtype=np.float32), u)
        payload = xp.concat([xp.bitcast(header, "uint8"), xp.bitcast(u, "uint8"),
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
        for i, part in enumerate(xp.split(xp.reshape(gathered, [-1]), [per_rank] * ranks)):
            header, u, packed = xp.split(part, [4, 4 * nc, per_rank - 4 - 4 * nc])
            xp.require(xp.max_all(xp.abs(xp.bitcast(header, "float32") - tid)) == 0,
                       f"HSQ allgather payload of rank {i} was made with other settings, another "
                       f"codebook or another tensor size than this rank's {self.scheme.describe()} "
                       f"for {ctx.numel} elements (or is corrupt). Give every rank the same compressor.")
            k = hsq.unpack_indices(xp, packed, self.scheme.index_bits, nc, self.scheme.codebook_size)
            q = hsq.decode(xp, xp.bitcast(u, "float32") * np.float32(factor), k, codewords)
            acc = q if acc is None else acc + q
        return codec.from_buckets(xp, acc, ctx.numel, ctx.shape, ctx.dtype)

    def ranks_in(self, gathered: Any, ctx: Context) -> int:
        """How many rank payloads an allgather result holds."""
        return backend_for(gathered).numel(gathered) // self.gathered_payload_bytes(ctx.numel)
