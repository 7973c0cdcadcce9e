"""What Horovod's own call sites tell a compressor that its `compress(tensor)` API does not.

Horovod calls `compression.compress(tensor)` from its allreduce functions and optimizers
without saying over which process set, or with which op, the result will be reduced. Both
matter here: a compressor that starts its own allgather must run it over the same ranks, and
only linear reductions (Average, Sum, with scale factors) decode. Horovod 0.28.1, its last
release, keeps both in the calling frame: a local `process_set` / `op`, or the optimizer's
`self.process_set` / `self.op`. This reads them from there.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

_UNSUPPORTED_CALLERS = ("reducescatter", "grouped_reducescatter")
_SKIPPED = ("horovod_nuq", "tensorflow.python.autograph")


@dataclass(frozen=True)
class CallSite:
    """The Horovod function that called compress, its process set, op and the name of the
    tensor (the parameter's name in Horovod's torch optimizer); None where unknown."""

    function: str | None = None
    process_set: Any = None
    op: Any = None
    name: str | None = None


def horovod_call_site(depth: int = 2) -> CallSite:
    """The CallSite of the frame `depth` levels up, if it is Horovod code; else an empty one."""
    frame = sys._getframe(depth)
    # our own wrappers (a frontend calling compress) do not count, nor does autograph's call
    # machinery inside tf.function (Horovod's converted code keeps its module and locals)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_SKIPPED):
        frame = frame.f_back
    if frame is None or not frame.f_globals.get("__name__", "").startswith("horovod."):
        return CallSite()
    local = frame.f_locals
    owner = local.get("self")
    function = frame.f_code.co_name.removeprefix("tf__")  # autograph's name for a converted function
    if function in _UNSUPPORTED_CALLERS:
        raise ValueError(f"horovod_nuq compressors decode allreduce results; Horovod's {function} "
                         "splits the payload across ranks, which a quantized payload cannot "
                         "survive. Use compression=hvd.Compression.none or fp16 there.")
    name = local.get("name")
    if not isinstance(name, str):  # Horovod's grouped torch path: compress(p.grad) for p in ps
        names = getattr(owner, "_parameter_names", None)
        name = names.get(local["p"]) if isinstance(names, dict) and "p" in local else None
    return CallSite(function, local.get("process_set", getattr(owner, "process_set", None)),
                    local.get("op", getattr(owner, "op", None)), name)
