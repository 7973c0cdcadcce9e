"""QSGD's Elias-coded payload (Alistarh et al., arXiv 1610.02132, Section 3.2): the format,
its validation, and a bit-by-bit NumPy/Python coder that is the test oracle.

The fused C kernels (csrc/nuq_kernels.c, `nuq_elias_encode` / `nuq_elias_decode`) are the
production coder; this module's `encode_stream` / `decode_stream` write the same bytes one bit
at a time from the paper's description, so tests compare the two. One rank's payload:

    float32 settings id | uint32 payload bytes L | float32 scale per bucket |
    uint32 end offset of each chunk's stream | the chunks' streams

(little-endian). The codes (level index in [-k, k] per coordinate, the same integers the
fixed-width code carries) are cut into chunks of `CHUNK` coordinates, the unit of parallel
work. Each chunk is a byte-aligned bit stream, most significant bit first: per non-zero code
the Elias omega code of the gap to it (its position counting from 1, then the distance from
the previous non-zero), a sign bit (1 = negative) and the Elias omega code of |index|; then
the gap that lands one past the chunk's end, and zero bits up to the byte boundary. The
length L makes the payload self-delimiting, so a concatenation of ranks' payloads of
different lengths (Horovod's allgather) splits back into ranks.
"""
from __future__ import annotations

import numpy as np

CHUNK = 65536  # coordinates per independently coded chunk; ELIAS_CHUNK in the C source
HEADER = 8  # settings id and payload length


def omega(n: int) -> str:
    """Elias omega (recursive) code word of a positive integer, as a string of '0'/'1'."""
    if n < 1:
        raise ValueError(f"Elias omega codes positive integers, got {n}")
    code = "0"
    while n > 1:
        b = bin(n)[2:]
        code = b + code
        n = len(b) - 1
    return code


def omega_length(n: int) -> int:
    """Bits of omega(n)."""
    bits = 1
    while n > 1:
        b = n.bit_length()
        bits += b
        n = b - 1
    return bits


