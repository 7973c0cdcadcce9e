"""Local SGD with growing communication intervals, as a torch optimizer wrapper.

Spiridonoff, Olshevsky, Paschalidis, "Communication-efficient SGD: From Local SGD to
One-Shot Averaging", NeurIPS 2021 (arXiv 2106.04759): every rank takes local steps with its
own optimizer and the ranks average their models after steps tau_r = floor(a r (r+1) / 2),
i.e. round r holds a*r local steps, so R rounds cover T = tau_R steps and the number of
communications does not grow with T (the paper: R = Omega(N) rounds suffice for the 1/(NT)
error). `rounds=1` is one-shot averaging (one average, after step T). The schedule itself
lives in `horovod_nuq.schedules.GrowingIntervals`.

What travels: each rank's model difference since the last average, x_i - x_sync, through
any compressor (Horovod's none / fp16 or a horovod_nuq quantizer); every rank then sets
x_i = x_sync + average_i C(x_i - x_sync), so all ranks hold the same model after every
average. Optimizer state (momentum) stays local, as in the paper's local steps.
"""
from __future__ import annotations

from typing import Any

import horovod.torch as hvd
import torch

from .. import schedules
from . import averaging, wrapping

STATE_KEY = "horovod_nuq.local_sgd"


class _LocalSGDMixin(wrapping._Wrapped):
    """`step()`: the wrapped optimizer's local step, then an average when the schedule says."""

    def _setup(self, params: list, names: list, compression: Any, schedule: Any,
               process_set: Any) -> None:
        self._lsgd_params, self._lsgd_names = params, names
        self._lsgd_compression, self._lsgd_schedule = compression, schedule
        self._lsgd_process_set = process_set
        self._lsgd_settings = (f"LocalSGD({schedule.describe()}, compression="
                               f"{averaging.describe(compression)}, parameters={len(params)})")
        self._lsgd_step = 0
        self._lsgd_rounds = 0
        self._lsgd_anchor: list | None = None  # the last averaged model, the same on every rank

    @property
    def local_step(self) -> int:
        """Optimizer steps taken (the schedule's t)."""
        return self._lsgd_step

    @property
    def rounds_done(self) -> int:
        """Averages performed so far."""
        return self._lsgd_rounds

    @property
    def schedule(self) -> Any:
        return self._lsgd_schedule

    def step(self, closure: Any = None) -> Any:
        if self._lsgd_anchor is None:  # after the user's broadcast_parameters / load, not at wrap time
            self._lsgd_anchor = [p.detach().clone() for p in self._lsgd_params]
        loss = super().step(closure)
        self._lsgd_step += 1
        if self._lsgd_schedule.communicates(self._lsgd_step):
            self._average()
        averaging.mark_step(self._lsgd_compression)
        return loss

    @torch.no_grad()
    def _average(self) -> None:
        """Average the models (at the schedule's steps, on every rank together)."""
        wrapping.check_agreement(self._lsgd_settings, self._lsgd_step, self._lsgd_anchor,
                                 "horovod_nuq.local_sgd.check", self._lsgd_process_set)
        deltas = [p.detach() - a for p, a in zip(self._lsgd_params, self._lsgd_anchor)]
        means = averaging.average(deltas, self._lsgd_names, self._lsgd_compression,
                                  self._lsgd_process_set)
        for p, a, m in zip(self._lsgd_params, self._lsgd_anchor, means):
            a.add_(m.to(a.dtype))
            p.copy_(a)
        self._lsgd_rounds += 1

    def state_dict(self) -> dict:
        """The wrapped optimizer's state plus the step counter and the last averaged model."""
        out = super().state_dict()
        out[STATE_KEY] = {"settings": self._lsgd_settings, "step": self._lsgd_step,
                          "rounds": self._lsgd_rounds,
                          "anchor": None if self._lsgd_anchor is None
                          else [a.clone() for a in self._lsgd_anchor]}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict, mine = wrapping.split_state(state_dict, STATE_KEY, self._lsgd_settings, "LocalSGD")
        super().load_state_dict(state_dict)
        self._lsgd_step, self._lsgd_rounds = int(mine["step"]), int(mine["rounds"])
        self._lsgd_anchor = (None if mine["anchor"] is None else
                             wrapping.restore_tensors(mine["anchor"], self._lsgd_params, "anchor"))


def LocalSGD(optimizer: torch.optim.Optimizer, named_parameters: Any = None,
             compression: Any = None, total_steps: int | None = None, rounds: int | None = None,
             growth: float | None = None,
             process_set: Any = hvd.global_process_set) -> torch.optim.Optimizer:
    """Wrap `optimizer` for Local SGD with growing intervals (see the module doc).

    total_steps: T, the optimizer steps of the run; with `rounds` R (default: the number of
    ranks, the paper's R = N) it sets a = 2T/(R(R+1)) so the R-th and last average lands
    after step T (later steps keep the formula). rounds=1: one-shot averaging. growth: a,
    for runs of open length (round r then holds a*r steps); give it instead of total_steps.
    compression: how model differences travel (default hvd.Compression.none).
    Make LR schedulers on the returned optimizer (one made on the plain optimizer still
    sets the shared learning rates, but warns that it never sees a step).
    Call hvd.broadcast_parameters first: the ranks must start from the same model (checked).
    """
    if compression is None:
        compression = hvd.Compression.none
    if not hasattr(compression, "compress") or not hasattr(compression, "decompress"):
        raise TypeError(f"compression must be a Horovod compressor (hvd.Compression.none / fp16) or "
                        f"a horovod_nuq compressor, got {compression!r}")
    wrapped = wrapping.wrap(optimizer, _LocalSGDMixin)
    if growth is None and total_steps is not None and rounds is None:
        rounds = process_set.size()
    schedule = schedules.GrowingIntervals(total_steps=total_steps, rounds=rounds, growth=growth)
    averaging.bind(compression, process_set)
    params, names = wrapping.named_params(optimizer, named_parameters, "horovod_nuq.local_sgd")
    wrapped._setup(params, names, compression, schedule, process_set)
    return wrapped
