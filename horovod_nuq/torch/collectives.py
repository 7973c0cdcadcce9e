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
    """Synchronous Max allreduce. Compressors call it one tensor at a time, so a name that
    depends only on the size is never in flight twice and stays in Horovod's response cache
    from step to step (unnamed calls would get a new name each time and evict it)."""
    kw = {"process_set": process_set} if process_set is not None else {}
    return hvd.allreduce(x, op=hvd.Max, name=f"horovod_nuq.scale.{x.numel()}", **kw)
