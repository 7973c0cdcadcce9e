"""Two interchangeable implementations of a scheme's encode and decode steps.

- GenericEngine: codec.py + wire.py over any Backend (torch CPU/CUDA, TF eager or inside
  tf.function, NumPy); many vectorized passes.
- FusedEngine: the C kernels (kernels.py), one pass per stage, for tensors in host memory.
Both produce the same wire formats, so ranks may mix them.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import codec, elias, kernels, wire
from .backends import Backend
from .backends.base import host_empty
from .schemes import Scheme

Array = Any
_SCALE_MODES = {"l2": 0, "max": 1, "laplace": 2}


class GenericEngine:
    """Encode and decode with the vectorized codec on the tensor's own device."""

    def __init__(self, xp: Backend, scheme: Scheme, tables: codec.Tables) -> None:
        self.xp, self.scheme, self.tables = xp, scheme, tables

    def work(self, tensor: Array) -> Array:
        """The tensor in the form the encoders read (here: float32 buckets)."""
        return codec.to_buckets(self.xp, tensor, self.scheme.bucket_size)

    def scales(self, tensor: Array, numel: int) -> tuple[Array, Array]:
        v = self.work(tensor)
        return v, codec.local_scale(self.xp, v, self.scheme, numel)

    def _indices(self, v: Array, r: Array, draws: Any) -> Array:
        return codec.quantize(self.xp, v, r, self.tables, draws.uniform(self.xp, v))

    def encode_sums(self, v: Array, r: Array, layout: wire.SumLayout, draws: Any) -> Array:
        idx = self._indices(v, r, draws)
        return wire.pack_sums(self.xp, codec.numerators(self.xp, idx, self.tables), layout)

    def encode_codes(self, v: Array, r: Array, draws: Any) -> Array:
        idx = self._indices(v, r, draws)
        return wire.pack_codes(self.xp, idx, self.tables.k, self.scheme.code_bits)

    def decode_sums(self, payload: Array, r: Array, layout: wire.SumLayout, nb: int) -> Array:
        xp, bs = self.xp, self.scheme.bucket_size
        sums, sentinel = wire.unpack_sums(xp, payload, layout, nb * bs)
        total = codec.from_numerator_sums(xp, xp.reshape(sums, [nb, bs]), r, self.tables)
        return total * xp.cast(sentinel / np.float64(layout.ranks), "float32")

    def decode_codes(self, codes: Array, r: Array, nb: int, acc: Array | None, scale: float = 1.0) -> Array:
        """Add r * level (times `scale`, e.g. 1 / ranks) of one rank's codes into acc."""
        xp, bs = self.xp, self.scheme.bucket_size
        idx = wire.unpack_codes(xp, codes, self.tables.k, self.scheme.code_bits, nb * bs)
        q = codec.dequantize(xp, xp.reshape(idx, [nb, bs]), r * np.float32(scale), self.tables)
        return q if acc is None else acc + q

    def finish_codes(self, acc: Array, like: Array, nb: int) -> Array:
        return acc


