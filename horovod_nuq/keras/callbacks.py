"""Horovod's Keras callbacks for Keras 3: broadcast from the root rank, metric averaging at
epoch end, and learning-rate warm-up (semantics of horovod.tensorflow.keras.callbacks)."""
from __future__ import annotations

from typing import Any

import keras
import numpy as np

from . import _hvd


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Give every rank the root rank's model and optimizer state when training starts.

    Keras 3's fit builds the model and the optimizer before on_train_begin, so the broadcast
    happens before the first step; if something is still unbuilt then, it happens after the
    first batch instead (as Horovod's Keras 2 callback always does).
    """

    def __init__(self, root_rank: int = 0, process_set: Any = None) -> None:
        super().__init__()
        self.root_rank = root_rank
        self.process_set = process_set
        self.broadcast_done = False

    def _broadcast(self) -> None:
        opt = getattr(self.model, "optimizer", None)
        variables = list(self.model.variables) + (list(opt.variables) if opt is not None else [])
        _hvd.broadcast_variables(variables, self.root_rank, self.process_set)
        self.broadcast_done = True

    def _ready(self) -> bool:
        opt = getattr(self.model, "optimizer", None)
        return self.model.built and (opt is None or opt.built)

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.broadcast_done and self._ready():
            self._broadcast()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not self.broadcast_done:
            self._broadcast()


class MetricAverageCallback(keras.callbacks.Callback):
    """Average the epoch's logged metrics over ranks, in place (list it before callbacks that
    read them: checkpoints, early stopping, progress). All ranks must log the same names."""

    def __init__(self, process_set: Any = None) -> None:
        super().__init__()
        self.process_set = process_set

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not logs:
            return
        keys = sorted(k for k, v in logs.items() if np.ndim(v) == 0 and _numeric(v))
        if not keys:
            return
        values = np.array([float(logs[k]) for k in keys], dtype=np.float64)
        mean = _hvd.allreduce_numpy(values, True, "hnuq.keras.metrics", self.process_set)
        for k, v in zip(keys, mean):
            logs[k] = float(v)


def _numeric(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


class LearningRateWarmupCallback(keras.callbacks.Callback):
    """Ramp the learning rate from initial_lr / size to initial_lr over warmup_epochs
    (Goyal et al., "Accurate, Large Minibatch SGD"), adjusted before every batch.

    initial_lr is the rate after warm-up (usually the single-rank rate times size). As in
    Horovod, lr(epoch) = initial_lr / size * (epoch * (size - 1) / warmup_epochs + 1) with a
    fractional epoch; at the end of the warm-up the rate is set to initial_lr exactly.
    Horovod's momentum correction is not offered: Keras 3 compiles momentum as a constant.
    """

    def __init__(self, initial_lr: float, warmup_epochs: int = 5, steps_per_epoch: int | None = None,
                 verbose: int = 0, size: int | None = None) -> None:
        super().__init__()
        self.initial_lr = float(initial_lr)
        self.warmup_epochs = warmup_epochs
        self.steps_per_epoch = steps_per_epoch
        self.verbose = verbose
        self.size = size
        self.current_epoch = 0

    def _size(self) -> int:
        return self.size if self.size is not None else _hvd.horovod().size()

    def multiplier(self, epoch: float) -> float:
        n = self._size()
        return 1.0 / n * (epoch * (n - 1) / self.warmup_epochs + 1)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.current_epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self.current_epoch >= self.warmup_epochs:
            return
        steps = self.steps_per_epoch or (self.params or {}).get("steps")
        if not steps:
            raise ValueError("LearningRateWarmupCallback needs steps_per_epoch (fit did not say)")
        epoch = self.current_epoch + float(batch) / steps
        self.model.optimizer.learning_rate = self.initial_lr * self.multiplier(epoch)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch == self.warmup_epochs - 1:
            self.model.optimizer.learning_rate = self.initial_lr
            if self.verbose and _hvd.horovod().rank() == 0:
                print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to {self.initial_lr:g}.")
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
