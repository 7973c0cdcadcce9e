"""PyTorch frontend: the compressors, Horovod registration, an allgather-capable optimizer,
and the Local SGD and CSER optimizer wrappers."""
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
from .cser import CSER
from .local_sgd import LocalSGD
from .optimizer import DistributedOptimizer

__all__ = ["COMPRESSORS", "CSER", "Compressor", "DistributedOptimizer", "GlobalQSGDCompressor",
           "HSQCompressor", "LocalSGD", "NUQCompressor", "QSGDCompressor", "QSGDInfCompressor",
           "TNQCompressor"]
