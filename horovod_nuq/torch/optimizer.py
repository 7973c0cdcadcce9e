"""hvd.DistributedOptimizer with the same signature, which can also route the allgather protocol.

It reuses Horovod's optimizer class and swaps only the per-gradient reduction:
- horovod_nuq compressors using protocol "allgather" (chosen, or picked by "auto" because it
  moves fewer bytes at this many ranks): an allgather of each rank's packed codes;
- protocol "allreduce": the allreduce waits for synchronize(), where one Max allreduce agrees
  on every gradient's scales at once; Horovod's own optimizer instead makes each gradient's
  compress() agree on its own, a blocking round trip per tensor that queues behind the
  payloads already in flight (with `groups`/`num_groups` that per-tensor path is kept);
- any other compression: Horovod's optimizer unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import horovod.torch as hvd
import torch
from horovod.torch.mpi_ops import allgather_async, allreduce_async_, grouped_allgather_async
from horovod.torch.optimizer import _DistributedOptimizer

from .. import policy


def _allgather_grad_async(self, p: torch.Tensor):
    tensor = _dense_grad(self, p)
    if tensor is None:
        raise ValueError("the allgather protocol needs dense gradients: pass sparse_as_dense=True")
    name = self._parameter_names.get(p)
    payload, ctx = self._compression.compress_for_allgather(tensor, key=name)
    handle = allgather_async(payload, name=f"nuq.{name}",
                             process_set=self.process_set)
    return handle, dataclasses.replace(ctx, average=self.op == hvd.Average)


def _grouped_allgather_grad_async(self, ps):
    grads = [_dense_grad(self, p) for p in ps]
    if any(g is None for g in grads):
        raise ValueError("the allgather protocol needs dense gradients: pass sparse_as_dense=True")
    payloads, ctxs = zip(*[self._compression.compress_for_allgather(g, key=self._parameter_names.get(p))
                           for g, p in zip(grads, ps)])
    handle = grouped_allgather_async(list(payloads), name=f"nuq.{self._parameter_names.get(ps[0])}",
                                     process_set=self.process_set)
    return handle, [dataclasses.replace(c, average=self.op == hvd.Average) for c in ctxs]


def _deferred_allreduce_async(self, p):
    """Submit p's quantized allreduce with the scale agreed in synchronize(); during the
    backward pass return no handle, so Horovod's synchronize() submits it then."""
    if self._agreed is None:
        return None, None
    if p not in self._agreed:  # a sparse gradient (no sparse_as_dense): Horovod's own path
        return _DistributedOptimizer._allreduce_grad_async(self, p)
    tensor, scale = self._agreed.pop(p)
    payload, ctx = self._compression.compress(tensor, scale=scale, key=self._parameter_names.get(p))
    average = self.op == hvd.Average  # Horovod splits Average over pre/postscale likewise
    handle = allreduce_async_(payload, name=self._parameter_names.get(p), op=self.op,
                              prescale_factor=1.0 / self.gradient_predivide_factor if average else 1.0,
                              postscale_factor=self.gradient_predivide_factor if average else 1.0,
                              process_set=self.process_set)
    return handle, ctx


def _dense_grad(self, p: torch.Tensor) -> torch.Tensor | None:
    """The gradient to quantize (zeros if this rank computed none); None for a sparse one
    that Horovod reduces its own way."""
    if p.grad is None:  # another rank may have a gradient: still take part, with zeros
        p.grad = p.data.new(p.size()).zero_()
    if p.grad.is_sparse:
        return p.grad.to_dense() if self.sparse_as_dense else None
    return p.grad


def _agreeing_synchronize(self):
    """Agree on the scales of every gradient still to be reduced in one round trip, then
    run Horovod's synchronize(), which submits them and waits."""
    if self.process_set.included():
        pending = [p for p in self._requires_update if self._handles.get(p, (None, None))[0] is None]
        grads = [(p, g) for p in sorted(pending, key=self._parameter_names.get)
                 if (g := _dense_grad(self, p)) is not None]
        scales = self._compression.agree_scales([g for _, g in grads],
                                                [self._parameter_names.get(p) for p, _ in grads])
        self._agreed = {p: (g, r) for (p, g), r in zip(grads, scales)}
    try:
        _DistributedOptimizer.synchronize(self)
    finally:
        self._agreed = None


def _step(self, closure=None):
    out = _DistributedOptimizer.step(self, closure)
    self._compression.stats.mark_step()
    return out


_MEMORY = "horovod_nuq_error_feedback"


def _state_dict(self) -> dict:
    """The wrapped optimizer's state, plus the error-feedback residuals (host arrays)."""
    state = super(type(self), self).state_dict()
    memory = getattr(self._compression, "memory", None)
    if memory is not None:
        state[_MEMORY] = {k: torch.from_numpy(v) for k, v in memory.state_dict().items()}
    return state


def _load_state_dict(self, state_dict: dict) -> None:
    state_dict = dict(state_dict)
    residuals = state_dict.pop(_MEMORY, None)
    super(type(self), self).load_state_dict(state_dict)
    memory = getattr(self._compression, "memory", None)
    if memory is not None:
        memory.load_state_dict(residuals or {})
    elif residuals:
        raise ValueError("this checkpoint holds error-feedback residuals, but the optimizer's "
                         "compressor has error_feedback off; make it with error_feedback=True")


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Any = None,
                         compression: Any = hvd.Compression.none, backward_passes_per_step: int = 1,
                         op: Any = hvd.Average, gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups: Any = None, sparse_as_dense: bool = False,
                         process_set: Any = hvd.global_process_set) -> torch.optim.Optimizer:
    """Horovod's DistributedOptimizer; also routes the allgather protocol (see module doc).

    A horovod_nuq compressor made without a process set is given this optimizer's, so its
    field widths and scale agreement follow the ranks that actually reduce. With its
    error_feedback on, `state_dict()` also holds the residuals (key "horovod_nuq_error_feedback").
    """
    protocol = policy.route(compression, process_set, op, hvd.Average, hvd.Sum)
    kwargs = {"named_parameters": named_parameters, "compression": compression,
              "backward_passes_per_step": backward_passes_per_step, "op": op,
              "gradient_predivide_factor": gradient_predivide_factor, "num_groups": num_groups,
              "groups": groups, "sparse_as_dense": sparse_as_dense, "process_set": process_set}
    gathers = protocol == "allgather"
    if protocol is None or (not gathers and (groups is not None or num_groups)):
        opt = hvd.DistributedOptimizer(optimizer, **kwargs)
        if protocol is not None:
            type(opt).step = _step
            type(opt).state_dict, type(opt).load_state_dict = _state_dict, _load_state_dict
        return opt
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    if gathers:
        swap = {"_allreduce_grad_async": _allgather_grad_async,
                "_grouped_allreduce_grad_async": _grouped_allgather_grad_async}
    else:
        swap = {"_allreduce_grad_async": _deferred_allreduce_async,
                "synchronize": _agreeing_synchronize, "_agreed": None}
    attrs = dict(_DistributedOptimizer.__dict__, **swap, step=_step, state_dict=_state_dict,
                 load_state_dict=_load_state_dict)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), attrs)
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step,
               op, gradient_predivide_factor, groups if groups is not None else (num_groups or None),
               sparse_as_dense, process_set)
