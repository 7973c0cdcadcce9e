"""PyTorch frontend: the compressors, Horovod registration, and an allgather-capable optimizer."""
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
from .optimizer import DistributedOptimizer

__all__ = ["COMPRESSORS", "Compressor", "DistributedOptimizer", "GlobalQSGDCompressor", "HSQCompressor",
           "NUQCompressor",
           "QSGDCompressor", "QSGDInfCompressor", "TNQCompressor"]