class FusedEngine(GenericEngine):
    """The same steps through the C kernels, on numpy views of host tensors (no copies for
    contiguous float32 CPU tensors)."""

    def __init__(self, xp: Backend, scheme: Scheme, tables: codec.Tables, lib: Any) -> None:
        super().__init__(xp, scheme, tables)
        self.lib = lib
        host = tables._host
        self._levels = np.ascontiguousarray(host["levels"], dtype=np.float32)
        self._signed_values = np.ascontiguousarray(host["signed_values"], dtype=np.float32)
        self._signed_num = np.ascontiguousarray(host["signed_numerators"], dtype=np.int64)

    def _np(self, x: Array, dtype) -> np.ndarray:
        return np.ascontiguousarray(self.xp.to_numpy(x).reshape(-1), dtype=dtype)

    def work(self, tensor: Array) -> np.ndarray:
        return self._np(self.xp.cast(tensor, "float32"), np.float32)

    def scales(self, tensor: Array, numel: int) -> tuple[Array, Array]:
        x = self.work(tensor)
        s = self.scheme
        r = host_empty(codec.n_buckets(numel, s.bucket_size), np.float32)
        self.lib.nuq_scales(kernels.ptr(x), numel, s.bucket_size, _SCALE_MODES[s.scale],
                            float(s.truncation or 0.0), kernels.ptr(r))
        return x, self.xp.constant(r, tensor)

    def encode_sums(self, x: np.ndarray, r: Array, layout: wire.SumLayout, draws: Any) -> Array:
        s, t = self.scheme, self.tables
        rn = self._np(r, np.float32)
        out = host_empty(layout.words(rn.size * s.bucket_size) + 1, np.float64)
        out[-1] = 1.0  # sentinel
        self.lib.nuq_encode_sums(kernels.ptr(x), x.size, s.bucket_size, kernels.ptr(rn),
                                 kernels.ptr(self._levels), kernels.ptr(self._signed_num),
                                 t.k, int(t.uniform), draws.key(), layout.width, layout.per_word,
                                 layout.bound, kernels.ptr(out))
        return self.xp.constant(out, r)

    def encode_codes(self, x: np.ndarray, r: Array, draws: Any) -> Array:
        s, t = self.scheme, self.tables
        rn = self._np(r, np.float32)
        out = host_empty(wire.packed_code_bytes(rn.size * s.bucket_size, s.code_bits), np.uint8)
        self.lib.nuq_encode_codes(kernels.ptr(x), x.size, s.bucket_size, kernels.ptr(rn),
                                  kernels.ptr(self._levels), t.k, int(t.uniform), draws.key(),
                                  s.code_bits, kernels.ptr(out))
        return self.xp.constant(out, r)

    def decode_sums(self, payload: Array, r: Array, layout: wire.SumLayout, nb: int) -> Array:
        bs = self.scheme.bucket_size
        p = self._np(payload, np.float64)
        if p.size != layout.words(nb * bs) + 1:
            raise ValueError(f"summable payload: expected {layout.words(nb * bs) + 1} float64 words, got {p.size}")
        sentinel = float(p[-1])
        if not (np.isfinite(sentinel) and sentinel > 0):
            raise ValueError(wire.BAD_SENTINEL)
        rn = self._np(r, np.float32)
        out = host_empty(nb * bs, np.float32)
        bad = self.lib.nuq_decode_sums(
            kernels.ptr(p), nb * bs, bs, layout.ranks / sentinel, layout.width,
            layout.per_word, layout.bound * layout.ranks, kernels.ptr(rn),
            np.float32(sentinel / layout.ranks / self.tables.denominator), kernels.ptr(out))
        if bad:
            raise ValueError(wire.not_integer_message(layout.ranks))
        return self.xp.reshape(self.xp.constant(out, r), [nb, bs])

    def decode_codes(self, codes: Array, r: Array, nb: int, acc: Array | None, scale: float = 1.0) -> Array:
        s = self.scheme
        c = self._np(codes, np.uint8)
        expected = wire.packed_code_bytes(nb * s.bucket_size, s.code_bits)
        if c.size != expected:
            raise ValueError(f"packed codes: expected {expected} bytes, got {c.size}")
        rn = self._np(r, np.float32)
        out = host_empty(nb * s.bucket_size, np.float32) if acc is None else acc
        bad = self.lib.nuq_decode_codes(kernels.ptr(c), out.size, s.bucket_size,
                                        kernels.ptr(rn), kernels.ptr(self._signed_values),
                                        self.tables.k, s.code_bits, np.float32(scale), kernels.ptr(out),
                                        int(acc is None))
        if bad:
            raise ValueError(f"packed codes: a code exceeds 2k = {2 * self.tables.k}: the payload is "
                             "corrupt or was made with other settings")
        return out

    def finish_codes(self, acc: np.ndarray, like: Array, nb: int) -> Array:
        return self.xp.reshape(self.xp.constant(acc, like), [nb, self.scheme.bucket_size])

    # ---- QSGD's Elias code (elias.py): the same codes, entropy coded -------------------
    def encode_elias(self, x: np.ndarray, r: Array, draws: Any, settings_id: float) -> Array:
        """One rank's whole Elias payload (header, scales, chunk offsets, streams)."""
        s, t = self.scheme, self.tables
        rn = self._np(r, np.float32)
        count = rn.size * s.bucket_size
        nc = elias.chunks(count)
        prefix = elias.prefix_bytes(rn.size, count)
        out = host_empty(prefix + nc * elias.chunk_capacity(elias.CHUNK, t.k), np.uint8)
        ends = np.empty(nc, np.uint32)
        self.lib.nuq_elias_encode(kernels.ptr(x), x.size, s.bucket_size, kernels.ptr(rn),
                                  kernels.ptr(self._levels), t.k, int(t.uniform), draws.key(),
                                  elias.chunk_capacity(elias.CHUNK, t.k), out[prefix:].ctypes.data,
                                  kernels.ptr(ends))
        total = elias.frame(settings_id, rn, ends, out)
        return self.xp.constant(out[:total], r)

    def decode_elias(self, gathered: Array, nb: int, settings_id: float, factor: float | None,
                     describe: str) -> tuple[np.ndarray, int]:
        """factor (None: 1 / ranks) times the sum of every rank's decoded Elias payload, and
        the number of ranks."""
        s = self.scheme
        count = nb * s.bucket_size
        parts = elias.split_ranks(self.xp.to_numpy(gathered), nb, count, settings_id, describe)
        scale = np.float32(1.0 / len(parts) if factor is None else factor)
        out = host_empty(count, np.float32)
        for i, (scales, ends, stream) in enumerate(parts):
            rn = np.ascontiguousarray(scales, np.float32)
            ends = np.ascontiguousarray(ends)
            stream = np.ascontiguousarray(stream) if stream.size else np.zeros(1, np.uint8)
            bad = self.lib.nuq_elias_decode(kernels.ptr(stream), kernels.ptr(ends), count, s.bucket_size,
                                            kernels.ptr(rn), kernels.ptr(self._signed_values),
                                            self.tables.k, scale, kernels.ptr(out), int(i == 0))
            if bad:
                raise ValueError(f"Elias allgather payload of rank {i} is malformed (a code word runs "
                                 f"past its chunk, a gap past the tensor, a level above k = "
                                 f"{self.tables.k}, or stray bits): corrupt or made with other settings")
        return out, len(parts)


