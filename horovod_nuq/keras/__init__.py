"""Keras 3 frontend: DistributedOptimizer and Horovod's callbacks, over horovod.tensorflow (or
horovod.torch on Keras' PyTorch backend), with the horovod_nuq quantizers.

    import horovod.tensorflow as hvd
    import keras
    import horovod_nuq.keras as hvdk
    from horovod_nuq import NUQCompressor

    hvd.init()
    opt = hvdk.DistributedOptimizer(keras.optimizers.Adam(1e-3), compression=NUQCompressor())
    model.compile(opt, loss)
    model.fit(x, y, callbacks=[hvdk.callbacks.BroadcastGlobalVariablesCallback(0),
                               hvdk.callbacks.MetricAverageCallback()])

Needs Keras 3 only (no tf_keras, no TF_USE_LEGACY_KERAS). For Keras 2 / tf_keras use
horovod.tensorflow.keras with TF_USE_LEGACY_KERAS=1.
"""
from . import _hvd

_hvd.check_keras3()

from . import callbacks
from ._hvd import broadcast_variables
from .optimizer import DistributedOptimizer

__all__ = ["DistributedOptimizer", "broadcast_variables", "callbacks"]
