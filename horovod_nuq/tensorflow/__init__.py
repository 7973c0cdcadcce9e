"""TensorFlow frontend: the compressors, Horovod registration, and an allgather-capable tape."""
from ..compressor import (
                          COMPRESSORS,
                          Compressor,
                          GlobalQSGDCompressor,
                          HSQCompressor,
                          NUQCompressor,
                          QSGDCompressor,
                          QSGDInfCompressor,
                          TNQCompressor,
)
from . import collectives  # noqa: F401  (imports the TF backend, which keeps AutoGraph out)
from .tape import DistributedGradientTape

__all__ = ["COMPRESSORS", "Compressor", "DistributedGradientTape", "GlobalQSGDCompressor", "HSQCompressor",
           "NUQCompressor",
           "QSGDCompressor", "QSGDInfCompressor", "TNQCompressor"]
