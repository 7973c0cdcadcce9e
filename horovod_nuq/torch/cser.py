"""CSER, communication-efficient SGD with error reset, as a torch optimizer wrapper.

Xie, Zheng, Koyejo, Gupta, Li, Lin, "CSER: Communication-efficient SGD with Error Reset",
NeurIPS 2020 (arXiv 2007.13221). The paper's text was not reachable from the machines this
was written on: the form below follows its abstract (error reset: bifurcated local models
whose residuals are periodically reset; partial synchronisation of both the gradients and
the models) and the authors' scripts; compare it with the paper's algorithm listings before
relying on details. Momentum lives in the wrapped optimizer, whose update p it compresses. Each rank keeps a
bifurcated model x_i = x_hat - e_i: x_hat, the synchronised part, is the same on every
rank; e_i is this rank's residual. At every step t, with p_i the wrapped optimizer's update
(lr * gradient for plain SGD):

    partial sync of updates (C1):  d_i = C1(p_i),  x_hat <- x_hat - mean_j d_j,
                                   e_i <- e_i + (p_i - d_i)
    every H-th step, error reset (C2): s_i = C2(e_i), x_hat <- x_hat - mean_j s_j,
                                   e_i <- e_i - s_i
    x_i <- x_hat - e_i

With C2 = identity (the default, hvd.Compression.none) the reset empties every residual, so
all ranks hold the same model after each reset. The default H follows the authors' scripts
(github.com/xcgoner/NeurIPS2020_CSER, exp_CSER.sh: local-sgd-interval = the C1 compression
ratio over the C2 one), so resets cost on average what the per-step syncs cost.
"""
from __future__ import annotations

from typing import Any

import horovod.torch as hvd
import torch

from .. import schedules
from . import averaging, wrapping

STATE_KEY = "horovod_nuq.cser"
_RATIO_NUMEL = 1 << 20  # bytes per coordinate are linear in the size: one large tensor decides


class _CSERMixin(wrapping._Wrapped):
    """`step()`: the wrapped optimizer's local step, then CSER's partial syncs (module doc)."""

    def _setup(self, params: list, names: list, c1: Any, c2: Any, schedule: Any,
               process_set: Any) -> None:
        self._cser_params, self._cser_process_set = params, process_set
        self._cser_names1 = [f"{n}.c1" for n in names]
        self._cser_names2 = [f"{n}.c2" for n in names]
        self._cser_c1, self._cser_c2, self._cser_schedule = c1, c2, schedule
        self._cser_settings = (f"CSER(period={schedule.period}, compression={averaging.describe(c1)}, "
                               f"reset_compression={averaging.describe(c2)}, parameters={len(params)})")
        self._cser_step = 0
        self._cser_sync: list | None = None  # x_hat, the same on every rank
        self._cser_error: list | None = None  # e_i, this rank's residual

    @property
    def period(self) -> int:
        return self._cser_schedule.period

    @property
    def local_step(self) -> int:
        return self._cser_step

    @property
    def synchronized_model(self) -> list:
        """x_hat per parameter (identical on every rank)."""
        self._cser_init()
        return self._cser_sync

    @property
    def residuals(self) -> list:
        """e_i per parameter (this rank's; the local model is x_hat - e_i)."""
        self._cser_init()
        return self._cser_error

    def _cser_init(self) -> None:
        if self._cser_sync is None:  # at the first step: after the user's broadcast / load
            self._cser_sync = [p.detach().clone() for p in self._cser_params]
            self._cser_error = [torch.zeros_like(p) for p in self._cser_params]

    def step(self, closure: Any = None) -> Any:
        self._cser_init()
        before = [p.detach().clone() for p in self._cser_params]
        loss = super().step(closure)
        self._cser_step += 1
        reset = self._cser_schedule.communicates(self._cser_step)
        # every step: the ranks must agree on settings and step before any other collective
        # (the model checksum, a pass over x_hat, only at the first step and at resets)
        wrapping.check_agreement(self._cser_settings, self._cser_step,
                                 self._cser_sync if reset or self._cser_step == 1 else None,
                                 "horovod_nuq.cser.check", self._cser_process_set)
        with torch.no_grad():
            updates = [b - p.detach() for b, p in zip(before, self._cser_params)]
            means, owns = averaging.average_and_own(updates, self._cser_names1, self._cser_c1,
                                                    self._cser_process_set)
            for x, e, u, m, o in zip(self._cser_sync, self._cser_error, updates, means, owns):
                x.sub_(m.to(x.dtype))
                e.add_(u - o.to(e.dtype))
            if reset:
                means, owns = averaging.average_and_own(self._cser_error, self._cser_names2,
                                                        self._cser_c2, self._cser_process_set)
                for x, e, m, o in zip(self._cser_sync, self._cser_error, means, owns):
                    x.sub_(m.to(x.dtype))
                    e.sub_(o.to(e.dtype))
            for p, x, e in zip(self._cser_params, self._cser_sync, self._cser_error):
                p.copy_(x - e)
        averaging.mark_step(self._cser_c1)
        if self._cser_c2 is not self._cser_c1:
            averaging.mark_step(self._cser_c2)
        return loss

    def state_dict(self) -> dict:
        """The wrapped optimizer's state plus the step counter, x_hat and the residuals."""
        out = super().state_dict()
        out[STATE_KEY] = {"settings": self._cser_settings, "step": self._cser_step,
                          "sync": None if self._cser_sync is None else [x.clone() for x in self._cser_sync],
                          "error": None if self._cser_error is None else [e.clone() for e in self._cser_error]}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict, mine = wrapping.split_state(state_dict, STATE_KEY, self._cser_settings, "CSER")
        super().load_state_dict(state_dict)
        self._cser_step = int(mine["step"])
        if mine["sync"] is None:
            self._cser_sync = self._cser_error = None
        else:
            self._cser_sync = wrapping.restore_tensors(mine["sync"], self._cser_params, "x_hat")
            self._cser_error = wrapping.restore_tensors(mine["error"], self._cser_params, "residual")


