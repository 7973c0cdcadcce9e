"""PyTorch frontend: the compressors, Horovod registration, and an allgather-capable optimizer."""
from ..compressor import (
                          COMPRESSORS,
                          Compressor,
                          GlobalQSGDCompressor,
                          NUQCompressor,
                          QSGDCompressor,
                          QSGDInfCompressor,
                          TNQCompressor,
)
from .optimizer import DistributedOptimizer

__all__ = ["COMPRESSORS", "Compressor", "DistributedOptimizer", "GlobalQSGDCompressor", "NUQCompressor",
           "QSGDCompressor", "QSGDInfCompressor", "TNQCompressor"]
