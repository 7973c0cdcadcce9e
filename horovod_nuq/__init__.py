"""horovod-nuq: gradient quantizers for Horovod (PyTorch and TensorFlow).

    import horovod.torch as hvd
    from horovod_nuq import NUQCompressor
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=NUQCompressor(bits=4))
"""
import sys

from ._version import __version__ as __version__  # the one version source
from .compressor import (
                         COMPRESSORS,
                         Compressor,
                         GlobalQSGDCompressor,
                         HSQCompressor,
                         NUQCompressor,
                         QSGDCompressor,
                         QSGDInfCompressor,
                         TNQCompressor,
)
from .registration import install_import_hook
from .schemes import Scheme, make_scheme
from .stats import WireStats

install_import_hook()  # hvd.Compression.<scheme> in every Horovod frontend, now or later

if "tensorflow" in sys.modules:  # keep AutoGraph from converting the codec when TF traces it
    from .backends import tensorflow as _tf_backend  # noqa: F401

__all__ = [
                         "COMPRESSORS",
                         "Compressor",
                         "GlobalQSGDCompressor",
                         "HSQCompressor",
                         "NUQCompressor",
                         "QSGDCompressor",
                         "QSGDInfCompressor",
                         "Scheme",
                         "TNQCompressor",
                         "WireStats",
                         "make_scheme",
]