def bytes_per_coordinate(compression: Any, ranks: int) -> float:
    """Bytes one rank sends per coordinate through `compression` (C1 / C2 cost model)."""
    if compression is hvd.Compression.fp16:
        return 2.0
    if averaging.is_quantizer(compression):
        return compression.payload_bytes(_RATIO_NUMEL, ranks, "allgather") / _RATIO_NUMEL
    return 4.0


def default_period(c1: Any, c2: Any, ranks: int) -> int:
    """H = (C1's compression ratio) / (C2's), at least 1: the authors' rule (module doc)."""
    return max(1, round(bytes_per_coordinate(c2, ranks) / bytes_per_coordinate(c1, ranks)))


def CSER(optimizer: torch.optim.Optimizer, named_parameters: Any = None, *, compression: Any,
         reset_compression: Any = None, period: int | None = None,
         process_set: Any = hvd.global_process_set) -> torch.optim.Optimizer:
    """Wrap `optimizer` for CSER (see the module doc).

    compression: C1, for every step's update (any horovod_nuq compressor with per-worker
    codes, or hvd.Compression.none / fp16; none makes CSER plain synchronous SGD).
    reset_compression: C2, for the residuals at each reset (default hvd.Compression.none: a
    full reset). period: H, steps between resets (default: C1's ratio over C2's, see
    `default_period`). Call hvd.broadcast_parameters first (checked at the first step).
    Make LR schedulers on the returned optimizer (one made on the plain optimizer still
    sets the shared learning rates, but warns that it never sees a step).
    """
    wrapped = wrapping.wrap(optimizer, _CSERMixin)
    c2 = hvd.Compression.none if reset_compression is None else reset_compression
    for label, c in (("compression", compression), ("reset_compression", c2)):
        if not hasattr(c, "compress") or not hasattr(c, "decompress"):
            raise TypeError(f"{label} must be a Horovod compressor (hvd.Compression.none / fp16) or "
                            f"a horovod_nuq compressor, got {c!r}")
        if averaging.is_quantizer(c) and c.shared_scale_only:
            raise ValueError(f"{label}={c!r} quantizes every rank on one shared scale, so a rank "
                             "cannot decode its own C(v), which CSER's residual needs; use QSGD, "
                             "QSGDinf, NUQ or TNQ, or hvd.Compression.none / fp16")
        if getattr(c, "memory", None) is not None:
            raise ValueError(f"{label}={c!r} has error feedback, which would send CSER's residual "
                             "a second time (CSER keeps it in the local model and resets it every "
                             "period steps instead); pass a compressor without error_feedback")
        averaging.bind(c, process_set)
    if period is None:
        period = default_period(compression, c2, process_set.size())
    schedule = schedules.Periodic(period)
    params, names = wrapping.named_params(optimizer, named_parameters, "horovod_nuq.cser")
    wrapped._setup(params, names, compression, c2, schedule, process_set)
    return wrapped
