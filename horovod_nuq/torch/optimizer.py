"""hvd.DistributedOptimizer with the same signature, which can also route the allgather protocol.

For compressors that use protocol "allreduce" over this process set (and Horovod's own) this
returns Horovod's optimizer unchanged. For "allgather" (chosen, or picked by "auto" because
it moves fewer bytes at this many ranks) it reuses Horovod's optimizer and swaps the
per-gradient allreduce for an allgather of each rank's packed codes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import horovod.torch as hvd
import torch
from horovod.torch.mpi_ops import allgather_async, grouped_allgather_async
from horovod.torch.optimizer import _DistributedOptimizer


def _share_process_set(compression: Any, process_set: Any) -> None:
    if not hasattr(compression, "protocol") or process_set is hvd.global_process_set:
        return
    if compression.process_set is None:
        compression.process_set = process_set
    elif compression.process_set is not process_set:
        raise ValueError("the compressor and the optimizer name different process sets; give both the same")


def _gathers(compression: Any, process_set: Any) -> bool:
    """Whether a horovod_nuq compressor routes through allgather over this process set."""
    return hasattr(compression, "protocol_for") and compression.protocol_for(process_set.size()) == "allgather"


def _allgather_grad_async(self, p: torch.Tensor):
    if p.grad is None:  # another rank may have a gradient: still take part, with zeros
        p.grad = p.data.new(p.size()).zero_()
    tensor = p.grad
    if tensor.is_sparse:
        if not self.sparse_as_dense:
            raise ValueError("the allgather protocol needs dense gradients: pass sparse_as_dense=True")
        tensor = tensor.to_dense()
    payload, ctx = self._compression.compress_for_allgather(tensor)
    handle = allgather_async(payload, name=f"nuq.{self._parameter_names.get(p)}",
                             process_set=self.process_set)
    return handle, dataclasses.replace(ctx, average=self.op == hvd.Average)


def _grouped_allgather_grad_async(self, ps):
    payloads, ctxs = zip(*[self._compression.compress_for_allgather(p.grad) for p in ps])
    handle = grouped_allgather_async(list(payloads), name=f"nuq.{self._parameter_names.get(ps[0])}",
                                     process_set=self.process_set)
    return handle, [dataclasses.replace(c, average=self.op == hvd.Average) for c in ctxs]


def _step(self, closure=None):
    out = _DistributedOptimizer.step(self, closure)
    self._compression.stats.mark_step()
    return out


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Any = None,
                         compression: Any = hvd.Compression.none, backward_passes_per_step: int = 1,
                         op: Any = hvd.Average, gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups: Any = None, sparse_as_dense: bool = False,
                         process_set: Any = hvd.global_process_set) -> torch.optim.Optimizer:
    """Horovod's DistributedOptimizer; also routes the allgather protocol (see module doc).

    A horovod_nuq compressor made without a process set is given this optimizer's, so its
    field widths and scale agreement follow the ranks that actually reduce.
    """
    _share_process_set(compression, process_set)
    kwargs = {"named_parameters": named_parameters, "compression": compression,
              "backward_passes_per_step": backward_passes_per_step, "op": op,
              "gradient_predivide_factor": gradient_predivide_factor, "num_groups": num_groups,
              "groups": groups, "sparse_as_dense": sparse_as_dense, "process_set": process_set}
    if not _gathers(compression, process_set):
        opt = hvd.DistributedOptimizer(optimizer, **kwargs)
        if hasattr(compression, "stats"):
            type(opt).step = _step
        return opt
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("the allgather protocol averages or sums decoded gradients: use "
                         "op=hvd.Average or op=hvd.Sum (Adasum is not supported)")
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    attrs = dict(_DistributedOptimizer.__dict__, _allreduce_grad_async=_allgather_grad_async,
                 _grouped_allreduce_grad_async=_grouped_allgather_grad_async, step=_step)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), attrs)
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step,
               op, gradient_predivide_factor, groups if groups is not None else (num_groups or None),
               sparse_as_dense, process_set)
