"""TensorFlow frontend: the compressors, Horovod registration, and an allgather-capable tape."""
from .. import registration
from ..compressor import (
                          Compressor,
                          GlobalQSGDCompressor,
                          NUQCompressor,
                          QSGDCompressor,
                          QSGDInfCompressor,
                          TNQCompressor,
)
from . import collectives  # noqa: F401  (imports the TF backend, which keeps AutoGraph out)
from .tape import DistributedGradientTape

registration.register("tensorflow")

__all__ = ["Compressor", "DistributedGradientTape", "GlobalQSGDCompressor", "NUQCompressor",
           "QSGDCompressor", "QSGDInfCompressor", "TNQCompressor"]
