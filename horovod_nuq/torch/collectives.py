"""The Horovod calls the compressors make on torch tensors."""
from __future__ import annotations

from typing import Any

import horovod.torch as hvd

from ..local import make_rng, record  # noqa: F401  (same on every framework)


def rank() -> int:
    return hvd.rank()


def size(process_set: Any = None) -> int:
    return process_set.size() if process_set is not None else hvd.size()


def allreduce_max(x: Any, process_set: Any = None) -> Any:
    kw = {"process_set": process_set} if process_set is not None else {}
    return hvd.allreduce(x, op=hvd.Max, **kw)
