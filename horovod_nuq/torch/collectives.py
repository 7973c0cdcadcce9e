"""The Horovod calls the compressors make on torch tensors."""
from __future__ import annotations

from typing import Any

import horovod.torch as hvd

from ..local import make_rng, record  # noqa: F401  (same on every framework)


def rank() -> int:
    return hvd.rank()


def size(process_set: Any = None) -> int:
    return process_set.size() if process_set is not None else hvd.size()


def gather_text(text: str, process_set: Any = None) -> list:
    """Every rank's `text`, in rank order (for error messages that name each rank's settings)."""
    kw = {"process_set": process_set} if process_set is not None else {}
    return hvd.allgather_object(text, **kw)


def allreduce_max(x: Any, process_set: Any = None) -> Any:
    kw = {"process_set": process_set} if process_set is not None else {}
    return hvd.allreduce(x, op=hvd.Max, **kw)
