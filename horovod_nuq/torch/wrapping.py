"""What Local SGD and CSER share: wrapping a torch optimizer, naming its parameters, and
checking at each synchronisation that every rank runs the same schedule from the same model.

A wrapper is a subclass of the user's optimizer class (as hvd.DistributedOptimizer makes one)
whose instance shares the given optimizer's param_groups, state and defaults, so LR
schedulers, momentum buffers and `zero_grad` work unchanged; only `step` and the state dict
grow. The check allgathers (settings fingerprint, step, model checksum) from every rank as
the first collective of a synchronisation: ranks on different schedules meet there (the op
has one name) and all raise, instead of averaging mismatched rounds or waiting forever.
"""
from __future__ import annotations

import hashlib
from typing import Any

import horovod.torch as hvd
import torch


def wrap(optimizer: torch.optim.Optimizer, mixin: type) -> Any:
    """A `mixin` + optimizer.__class__ instance sharing `optimizer`'s param groups and state."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    # Horovod's DistributedOptimizer is a class built from _DistributedOptimizer's dict, not a
    # subclass of it: its `synchronize` method gives it away
    if isinstance(optimizer, _Wrapped) or hasattr(optimizer, "synchronize"):
        raise TypeError("pass the plain torch optimizer: this wrapper does its own communication, "
                         "and wrapping a distributed optimizer would synchronise twice")
    cls = type(optimizer.__class__.__name__, (mixin, optimizer.__class__), {})
    wrapped = object.__new__(cls)
    # an LR scheduler made on the plain optimizer left a `step` bound to it in the instance
    # dict: copied, it would bypass the wrapper's step (and every synchronisation)
    wrapped.__dict__.update({k: v for k, v in optimizer.__dict__.items() if k != "step"})
    return wrapped


class _Wrapped:
    """Marker base of the wrappers' mixins."""


def named_params(optimizer: torch.optim.Optimizer, named_parameters: Any,
                 prefix: str) -> tuple[list[torch.Tensor], list[str]]:
    """Every parameter of the optimizer in group order, and its collective name `prefix.name`
    (named_parameters' names, else its position: the same on every rank)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if named_parameters is None:
        return params, [f"{prefix}.param{i}" for i in range(len(params))]
    named = list(named_parameters)
    if any(not isinstance(pair, tuple) or len(pair) != 2 for pair in named):
        raise ValueError("named_parameters must yield (name, parameter) pairs, as "
                         "model.named_parameters() does")
    names = {id(p): n for n, p in named}
    if len(names) != len(named) or len(set(names.values())) != len(named):
        raise ValueError("named_parameters holds a parameter or a name twice; names must be unique")
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"named_parameters does not name {len(missing)} parameter(s) of the "
                         "optimizer; pass model.named_parameters() of the model the optimizer trains")
    return params, [f"{prefix}.{names[id(p)]}" for p in params]


def checksum(tensors: list[torch.Tensor]) -> int:
    """A bytewise checksum of the tensors, computed where they live (one int back)."""
    total = torch.zeros((), dtype=torch.int64, device=tensors[0].device if tensors else "cpu")
    for i, t in enumerate(tensors):
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        v = (flat.view(torch.int32) if flat.numel() % 4 == 0 else flat).to(torch.int64)
        total += (i + 1) * v.sum() + (v * v).sum()  # int64 sums wrap the same way on every rank
    return int(total) & ((1 << 62) - 1)


def fingerprint(settings: str) -> int:
    """A 62-bit integer naming a settings string."""
    return int.from_bytes(hashlib.sha256(settings.encode()).digest()[:8], "little") & ((1 << 62) - 1)


def check_agreement(settings: str, step: int, model: list[torch.Tensor] | None, name: str,
                    process_set: Any) -> None:
    """Raise on every rank unless all ranks run `settings`, are at `step` and (when `model` is
    given) hold the same synchronised model."""
    mine = torch.tensor([[fingerprint(settings), step, checksum(model) if model is not None else 0]],
                        dtype=torch.int64)
    every = hvd.allgather(mine, name=name, process_set=process_set)
    if bool((every == every[0]).all()):
        return
    rows = every.tolist()
    texts = [settings]
    if getattr(process_set, "process_set_id", 0) == 0:
        texts = hvd.allgather_object(settings, name=f"{name}.settings")
    what = []
    if len({r[0] for r in rows}) > 1:
        what.append("settings differ: " + "; ".join(
            f"rank {i}: {t}" for i, t in enumerate(texts)) if len(texts) == len(rows)
            else f"settings differ across ranks (this rank: {settings})")
    if len({r[1] for r in rows}) > 1:
        what.append("steps differ: " + ", ".join(f"rank {i} at step {r[1]}" for i, r in enumerate(rows)))
    if len({r[2] for r in rows}) > 1:
        what.append("the synchronised models differ (did every rank start from the same "
                    "parameters? call hvd.broadcast_parameters(model.state_dict(), root_rank=0) "
                    "before training, and load the same checkpoint on every rank)")
    raise RuntimeError("ranks are not on the same schedule, so averaging now would mix different "
                       "rounds: " + " | ".join(what) + ". Give every rank the same settings.")


def restore_tensors(saved: list, like: list[torch.Tensor], what: str) -> list[torch.Tensor]:
    """Copies of saved tensors on the device and in the dtype of `like` (shapes checked)."""
    if len(saved) != len(like):
        raise ValueError(f"the state dict holds {len(saved)} {what} tensors, this optimizer has "
                         f"{len(like)} parameters: load a state dict of the same model")
    out = []
    for s, p in zip(saved, like):
        if tuple(s.shape) != tuple(p.shape):
            raise ValueError(f"a saved {what} tensor has shape {tuple(s.shape)}, its parameter "
                             f"{tuple(p.shape)}: load a state dict of the same model")
        out.append(s.detach().to(device=p.device, dtype=p.dtype).clone())
    return out


def split_state(state_dict: dict, key: str, settings: str, wrapper: str) -> tuple[dict, dict]:
    """(the wrapped optimizer's state, this wrapper's entry `key`), refusing a state dict that
    the wrapper did not save or saved with other settings."""
    rest = dict(state_dict)
    mine = rest.pop(key, None)
    if mine is None:
        raise ValueError(f"this state dict has no {key!r} entry: it was not saved by "
                         f"{wrapper}.state_dict(); load it into the wrapped optimizer instead")
    if mine["settings"] != settings:
        raise ValueError(f"the state dict was saved by {mine['settings']}, this optimizer is "
                         f"{settings}: resume with the same settings")
    return rest, mine
