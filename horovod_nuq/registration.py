"""The schemes as hvd.Compression.<name> beside Horovod's `none` and `fp16`.

`import horovod_nuq` registers with every Horovod frontend already imported and, through an
import hook, with any imported later. Each access of `hvd.Compression.nuq` makes a new,
default-configured compressor, so two optimizers never share byte counts, random streams
or process sets: keep the object you pass to read its `stats`.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

from .compressor import COMPRESSORS

# the modules that define Horovod's Compression classes
_TARGETS = {"torch": "horovod.torch.compression", "tensorflow": "horovod.tensorflow.compression"}


class _NewEachAccess:
    """A class attribute that returns a new compressor of `cls` each time it is read."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.__doc__ = cls.__doc__

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        return self.cls()


def register(*frameworks: str) -> list[str]:
    """Add the schemes to hvd.Compression of each framework ('torch', 'tensorflow'); with no
    arguments, of every Horovod frontend already imported. Returns the frameworks done."""
    done = []
    for fw in frameworks or tuple(_TARGETS):
        module = sys.modules.get(_TARGETS[fw])
        if module is None:
            if not frameworks:
                continue
            module = importlib.import_module(_TARGETS[fw])
        _add(module.Compression)
        done.append(fw)
    return done


def _add(compression: type) -> None:
    for name, cls in COMPRESSORS.items():
        if not isinstance(compression.__dict__.get(name), _NewEachAccess):
            setattr(compression, name, _NewEachAccess(cls))


class _RegisterOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers with a Horovod frontend's Compression class right after its module runs."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _TARGETS.values():
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loaders = getattr(self, "_loaders", {})
        self._loaders[fullname] = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loaders[module.__name__].exec_module(module)
        _add(module.Compression)


def install_import_hook() -> None:
    """Register now with the frontends already imported, and later with the others."""
    register()
    if not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
