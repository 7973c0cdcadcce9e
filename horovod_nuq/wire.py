"""Wire formats: how quantized buckets become the bytes handed to a Horovod collective.

Two formats, both written once against the Backend interface:
- bit-packed codes (allgather): signed indices in [-k, k] offset to [0, 2k] and packed
  `bits` per code, 8 codes per `bits` bytes;
- summable words (allreduce): signed integer fields offset to be non-negative, packed into
  float64 words with enough headroom that the sum over n ranks cannot carry between fields,
  followed by one sentinel 1.0 that tells Sum from Average (and any linear pre/postscale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends import Backend

Array = Any


def _shifts(xp: Backend, step: int, count: int, like: Array) -> Array:
    return xp.constant(np.arange(count, dtype=np.int64) * step, like)


# ---- bit-packed codes (protocol B) -------------------------------------------------------
def packed_code_bytes(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take: whole groups of 8 codes."""
    return -(-count // 8) * bits


def pack_codes(xp: Backend, idx: Array, k: int, bits: int) -> Array:
    """Pack signed indices in [-k, k] into uint8, `bits` bits each (8 codes -> `bits` bytes)."""
    return pack_fields(xp, xp.reshape(idx + k, [-1]), bits)


def pack_fields(xp: Backend, codes: Array, bits: int) -> Array:
    """Pack non-negative int64 codes below 2^bits (bits <= 8) into uint8, 8 codes -> `bits` bytes."""
    n = xp.numel(codes)
    groups = -(-n // 8)
    if groups * 8 != n:
        codes = xp.pad_to(codes, groups * 8)
    if bits == 8:
        return xp.cast(codes, "uint8")
    codes = xp.reshape(codes, [groups, 8])
    word = xp.row_sum(xp.shl(codes, _shifts(xp, bits, 8, codes)))  # < 2^56
    out = xp.bit_and(xp.shr(xp.reshape(word, [groups, 1]), _shifts(xp, 8, bits, word)), 255)
    return xp.cast(xp.reshape(out, [-1]), "uint8")


def unpack_fields(xp: Backend, data: Array, bits: int, count: int) -> Array:
    """Inverse of pack_fields: `count` non-negative codes (int64) from packed uint8 bytes."""
    nbytes = packed_code_bytes(count, bits)
    if xp.numel(data) != nbytes:
        raise ValueError(f"packed codes: expected {nbytes} bytes for {count} codes of {bits} bits, "
                         f"got {xp.numel(data)}")
    b = xp.cast(data, "int64")
    if bits == 8:
        codes = b
    else:
        groups = nbytes // bits
        b = xp.reshape(b, [groups, bits])
        word = xp.row_sum(xp.shl(b, _shifts(xp, 8, bits, b)))
        codes = xp.bit_and(xp.shr(xp.reshape(word, [groups, 1]), _shifts(xp, bits, 8, word)),
                           (1 << bits) - 1)
        codes = xp.reshape(codes, [-1])
    if groups_pad := xp.numel(codes) - count:
        codes = xp.split(codes, [count, groups_pad])[0]
    return codes


def unpack_codes(xp: Backend, data: Array, k: int, bits: int, count: int) -> Array:
    """Inverse of pack_codes: `count` signed indices (int64) from packed uint8 bytes."""
    codes = unpack_fields(xp, data, bits, count)
    if 2 * k < (1 << bits) - 1 and xp.numel(codes):
        xp.require(xp.max_all(codes) <= 2 * k,
                   f"packed codes: a code exceeds 2k = {2 * k}: the payload is corrupt or was "
                   "made with other settings")
    return codes - k


# ---- summable words (protocol A) ---------------------------------------------------------
def word_budget(ranks: int) -> int:
    """Bits a float64 word may use so that n-rank sums, scaled by Horovod's Average (x 1/n)
    and pre/postscale factors, still round back to the exact integer (error < 1/4)."""
    return 50 - (2 * ranks + 3).bit_length()


@dataclass(frozen=True)
class SumLayout:
    """Field layout of summable words for values in [-bound, bound] summed over `ranks` ranks."""

    bound: int
    ranks: int

    @property
    def width(self) -> int:
        return (2 * self.bound * self.ranks).bit_length()

    @property
    def per_word(self) -> int:
        return word_budget(self.ranks) // self.width

    def words(self, count: int) -> int:
        return -(-count // self.per_word)

    def payload_bytes(self, count: int) -> int:
        return 8 * (self.words(count) + 1)

    def check(self) -> SumLayout:
        if self.ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {self.ranks}")
        if self.per_word < 3:
            raise ValueError(
                f"allreduce protocol: level values up to {self.bound} summed over {self.ranks} ranks "
                f"need {self.width}-bit fields, so only {self.per_word} fit a 64-bit word and the "
                "payload would not be smaller than float32. Use fewer bits or levels, "
                "spacing='linear', or protocol='allgather' (or 'auto') with "
                "horovod_nuq.torch.DistributedOptimizer / horovod_nuq.tensorflow.DistributedGradientTape.")
        return self


def pack_sums(xp: Backend, values: Array, layout: SumLayout) -> Array:
    """Pack integers in [-bound, bound] into float64 words whose elementwise sum is exact."""
    f = xp.reshape(values + layout.bound, [-1])
    n = xp.numel(f)
    per = layout.per_word
    nw = layout.words(n)
    if nw * per != n:
        f = xp.pad_to(f, nw * per)
    f = xp.reshape(f, [nw, per])
    words = xp.row_sum(xp.shl(f, _shifts(xp, layout.width, per, f)))
    one = xp.constant(np.ones(1, dtype=np.float64), words)
    return xp.concat([xp.cast(words, "float64"), one])


BAD_SENTINEL = ("summable payload: the sentinel is not a positive scale, so the reduction was not "
                "Sum or Average (Adasum is not supported by the allreduce protocol)")


def not_integer_message(ranks: int) -> str:
    return ("summable payload: words are not integer after undoing the reduction's scale. The "
            f"reduction was not a plain Sum/Average over the expected ranks ({ranks}): Adasum, a "
            "process set of another size, or ranks with different compressor settings.")


def unpack_sums(xp: Backend, payload: Array, layout: SumLayout, count: int) -> tuple[Array, Array]:
    """Integer sums over ranks from a reduced payload, and the sentinel value.

    The sentinel reads `ranks` after Sum and 1 after Average; any linear scaling moves it
    and the words together, so words * ranks / sentinel are the exact integer sums. A
    payload that is not integer after that rescaling (Adasum, mismatched ranks, corruption)
    raises instead of decoding garbage.
    """
    nw = layout.words(count)
    if xp.numel(payload) != nw + 1:
        raise ValueError(f"summable payload: expected {nw + 1} float64 words, got {xp.numel(payload)}")
    words, sentinel = xp.split(payload, [nw, 1])
    xp.require(xp.max_all(sentinel) > 0, BAD_SENTINEL)
    scaled = words * (np.float64(layout.ranks) / sentinel)
    rounded = xp.round(scaled)
    if nw:
        xp.require(xp.max_all(xp.abs(scaled - rounded)) < 0.25, not_integer_message(layout.ranks))
    w = xp.cast(rounded, "int64")
    per = layout.per_word
    fields = xp.bit_and(xp.shr(xp.reshape(w, [nw, 1]), _shifts(xp, layout.width, per, w)),
                        (1 << layout.width) - 1)
    fields = xp.reshape(fields, [-1])
    if xp.numel(fields) != count:
        fields = xp.split(fields, [count, xp.numel(fields) - count])[0]
    return fields - layout.bound * layout.ranks, sentinel


# ---- the sentinel that rides Horovod's allreduce beside a gathered payload ---------------
SENTINEL_WORDS = 3


def sentinel(tag: int) -> np.ndarray:
    """[1, t, t^2] as float64: after any linear reduction c * sum over n ranks it reads
    c*n * [1, mean t, mean t^2], so it gives the reduction's scale c*n, and the tags of the
    ranks agree exactly when mean t^2 = (mean t)^2 = t^2 (zero variance)."""
    return np.array([1.0, tag, tag * tag], dtype=np.float64)


def read_sentinel(xp: Backend, reduced: Array, tag: int, what: str) -> Array:
    """The reduction's scale c*n from a reduced sentinel (a float64 scalar array), after
    checking it is a positive scale and every rank paired the same payload with it."""
    s0, s1, s2 = xp.split(xp.reshape(reduced, [-1]), [1, 1, 1])
    xp.require(xp.max_all(s0) > 0, BAD_SENTINEL)
    mean1, mean2 = s1 / s0, s2 / s0
    tol = 1e-6 * (1 + tag * tag)
    xp.require(xp.max_all(xp.abs(mean2 - mean1 * mean1)) <= tol,
               f"horovod_nuq: the gathered payload paired with {what} is another tensor on some "
               "rank: ranks submitted same-size gradients in different orders, or gave the "
               "compressor different tensors. Submit gradients in the same order on every rank "
               "(or use horovod_nuq's DistributedOptimizer, which names each by its parameter).")
    xp.require(xp.max_all(xp.abs(mean1 - np.float64(tag))) <= tol, BAD_SENTINEL)
    return s0