class GraphFusedEngine(GenericEngine):
    """The fused kernels inside a tf.function: each stage runs as a tf.numpy_function on the
    host arrays (a graph op that calls the kernels at run time, drawing fresh keys per run)."""

    def __init__(self, xp: Backend, scheme: Scheme, tables: codec.Tables, lib: Any) -> None:
        super().__init__(xp, scheme, tables)
        from .backends.numpy import NumpyBackend

        self.host = FusedEngine(NumpyBackend.instance(), scheme, tables, lib)

    def _call(self, fn, args: list, dtype: str, size: int) -> Array:
        import tensorflow as tf

        out = tf.numpy_function(fn, args, tf.as_dtype(dtype), stateful=True)
        out.set_shape([size])
        return out

    def work(self, tensor: Array) -> Array:
        return self.xp.reshape(self.xp.cast(tensor, "float32"), [-1])

    def scales(self, tensor: Array, numel: int) -> tuple[Array, Array]:
        x = self.work(tensor)
        nb = codec.n_buckets(numel, self.scheme.bucket_size)
        r = self._call(lambda a: self.host.scales(a, numel)[1], [x], "float32", nb)
        return x, r

    def encode_sums(self, x: Array, r: Array, layout: wire.SumLayout, draws: Any) -> Array:
        size = layout.words(self.xp.numel(r) * self.scheme.bucket_size) + 1
        return self._call(lambda a, s: self.host.encode_sums(a, s, layout, draws), [x, r], "float64", size)

    def encode_codes(self, x: Array, r: Array, draws: Any) -> Array:
        size = wire.packed_code_bytes(self.xp.numel(r) * self.scheme.bucket_size, self.scheme.code_bits)
        return self._call(lambda a, s: self.host.encode_codes(a, s, draws), [x, r], "uint8", size)

    def decode_sums(self, payload: Array, r: Array, layout: wire.SumLayout, nb: int) -> Array:
        bs = self.scheme.bucket_size
        flat = self._call(lambda p, s: self.host.decode_sums(p, s, layout, nb).reshape(-1),
                          [payload, r], "float32", nb * bs)
        return self.xp.reshape(flat, [nb, bs])

    def decode_codes(self, codes: Array, r: Array, nb: int, acc: Array | None, scale: float = 1.0) -> Array:
        size = nb * self.scheme.bucket_size
        if acc is None:
            return self._call(lambda c, s: self.host.decode_codes(c, s, nb, None, scale), [codes, r],
                              "float32", size)
        return self._call(lambda c, s, a: self.host.decode_codes(c, s, nb, a.copy(), scale),
                          [codes, r, acc], "float32", size)

    def finish_codes(self, acc: Array, like: Array, nb: int) -> Array:
        return self.xp.reshape(acc, [nb, self.scheme.bucket_size])

    def encode_elias(self, x: Array, r: Array, draws: Any, settings_id: float) -> Array:
        """The Elias payload as a graph op; its length is known only when it runs."""
        import tensorflow as tf

        out = tf.numpy_function(lambda a, s: self.host.encode_elias(a, s, draws, settings_id), [x, r],
                                tf.uint8, stateful=True)
        out.set_shape([None])
        return out

    def decode_elias(self, gathered: Array, nb: int, settings_id: float, factor: float | None,
                     describe: str) -> tuple[Array, None]:
        size = nb * self.scheme.bucket_size
        fn = lambda g: self.host.decode_elias(g, nb, settings_id, factor, describe)[0]
        return self._call(fn, [gathered], "float32", size), None