def chunks(count: int) -> int:
    """Number of chunks of `count` codes."""
    return -(-count // CHUNK)


def chunk_capacity(length: int, k: int) -> int:
    """Bytes that bound one chunk of `length` codes whatever the codes: each of m non-zeros
    costs omega(gap) + 1 + omega(level) bits, omega(g) <= g + 2, the gaps sum to `length`."""
    bits = length * (1 + 3 + omega_length(k)) + 2
    return -(-bits // 8) + 8


def prefix_bytes(n_buckets: int, count: int) -> int:
    """Bytes before the streams: header, scales, chunk end offsets."""
    return HEADER + 4 * n_buckets + 4 * chunks(count)


# ---- the oracle: straight from the paper's description, one bit at a time --------------
def encode_stream(idx: np.ndarray, k: int) -> tuple[np.ndarray, bytes]:
    """Chunk end offsets (uint32) and the concatenated streams of signed indices `idx`."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size and np.abs(idx).max() > k:
        raise ValueError(f"level indices must lie in [-{k}, {k}]")
    ends, out = [], bytearray()
    for c0 in range(0, idx.size, CHUNK):
        part = idx[c0: c0 + CHUNK]
        bits, last = [], -1
        for p in np.flatnonzero(part):
            bits += [omega(int(p - last)), "1" if part[p] < 0 else "0", omega(int(abs(part[p])))]
            last = int(p)
        bits.append(omega(part.size - last))
        s = "".join(bits)
        s += "0" * (-len(s) % 8)
        out += int(s, 2).to_bytes(len(s) // 8, "big") if s else b""
        ends.append(len(out))
    return np.asarray(ends, dtype=np.uint32), bytes(out)


class _Bits:
    """A string of '0'/'1' read from the front; reading past its end raises."""

    def __init__(self, bits: str) -> None:
        self.bits, self.at = bits, 0

    def take(self, n: int) -> str:
        if self.at + n > len(self.bits):
            raise ValueError("Elias payload: a code word runs past its chunk")
        self.at += n
        return self.bits[self.at - n: self.at]

    def omega(self) -> int:
        n = 1
        while self.take(1) == "1":
            if n > 40:
                raise ValueError("Elias payload: a code word longer than any this format makes")
            n = int("1" + self.take(n), 2)
        return n


def decode_stream(ends: np.ndarray, stream: bytes, count: int, k: int) -> np.ndarray:
    """Inverse of encode_stream: `count` signed indices; ValueError if malformed."""
    out = np.zeros(count, dtype=np.int64)
    lo = 0
    for c, c0 in enumerate(range(0, count, CHUNK)):
        length = min(CHUNK, count - c0)
        r = _Bits("".join(f"{b:08b}" for b in stream[lo: int(ends[c])]))
        lo, pos = int(ends[c]), -1
        while True:
            gap = r.omega()
            if pos + gap > length:
                raise ValueError("Elias payload: a gap runs past its chunk")
            pos += gap
            if pos == length:
                break
            neg = r.take(1) == "1"
            level = r.omega()
            if level > k:
                raise ValueError(f"Elias payload: a level index exceeds k = {k}")
            out[c0 + pos] = -level if neg else level
        rest = r.bits[r.at:]
        if len(rest) >= 8 or "1" in rest:
            raise ValueError("Elias payload: bits after a chunk's end")
    return out


# ---- the payload's frame: assembly and validated splitting into ranks -------------------
def frame(settings_id: float, scales: np.ndarray, ends: np.ndarray, out: np.ndarray) -> int:
    """Write header, scales and chunk ends into the prefix of `out` (the streams follow it);
    returns the payload's length."""
    nb, nc = scales.size, ends.size
    total = HEADER + 4 * nb + 4 * nc + (int(ends[-1]) if nc else 0)
    if total >= 1 << 32:
        raise ValueError(f"Elias payload of {total} bytes exceeds the 4 GiB its length field holds; "
                         "split the tensor")
    out[:4] = np.frombuffer(np.float32(settings_id).tobytes(), np.uint8)
    out[4:8] = np.frombuffer(np.uint32(total).tobytes(), np.uint8)
    out[8: 8 + 4 * nb] = np.frombuffer(scales.astype("<f4").tobytes(), np.uint8)
    out[8 + 4 * nb: 8 + 4 * nb + 4 * nc] = np.frombuffer(ends.astype("<u4").tobytes(), np.uint8)
    return total


def split_ranks(gathered: np.ndarray, n_buckets: int, count: int, settings_id: float,
                describe: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each rank's (scales, chunk ends, streams) from a concatenation of payloads, after
    checking every frame: settings id, length, chunk offsets. ValueError names the problem."""
    data = np.ascontiguousarray(gathered, dtype=np.uint8).reshape(-1)
    nc = chunks(count)
    prefix = prefix_bytes(n_buckets, count)
    parts, at = [], 0
    if data.size == 0:
        raise ValueError("Elias allgather payload is empty: no rank's payload arrived")
    while at < data.size:
        rank = len(parts)
        if data.size - at < prefix:
            raise ValueError(f"Elias allgather payload of rank {rank} is truncated: {data.size - at} "
                             f"bytes left, its header alone takes {prefix}")
        sid = data[at: at + 4].view("<f4")[0]
        if sid != np.float32(settings_id):
            raise ValueError(f"Elias allgather payload of rank {rank} was made with other compressor "
                             f"settings or another tensor size than this rank's {describe} for "
                             f"{count} codes (or is corrupt). Give every rank the same compressor.")
        total = int(data[at + 4: at + 8].view("<u4")[0])
        scales = data[at + 8: at + 8 + 4 * n_buckets].view("<f4")
        ends = data[at + 8 + 4 * n_buckets: at + prefix].view("<u4")
        if total < prefix or at + total > data.size:
            raise ValueError(f"Elias allgather payload of rank {rank} says {total} bytes, but "
                             f"{data.size - at} are left and its header takes {prefix}: truncated or corrupt")
        if nc and (int(ends[-1]) != total - prefix or np.any(np.diff(ends.astype(np.int64)) < 0)):
            raise ValueError(f"Elias allgather payload of rank {rank}: chunk offsets do not match its "
                             "length (corrupt payload)")
        parts.append((scales, ends, data[at + prefix: at + total]))
        at += total
    return parts
