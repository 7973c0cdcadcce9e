"""The interface every array backend implements (NumPy, PyTorch, TensorFlow)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Array = Any
ALIGN = 64  # bytes: TensorFlow wraps host buffers without a copy only at this alignment


def host_empty(n: int, dtype: Any) -> np.ndarray:
    """An uninitialized 1-d host array aligned to ALIGN bytes, so every framework can adopt
    it as a tensor without copying (Backend.constant)."""
    dt = np.dtype(dtype)
    raw = np.empty(n * dt.itemsize + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n * dt.itemsize].view(dt)


class Backend:
    """Tensor operations used by the codec; arithmetic and comparisons use Python operators."""

    name = "abstract"
    _instance: Backend | None = None

    @classmethod
    def instance(cls) -> Backend:
        if cls.__dict__.get("_instance") is None:
            cls._instance = cls()
        return cls._instance

    # ---- shape and type -------------------------------------------------------------
    def numel(self, x: Array) -> int: ...
    def shape(self, x: Array) -> tuple[int, ...]: ...
    def reshape(self, x: Array, shape: Sequence[int]) -> Array: ...
    def cast(self, x: Array, dtype: str) -> Array:
        """dtype is one of 'float32', 'float64', 'int64', 'int32', 'uint8', 'bool'."""
    def dtype_name(self, x: Array) -> str: ...
    def is_floating(self, x: Array) -> bool: ...
    def pad_to(self, flat: Array, n: int) -> Array:
        """Append zeros to a 1-d array up to length n."""
    def concat(self, xs: Sequence[Array]) -> Array: ...
    def split(self, x: Array, sizes: Sequence[int]) -> list[Array]: ...
    def bitcast(self, x: Array, dtype: str) -> Array:
        """Reinterpret the bytes of a 1-d array as another dtype (1-d result)."""

    # ---- constants --------------------------------------------------------------------
    def constant(self, value: np.ndarray, like: Array) -> Array:
        """`value` as an array on `like`'s device; host arrays from host_empty are adopted
        without a copy where the framework allows it (do not modify them afterwards)."""
    def device_key(self, x: Array) -> Any:
        return None

    def on_host(self, x: Array) -> bool:
        """True for eager tensors in host memory, which the fused C kernels can read."""
        return False

    def can_cache(self, x: Array) -> bool:
        """Whether constants made for `x` may be reused by later calls."""
        return True

    # ---- elementwise and reductions ---------------------------------------------------
    def abs(self, x: Array) -> Array: ...
    def sqrt(self, x: Array) -> Array: ...
    def floor(self, x: Array) -> Array: ...
    def round(self, x: Array) -> Array: ...
    def minimum(self, x: Array, y: Any) -> Array: ...
    def maximum(self, x: Array, y: Any) -> Array: ...
    def where(self, cond: Array, x: Array, y: Array) -> Array: ...
    def row_sum(self, x: Array) -> Array: ...
    def row_max(self, x: Array) -> Array: ...
    def max_all(self, x: Array) -> Array: ...
    def take(self, table: Array, idx: Array) -> Array: ...
    def searchsorted(self, sorted_: Array, x: Array) -> Array:
        """Index i with sorted_[i-1] <= x < sorted_[i] (numpy side='right'), int64."""

    # ---- integer bit operations -------------------------------------------------------
    def shl(self, x: Array, bits: Array) -> Array: ...
    def shr(self, x: Array, bits: Array) -> Array: ...
    def bit_and(self, x: Array, mask: int) -> Array: ...

    # ---- randomness -------------------------------------------------------------------
    def uniform(self, shape: Sequence[int], like: Array, state: Any) -> Array:
        """U[0, 1) float32 draws from the generator `state` made by `make_rng`."""
    def make_rng(self, seed: int, like: Array) -> Any: ...

    def symbolic(self, x: Array) -> bool:
        """True for graph tensors whose value is unknown until run time (tf.function)."""
        return False

    def require(self, ok: Array, message: str) -> None:
        """Raise ValueError(message) unless the boolean scalar `ok` holds (an assert op in graphs)."""
        if not bool(ok):
            raise ValueError(message)

    # ---- state carried across steps (error-feedback residuals) -------------------------
    def new_state(self, like: Array, init: np.ndarray | None = None) -> State:
        """Zeros shaped and typed like `like` (or `init`), kept from step to step."""
        value = np.zeros(self.shape(like), np.float32) if init is None else np.asarray(init, np.float32)
        return State(self, self.cast(self.reshape(self.constant(value, like), self.shape(like)),
                                     self.dtype_name(like)))

    def read_state(self, state: State) -> Array:
        return state.value

    def write_state(self, state: State, value: Array) -> None:
        state.value = value

    def state_shape(self, state: State) -> tuple[int, ...]:
        return tuple(int(d) for d in state.value.shape)

    # ---- bridging ---------------------------------------------------------------------
    def to_numpy(self, x: Array) -> np.ndarray: ...


class State:
    """An array a backend keeps across steps (TensorFlow: a variable, so graphs update it)."""

    def __init__(self, xp: Backend, value: Any) -> None:
        self.xp, self.value = xp, value
