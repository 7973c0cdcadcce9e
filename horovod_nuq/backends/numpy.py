"""NumPy backend: the codec on host arrays (used by tests and as the simplest adapter)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"

    def numel(self, x): return int(np.size(x))
    def shape(self, x): return tuple(np.shape(x))
    def reshape(self, x, shape): return np.reshape(x, shape)
    def cast(self, x, dtype): return np.asarray(x).astype(dtype, copy=False)
    def dtype_name(self, x): return str(np.asarray(x).dtype)
    def is_floating(self, x): return np.issubdtype(np.asarray(x).dtype, np.floating)
    def pad_to(self, flat, n): return np.concatenate([flat, np.zeros(n - flat.size, flat.dtype)])
    def concat(self, xs): return np.concatenate(list(xs))
    def split(self, x, sizes): return np.split(x, np.cumsum(sizes)[:-1])
    def bitcast(self, x, dtype): return np.ascontiguousarray(x).view(dtype).reshape(-1)
    def constant(self, value, like): return np.asarray(value)
    def abs(self, x): return np.abs(x)
    def sqrt(self, x): return np.sqrt(x)
    def floor(self, x): return np.floor(x)
    def round(self, x): return np.round(x)
    def minimum(self, x, y): return np.minimum(x, y)
    def maximum(self, x, y): return np.maximum(x, y)
    def where(self, cond, x, y): return np.where(cond, x, y).astype(np.result_type(x, y), copy=False)
    def row_sum(self, x): return np.sum(x, axis=1)
    def row_max(self, x): return np.max(x, axis=1)
    def max_all(self, x): return np.max(x)
    def take(self, table, idx): return np.take(table, idx)
    def searchsorted(self, sorted_, x): return np.searchsorted(sorted_, x, side="right").astype(np.int64)
    def matmul(self, x, y): return np.matmul(x, y)
    def argmax_rows(self, x): return np.argmax(x, axis=1).astype(np.int64)
    def take_rows(self, table, idx): return np.take(table, idx, axis=0)
    def pick(self, x, idx): return np.take_along_axis(x, np.reshape(idx, (-1, 1)), axis=1)[:, 0]
    def shl(self, x, bits): return np.left_shift(x, bits)
    def shr(self, x, bits): return np.right_shift(x, bits)
    def bit_and(self, x, mask): return np.bitwise_and(x, mask)

    def make_rng(self, seed: int, like: Any) -> np.random.Generator:
        return np.random.default_rng(seed)

    def uniform(self, shape: Sequence[int], like: Any, state: np.random.Generator) -> np.ndarray:
        return state.random(tuple(shape), dtype=np.float32)

    def on_host(self, x): return True
    def to_numpy(self, x): return np.asarray(x)
