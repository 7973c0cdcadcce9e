"""TensorFlow backend: pure TF ops, so the codec traces inside tf.function."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from .base import ALIGN, Backend, State

_DTYPES = {"float32": tf.float32, "float64": tf.float64, "int64": tf.int64, "int32": tf.int32,
           "uint8": tf.uint8, "bool": tf.bool, "float16": tf.float16, "bfloat16": tf.bfloat16}


def _static_numel(x) -> int:
    n = x.shape.num_elements()
    if n is None:
        raise ValueError("horovod_nuq needs tensors of static shape inside tf.function")
    return int(n)


def keep_autograph_out() -> None:
    """Have AutoGraph call horovod_nuq as plain Python: its control flow is on static values,
    and converting it only costs tracing time and spurious warnings."""
    try:
        from tensorflow.python.autograph.core import config
    except ImportError:  # pragma: no cover - internals moved; conversion is then merely slower
        return
    if not any(r.matches("horovod_nuq") for r in config.CONVERSION_RULES[:1]):
        config.CONVERSION_RULES = (config.DoNotConvert("horovod_nuq"),) + tuple(config.CONVERSION_RULES)


keep_autograph_out()


def run_time_call(fn: Any, size: int = 1) -> Any:
    """A graph op that calls the Python function `fn()` (returning `size` int64s) each time
    the graph runs; eagerly, it calls it now.

    Used for what must happen per run, not per trace: byte counts and fresh random keys.
    It creates no tf.Variable, so a tf.function may retrace (Python arguments, tf.cond).
    """
    if tf.executing_eagerly():
        return tf.constant(np.asarray(fn(), np.int64))
    out = tf.numpy_function(lambda: np.asarray(fn(), np.int64), [], tf.int64, stateful=True)
    out.set_shape([size] if size > 1 else [])
    return out


@functools.lru_cache(maxsize=1)
def _has_gpu() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


class TFBackend(Backend):
    name = "tensorflow"

    def numel(self, x): return _static_numel(x)
    def shape(self, x): return tuple(int(d) for d in x.shape)
    def reshape(self, x, shape): return tf.reshape(x, shape)
    def cast(self, x, dtype): return tf.cast(x, _DTYPES[dtype])
    def dtype_name(self, x): return x.dtype.name
    def is_floating(self, x): return x.dtype.is_floating
    def pad_to(self, flat, n): return tf.pad(flat, [[0, n - _static_numel(flat)]])
    def concat(self, xs): return tf.concat(list(xs), axis=0)
    def split(self, x, sizes): return tf.split(x, list(sizes))
    def constant(self, value, like):
        if (isinstance(value, np.ndarray) and value.size >= 1024 and tf.executing_eagerly()
                and value.flags.c_contiguous and value.ctypes.data % ALIGN == 0):
            return tf.experimental.dlpack.from_dlpack(value.__dlpack__())  # adopts, no copy
        return tf.constant(value)
    def can_cache(self, x): return tf.executing_eagerly()

    def bitcast(self, x, dtype):
        target = _DTYPES[dtype]
        if target.size == x.dtype.size:
            return tf.reshape(tf.bitcast(x, target), [-1])
        if target.size < x.dtype.size:
            return tf.reshape(tf.bitcast(x, target), [-1])
        ratio = target.size // x.dtype.size
        return tf.bitcast(tf.reshape(x, [-1, ratio]), target)

    def abs(self, x): return tf.abs(x)
    def sqrt(self, x): return tf.sqrt(x)
    def floor(self, x): return tf.floor(x)
    def round(self, x): return tf.round(x)
    def minimum(self, x, y): return tf.minimum(x, tf.cast(y, x.dtype))
    def maximum(self, x, y): return tf.maximum(x, tf.cast(y, x.dtype))
    def where(self, cond, x, y):
        x = tf.convert_to_tensor(x)
        return tf.where(cond, x, tf.cast(y, x.dtype))
    def row_sum(self, x): return tf.reduce_sum(x, axis=1)
    def row_max(self, x): return tf.reduce_max(x, axis=1)
    def max_all(self, x): return tf.reduce_max(x)
    def take(self, table, idx): return tf.gather(table, idx)

    def searchsorted(self, sorted_, x):
        flat = tf.reshape(x, [1, -1])
        i = tf.searchsorted(tf.reshape(sorted_, [1, -1]), flat, side="right", out_type=tf.int64)
        return tf.reshape(i, tf.shape(x))

    def shl(self, x, bits): return tf.bitwise.left_shift(x, bits)
    def shr(self, x, bits): return tf.bitwise.right_shift(x, bits)
    def bit_and(self, x, mask): return tf.bitwise.bitwise_and(x, tf.cast(mask, x.dtype))

    def make_rng(self, seed: int, like: Any) -> tf.random.Generator:
        return tf.random.Generator.from_seed(seed)

    def uniform(self, shape: Sequence[int], like: Any, state: tf.random.Generator):
        return state.uniform(list(shape), dtype=tf.float32)

    def keyed_uniform(self, shape: Sequence[int], key: Any):
        """U[0, 1) float32 draws from a run-time key tensor (two int64): inside graphs."""
        return tf.random.stateless_uniform(list(shape), seed=key, dtype=tf.float32)

    def symbolic(self, x): return not tf.executing_eagerly()

    def require(self, ok, message):
        if tf.executing_eagerly():
            return super().require(ok, message)
        tf.debugging.Assert(ok, [message])

    def on_host(self, x): return "GPU" not in (x.device or "") and not _has_gpu()
    def new_state(self, like, init=None):
        with tf.init_scope():  # a variable made while tracing lives outside the graph
            value = tf.zeros(like.shape, like.dtype) if init is None else tf.cast(init, like.dtype)
            return State(self, tf.Variable(value, trainable=False, name="horovod_nuq_state"))

    def read_state(self, state): return tf.convert_to_tensor(state.value)
    def write_state(self, state, value): state.value.assign(value)

    def to_numpy(self, x: Any) -> np.ndarray: return np.asarray(x)  # host tensors: a view, no copy
