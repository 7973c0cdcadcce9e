"""Array backends: the few tensor operations the codec needs, for NumPy, PyTorch and TensorFlow.

The scheme math (`codec.py`) and the wire formats (`wire.py`) are written once against
this small interface, so each framework adds only a thin adapter.
"""
from __future__ import annotations

import sys
from typing import Any

from .base import Backend


def backend_for(x: Any) -> Backend:
    """The backend that handles the array `x` (a numpy array, torch tensor or tf tensor)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        from .torch import TorchBackend
        return TorchBackend.instance()
    if mod.startswith("tensorflow") or ("tensorflow" in sys.modules and _is_tf(x)):
        from .tensorflow import TFBackend
        return TFBackend.instance()
    if mod.startswith("numpy"):
        from .numpy import NumpyBackend
        return NumpyBackend.instance()
    raise TypeError(
        f"horovod_nuq quantizes numpy arrays, torch tensors and tf tensors, got {type(x).__name__}"
    )


def _is_tf(x: Any) -> bool:
    import tensorflow as tf
    return isinstance(x, (tf.Tensor, tf.Variable))


__all__ = ["Backend", "backend_for"]
