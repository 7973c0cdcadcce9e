"""Make the schemes available as hvd.Compression.<name> beside Horovod's `none` and `fp16`."""
from __future__ import annotations

import importlib

from .compressor import COMPRESSORS

_HOROVOD = {"torch": "horovod.torch", "tensorflow": "horovod.tensorflow"}
NAMES = ("qsgd", "qsgdinf", "nuq", "tnq", "globalqsgd")


def register(*frameworks: str) -> list[str]:
    """Add a default-configured compressor per scheme to hvd.Compression of each framework.

    With no arguments, registers with every Horovod framework that imports. Returns the
    frameworks registered with.
    """
    done = []
    for fw in frameworks or tuple(_HOROVOD):
        try:
            compression = importlib.import_module(_HOROVOD[fw]).Compression
        except ImportError:
            if frameworks:
                raise
            continue
        for name in NAMES:
            if not hasattr(compression, name):
                setattr(compression, name, COMPRESSORS[name]())
        done.append(fw)
    return done
