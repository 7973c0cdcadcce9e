"""The Horovod module and collectives that match the running Keras 3 backend.

Keras 3 fixes one backend per process: "tensorflow" reduces over horovod.tensorflow, "torch"
over horovod.torch. Every other backend (jax, numpy, openvino) is refused with a clear error.
"""
from __future__ import annotations

import importlib
from typing import Any

import keras
import numpy as np

SUPPORTED_BACKENDS = {"tensorflow": "horovod.tensorflow", "torch": "horovod.torch"}


def check_keras3() -> None:
    """Refuse Keras 2 (plain keras < 3): its optimizers are served by horovod.tensorflow.keras."""
    major = int(str(getattr(keras, "__version__", "0")).split(".")[0] or 0)
    if major < 3:
        raise ImportError(
            f"horovod_nuq.keras needs Keras 3, found keras {keras.__version__}. For Keras 2 / tf_keras "
            "use horovod.tensorflow.keras.DistributedOptimizer(opt, compression=...) with "
            "TF_USE_LEGACY_KERAS=1.")


def backend_name() -> str:
    """The Keras backend, if this package can reduce over it; otherwise a ValueError."""
    name = keras.backend.backend()
    if name not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"horovod_nuq.keras supports the Keras backends {sorted(SUPPORTED_BACKENDS)} "
            f"(Horovod has TensorFlow and PyTorch collectives), but Keras runs on {name!r}. "
            "Set KERAS_BACKEND=tensorflow (or torch) before importing keras.")
    return name


def horovod() -> Any:
    """horovod.tensorflow or horovod.torch, whichever matches the Keras backend."""
    return importlib.import_module(SUPPORTED_BACKENDS[backend_name()])


def in_tf_graph() -> bool:
    """True while TensorFlow traces a graph (tf.function), where Python runs once per trace."""
    if backend_name() != "tensorflow":
        return False
    import tensorflow as tf

    return not tf.executing_eagerly()


def allreduce_numpy(values: np.ndarray, average: bool, name: str, process_set: Any = None) -> np.ndarray:
    """Allreduce a small float64 vector eagerly (metrics, evaluation counts)."""
    hvd = horovod()
    ps = hvd.global_process_set if process_set is None else process_set
    op = hvd.Average if average else hvd.Sum
    values = np.ascontiguousarray(values, dtype=np.float64)
    if backend_name() == "tensorflow":
        import tensorflow as tf

        return hvd.allreduce(tf.constant(values), op=op, name=name, process_set=ps).numpy()
    import torch

    return hvd.allreduce(torch.from_numpy(values), op=op, name=name, process_set=ps).numpy()


def broadcast_variables(variables: list, root_rank: int = 0, process_set: Any = None) -> None:
    """Assign every rank the root rank's values of `variables` (Keras 3 variables), eagerly."""
    hvd = horovod()
    ps = hvd.global_process_set if process_set is None else process_set
    tf_backend = backend_name() == "tensorflow"
    for i, v in enumerate(variables):
        name = f"hnuq.keras.bcast.{i}"
        if tf_backend:
            import tensorflow as tf

            value = hvd.broadcast(tf.convert_to_tensor(v.value), root_rank, name=name, process_set=ps)
        else:
            value = hvd.broadcast(v.value.detach(), root_rank, name=name, process_set=ps)
        v.assign(value)
