"""Hyper-sphere quantization (HSQ): the scheme math, written once against the Backend interface.

HSQ (Dai, Yan, Zhou, Yang, Ng, Cheng, Fan, "Hyper-Sphere Quantization: Communication-Efficient
SGD for Federated Learning", arXiv 1911.04655) cuts a gradient into chunks of `dim`
coordinates and sends each chunk v as one scalar and the index of a codeword of a codebook
C of `codebook_size` unit vectors, known to every worker, never sent. What is implemented
here follows the authors' code, xinyandai/gradient-quantization (the paper's text was not
reachable from this machine; only its abstract was):

- encoder (compressors/nearest_neighbor_compressor.py, which main.py registers as "hsq"):
  p = C v (one matrix product for all chunks), k = argmax_i |p_i|, and the scalar sent is
  the signed projection u = p_k = c_k . v (not ||v||). So every chunk costs
  ceil(log2 K) bits of index plus the scalar, and the decoder returns Q(v) = u c_k, the
  orthogonal projection of v on its best codeword (the codebook is used as +-C);
- codebook (codebook_generator.py): k-means on unit-normalized Gaussian samples (a codebook
  spread evenly over the sphere), or a random orthonormal basis when K == dim; the authors
  ship the k-means codebooks as files, here they are rebuilt from a seed on every rank
  (spherical k-means in float64, `codebook`) and a CRC of the codebook rides in each payload
  header, so ranks whose codebooks differ raise instead of decoding garbage;
- defaults: chunk length d = 16 and K = 2^8 = 256 codewords, the setting of the
  authors' README ("Run HSQ(d=16, m=2^8=256, 6bit for norm quantization)");
- the scalars: as the authors, each tensor's scalars are quantized to `scalar_bits` = 6 bits
  on evenly spaced levels between their minimum and maximum, with unbiased stochastic
  rounding (hsq_scalar.py, which cites the lines followed), so a chunk costs 6 + 8 bits:
  0.875 bits per coordinate at the defaults, the paper's figure. `scalar_bits=32` sends them
  as float32 instead (2.5 bits per coordinate).

Bias: the codeword choice is deterministic, so E[Q(v)] = u c_k != v (the stochastic
rounding of the scalar only adds zero-mean noise around u). The error is exactly
||v - Q(v)||^2 = ||v||^2 - (c_k . v)^2 per chunk, and on average Q shrinks v towards its
codewords. The authors' training uses error feedback (main.py --ef, quantizers/
ps_quantizer.py: the residual g - Q(g) is added to the next step's gradient); error feedback
is HSQ's companion here too (the compressors' `error_feedback=True` option). The multi-rank unbiasedness harness does not apply; the bias
is measured instead (tests/unit/test_hsq.py, benchmarks/hsq_quality.py).
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import hsq_scalar, wire
from .backends import Backend

Array = Any
DEFAULT_CODEBOOK_SIZE = 256  # the authors' README: m = 2^8
DEFAULT_DIM = 16  # the authors' README: d = 16
DEFAULT_CODEBOOK_SEED = 808  # the seed of the authors' codebook_generator.py
DEFAULT_SCALAR_BITS = 6  # the authors' README: "6bit for norm quantization" (--n-bit 6)
FLOAT_SCALARS = 32  # scalar_bits that sends the scalars as float32
MAX_SCALAR_BITS = 16  # quantized scalars are packed as indices are, in at most 16 bits
MAX_CODEBOOK_SIZE = 1 << 16  # indices are packed in at most 16 bits
KMEANS_ITERATIONS = 20  # as the authors' generator
KMEANS_POINTS_PER_CODEWORD = 32
# scores c . v computed at once: 16 MB of float32. Unblocked, a 64 MB tensor would need 1 GB
# of scores at K = 256, dim = 16 (K / dim times the input); blocks also stay in cache.
BLOCK_SCORES = 1 << 22


@dataclass(frozen=True)
class HSQScheme:
    """HSQ's configuration: codebook size K, chunk length `dim`, the codebook's seed, and the
    bits of each chunk's scalar (1 to 16: quantized per tensor; 32: float32)."""

    codebook_size: int = DEFAULT_CODEBOOK_SIZE
    dim: int = DEFAULT_DIM
    codebook_seed: int = DEFAULT_CODEBOOK_SEED
    scalar_bits: int = DEFAULT_SCALAR_BITS
    name = "hsq"

    def __post_init__(self) -> None:
        for what, value, low in (("codebook_size", self.codebook_size, 2), ("dim", self.dim, 1),
                                 ("codebook_seed", self.codebook_seed, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"HSQ {what} must be an int >= {low}, got {value!r}")
        if self.codebook_size > MAX_CODEBOOK_SIZE:
            raise ValueError(f"HSQ codebook_size must be at most {MAX_CODEBOOK_SIZE} (indices are "
                             f"packed in 16 bits), got {self.codebook_size}")
        b = self.scalar_bits
        if (not isinstance(b, (int, np.integer)) or isinstance(b, bool)
                or not (1 <= b <= MAX_SCALAR_BITS or b == FLOAT_SCALARS)):
            raise ValueError(f"HSQ scalar_bits must be an int from 1 to {MAX_SCALAR_BITS} (the "
                             f"scalars quantized per tensor; the authors use 6) or {FLOAT_SCALARS} "
                             f"(float32 scalars), got {b!r}")

    @property
    def index_bits(self) -> int:
        """Bits of one codeword index: ceil(log2 K)."""
        return max(1, math.ceil(math.log2(self.codebook_size)))

    @property
    def bucket_size(self) -> int:
        """Coordinates per scale (one chunk), as the other schemes call it."""
        return self.dim

    @property
    def quantized_scalars(self) -> bool:
        """Whether the scalars are quantized (scalar_bits < 32) rather than sent as float32."""
        return self.scalar_bits != FLOAT_SCALARS

    def describe(self) -> str:
        scalars = f"{self.scalar_bits}-bit scalars" if self.quantized_scalars else "float32 scalars"
        return f"hsq, codebook {self.codebook_size} x {self.dim}, seed {self.codebook_seed}, {scalars}"


def n_chunks(numel: int, dim: int) -> int:
    return max(1, -(-numel // dim))


def payload_bytes(scheme: HSQScheme, numel: int) -> int:
    """One rank's payload: 4-byte settings id, the chunks' scalars (`scalar_bytes`) and a
    packed index per chunk."""
    nc = n_chunks(numel, scheme.dim)
    return 4 + scalar_bytes(scheme, nc) + wire.packed_code_bytes(nc, scheme.index_bits)


def scalar_bytes(scheme: HSQScheme, nc: int) -> int:
    """Bytes of `nc` scalars: float32 each, or (quantized) the tensor's float32 min and max
    followed by `scalar_bits`-bit codes packed 8 per `scalar_bits` bytes."""
    if not scheme.quantized_scalars:
        return 4 * nc
    return hsq_scalar.BOUNDS_BYTES + wire.packed_code_bytes(nc, scheme.scalar_bits)


# ---- the codebook ----------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def codebook(codebook_size: int, dim: int, seed: int) -> np.ndarray:
    """K unit vectors in R^dim as float32 [K, dim], the same from the same arguments.

    K == dim: a random orthonormal basis (as the authors' code). Otherwise k-means on the
    sphere (as the authors' generator) made to match the encoder, which uses the codebook as
    +-C: each of 32 K unit-normalized Gaussian points joins the codeword of largest |c . x|
    and counts with the sign of c . x; centroids are renormalized. Started from K of the
    points, 20 iterations, float64 throughout, rounded once to float32. (At K = 256, d = 16
    it lowers the error ||v - Q(v)|| / ||v|| on Gaussian chunks only from 0.728, random unit
    vectors, to 0.723: the codebook's spread matters little at this size.)
    """
    rng = np.random.default_rng([seed, codebook_size, dim])
    if codebook_size == dim:
        q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
        c = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    else:
        x = _unit_rows(rng.standard_normal((KMEANS_POINTS_PER_CODEWORD * codebook_size, dim)))
        c = x[:codebook_size].copy()
        for _ in range(KMEANS_ITERATIONS):
            p = x @ c.T
            nearest = np.argmax(np.abs(p), axis=1)
            sums = np.zeros_like(c)
            np.add.at(sums, nearest, x * np.sign(p[np.arange(len(x)), nearest])[:, None])
            moved = np.linalg.norm(sums, axis=1) > 0  # an empty cluster keeps its codeword
            c[moved] = _unit_rows(sums[moved])
    out = np.ascontiguousarray(c, dtype=np.float32)
    out.setflags(write=False)
    return out


def codebook_crc(c: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(c, dtype=np.float32).tobytes())


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.sum(x * x, axis=1, keepdims=True))


# ---- encode and decode on any backend --------------------------------------------------
def to_chunks(xp: Backend, tensor: Array, dim: int) -> Array:
    """The tensor as float32 [n_chunks, dim], the tail zero padded."""
    flat = xp.reshape(xp.cast(tensor, "float32"), [-1])
    n = xp.numel(flat)
    nc = n_chunks(n, dim)
    if nc * dim != n:
        flat = xp.pad_to(flat, nc * dim)
    return xp.reshape(flat, [nc, dim])


def encode(xp: Backend, chunks: Array, codewords_t: Array) -> tuple[Array, Array]:
    """(u, k) per chunk: k = argmax_i |c_i . v|, u = c_k . v. `codewords_t` is C^T [dim, K].
    Blocks of chunks bound the scores held at once to BLOCK_SCORES."""
    n, rows = xp.shape(chunks)[0], max(1, BLOCK_SCORES // xp.shape(codewords_t)[1])
    if n <= rows:
        return _encode_block(xp, chunks, codewords_t)
    sizes = [rows] * (n // rows) + ([n % rows] if n % rows else [])
    us, ks = zip(*[_encode_block(xp, b, codewords_t) for b in xp.split(chunks, sizes)])
    return xp.concat(us), xp.concat(ks)


def _encode_block(xp: Backend, chunks: Array, codewords_t: Array) -> tuple[Array, Array]:
    p = xp.matmul(chunks, codewords_t)
    k = xp.argmax_rows(xp.abs(p))
    return xp.pick(p, k), k


def decode(xp: Backend, u: Array, k: Array, codewords: Array) -> Array:
    """u * c_k per chunk, [n_chunks, dim]."""
    return xp.take_rows(codewords, k) * xp.reshape(u, [-1, 1])


def pack_indices(xp: Backend, k: Array, bits: int) -> Array:
    """Indices below 2^bits (bits <= 16) as uint8, `bits` bits each (8 indices -> `bits` bytes);
    the codes of quantized scalars too. Above 8 bits the low byte of each index is sent
    whole, the rest packed after it."""
    k = xp.reshape(k, [-1])
    if bits <= 8:
        return wire.pack_fields(xp, k, bits)
    return xp.concat([wire.pack_fields(xp, xp.bit_and(k, 255), 8),
                      wire.pack_fields(xp, xp.shr(k, xp.constant(np.array(8, np.int64), k)), bits - 8)])


def unpack_indices(xp: Backend, data: Array, bits: int, count: int, codebook_size: int) -> Array:
    """Inverse of pack_indices, refusing an index >= codebook_size (a corrupt payload)."""
    if xp.numel(data) != wire.packed_code_bytes(count, bits):
        raise ValueError(f"HSQ indices: expected {wire.packed_code_bytes(count, bits)} bytes for "
                         f"{count} indices of {bits} bits, got {xp.numel(data)}")
    if bits <= 8:
        k = wire.unpack_fields(xp, data, bits, count)
    else:
        low_bytes = wire.packed_code_bytes(count, 8)
        low, high = xp.split(data, [low_bytes, xp.numel(data) - low_bytes])
        high = wire.unpack_fields(xp, high, bits - 8, count)
        k = wire.unpack_fields(xp, low, 8, count) + xp.shl(high, xp.constant(np.array(8, np.int64), high))
    if codebook_size < (1 << bits):
        xp.require(xp.max_all(k) < codebook_size,
                   f"HSQ payload: a codeword index is >= the codebook size {codebook_size}: the "
                   "payload is corrupt or was made with other settings")
    return k
