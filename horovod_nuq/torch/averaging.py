"""Averaging lists of tensors over a process set through any compressor, with named ops.

The optimizer wrappers (Local SGD, CSER) communicate model differences, updates and residuals
rather than gradients; these helpers give them Horovod's compression protocol outside an
optimizer: `average` (the decoded average only: Horovod's compress -> allreduce ->
decompress, any compressor, GlobalQSGD included) and `average_and_own` (also this rank's own
decoded C(v), which error feedback and CSER's residuals need: per-worker codes gathered with
allgather for horovod_nuq compressors, a local round trip for Horovod's none / fp16). All
ops are submitted before any is waited on, so one step costs one round of latency.
"""
from __future__ import annotations

from typing import Any

import horovod.torch as hvd
import torch

from .. import policy


def is_quantizer(compression: Any) -> bool:
    """True for horovod_nuq compressors (they route protocols and count their bytes)."""
    return hasattr(compression, "protocol_for")


def bind(compression: Any, process_set: Any) -> None:
    """Give a horovod_nuq compressor made without a process set the wrapper's one."""
    if is_quantizer(compression):
        policy.bind_process_set(compression, process_set)


def average(tensors: list[torch.Tensor], names: list[str], compression: Any,
            process_set: Any) -> list[torch.Tensor]:
    """The average over the process set of each tensor as `compression` transmits it."""
    pending = []
    for t, name in zip(tensors, names):  # the name keys error feedback's residual, if any
        payload, ctx = compression.compress(t, key=name) if is_quantizer(compression) else compression.compress(t)
        pending.append((hvd.allreduce_async(payload, name=name, op=hvd.Average,
                                            process_set=process_set), ctx))
    return [compression.decompress(hvd.synchronize(h), ctx) for h, ctx in pending]


def average_and_own(tensors: list[torch.Tensor], names: list[str], compression: Any,
                    process_set: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(average over ranks of C(v_i), this rank's C(v)) for each tensor v."""
    if not is_quantizer(compression):
        own = [compression.decompress(*compression.compress(t)) for t in tensors]
        return average(tensors, names, compression, process_set), own
    if compression.shared_scale_only:
        raise ValueError(f"{type(compression).__name__} quantizes every rank on one shared scale, so "
                         "a rank cannot decode its own C(v) apart from the average, which the "
                         "residual needs; use QSGD, QSGDinf, NUQ or TNQ (per-worker codes), or "
                         "hvd.Compression.none / fp16")
    pending = []
    for t, name in zip(tensors, names):
        payload, ctx = compression.compress_for_allgather(t, key=name)
        pending.append((payload, ctx, hvd.allgather_async(payload, name=name, process_set=process_set)))
    avgs, owns = [], []
    for payload, ctx, handle in pending:
        avgs.append(compression.decompress_gathered(hvd.synchronize(handle), ctx, average=True))
        owns.append(compression.decompress_gathered(payload, ctx, average=False))
    return avgs, owns


def describe(compression: Any) -> str:
    """A compressor's settings as text (the same on ranks that use the same settings)."""
    if is_quantizer(compression):
        return repr(compression)
    return getattr(compression, "__name__", type(compression).__name__)


def mark_step(compression: Any) -> None:
    """Close one optimizer step in a horovod_nuq compressor's byte counters."""
    if is_quantizer(compression):
        compression.stats.mark_step()
