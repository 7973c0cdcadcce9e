"""Keras 3 DistributedOptimizer: reduce gradients over Horovod, then apply the wrapped optimizer.

    opt = horovod_nuq.keras.DistributedOptimizer(keras.optimizers.Adam(1e-3),
                                                 compression=NUQCompressor())

Wraps any Keras 3 optimizer (composition, as keras.optimizers.LossScaleOptimizer does): `apply`
reduces the gradients across ranks (op Average or Sum; either protocol of the horovod_nuq
quantizers, or Horovod's own none / fp16) and hands them to the wrapped optimizer. Works in
model.fit and in custom training loops, eager or inside tf.function, on the TensorFlow
backend (horovod.tensorflow) and the PyTorch backend (horovod.torch).

Mixed precision: wrap the LossScaleOptimizer, `DistributedOptimizer(LossScaleOptimizer(opt))`.
The still-scaled gradients are reduced first, so every rank sees the same reduced values and
takes the same finite / non-finite branch (a non-finite step is skipped on all ranks). The
wrapper then counts as a LossScaleOptimizer, so model.compile does not wrap it again.
"""
from __future__ import annotations

import inspect
from typing import Any

import keras

from .. import policy
from . import _hvd

_LSO = keras.optimizers.LossScaleOptimizer


def _allgather_one(hvd: Any, g: Any, compression: Any, average: bool, process_set: Any,
                   key: str | None) -> Any:
    """The allgather protocol for one tensor: per-rank codes, gathered, decoded in rank order."""
    payload, ctx = compression.compress_for_allgather(g, key=key)
    gathered = hvd.allgather(payload, process_set=process_set)
    if _hvd.backend_name() == "tensorflow":
        import tensorflow as tf

        gathered = tf.reshape(gathered, [process_set.size() * payload.shape[0]])  # static shape
    return compression.decompress_gathered(gathered, ctx, average)


def _reduce_gradients(grads: list, compression: Any, op: Any, process_set: Any,
                      keys: list | None = None) -> list:
    """Every gradient reduced over `process_set` (None stays None), routed by the package's one
    policy: horovod_nuq compressors whose protocol is "allgather" here gather their packed
    codes directly (no sentinel); everything else goes through Horovod's allreduce. `keys`
    (the variables' paths) name the error-feedback residuals."""
    hvd = _hvd.horovod()
    if compression is None:
        compression = hvd.Compression.none
    gathers = policy.route(compression, process_set, op, hvd.Average, hvd.Sum) == "allgather"
    tf = None
    if _hvd.backend_name() == "tensorflow":
        import tensorflow as tf
    feedback = getattr(compression, "memory", None) is not None
    out = []
    for i, g in enumerate(grads):
        if g is None:
            out.append(None)
            continue
        if tf is not None and isinstance(g, tf.IndexedSlices):
            g = tf.convert_to_tensor(g)  # sparse (embedding) gradients are reduced dense
        key = None if keys is None else keys[i]
        if gathers:
            out.append(_allgather_one(hvd, g, compression, op == hvd.Average, process_set, key))
        else:  # with error feedback, the name tells the compressor which residual is g's
            out.append(hvd.allreduce(g, compression=compression, op=op, process_set=process_set,
                                     **({"name": key} if feedback else {})))
    return out


class _DistributedOptimizer(keras.optimizers.Optimizer):
    """Reduces gradients across Horovod ranks, then applies `inner_optimizer` (see module doc)."""

    def __init__(self, optimizer: keras.optimizers.Optimizer, compression: Any, op: Any,
                 backward_passes_per_step: int, average_aggregated_gradients: bool,
                 process_set: Any, name: str | None) -> None:
        # not super(): in the LossScaleOptimizer variant that would run LossScaleOptimizer.__init__
        keras.optimizers.Optimizer.__init__(self, learning_rate=0.0,
                                            name=name or f"distributed_{optimizer.name}")
        self.inner_optimizer = optimizer
        self.compression = compression
        self.op = op
        self.process_set = process_set
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.average_aggregated_gradients = bool(average_aggregated_gradients)
        self._accumulators: list = []
        self._passes = None
        self._eager_reduce = None
        self._ready = True  # from here on, an assignment of loss_scale_factor comes from outside

    # ---- what Keras sees: the wrapped optimizer's state, learning rate and iterations -------
    def build(self, var_list: list) -> None:
        """Build the wrapped optimizer, plus local gradient accumulators when
        backward_passes_per_step > 1 (created here, never lazily inside a traced step)."""
        var_list = list(var_list)
        if self.backward_passes_per_step > 1:
            self._passes = self.add_variable(shape=(), dtype="int64", initializer="zeros",
                                             aggregation="none", name="hvd_backward_passes")
            accumulators = [self.add_variable_from_reference(v, name="hvd_accumulated_grad")
                            for v in var_list]
            object.__setattr__(self, "_accumulators", accumulators)  # tracked once, by add_variable
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        keras.optimizers.Optimizer.build(self, var_list)

    @property
    def variables(self) -> list:
        return self._variables[:] + self.inner_optimizer.variables

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        if getattr(self, "_ready", False):
            self.inner_optimizer.learning_rate = value
        else:  # Optimizer.__init__ sets its own (unused) learning-rate variable
            keras.optimizers.Optimizer.learning_rate.fset(self, value)

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    @property
    def loss_scale_factor(self) -> Any:
        return self.inner_optimizer.loss_scale_factor if getattr(self, "_ready", False) else None

    def __setattr__(self, name: str, value: Any) -> None:
        # intercepted before Keras' trackable short-circuit (which skips `x.a = x.a`)
        if name != "loss_scale_factor":
            super().__setattr__(name, value)
        elif getattr(self, "_ready", False):  # (Optimizer.__init__'s default is dropped)
            if _called_by_loss_scale_optimizer():
                raise ValueError(
                    "a LossScaleOptimizer is wrapping horovod_nuq.keras.DistributedOptimizer (model."
                    "compile does this under the mixed_float16 policy). Its finite-gradient check would "
                    "then run on each rank's own gradients, so ranks could take different branches and "
                    "hang. Wrap it the other way round: DistributedOptimizer(keras.optimizers."
                    "LossScaleOptimizer(opt), compression=...); the wrapper then counts as a "
                    "LossScaleOptimizer and compile leaves it alone.")
            self.inner_optimizer.loss_scale_factor = value

    def scale_loss(self, loss: Any) -> Any:
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list: list) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError("horovod_nuq.keras.DistributedOptimizer applies statefully "
                                  "(the TensorFlow and PyTorch backends); stateless_apply is JAX's path")

    def get_config(self) -> dict:
        return {"name": self.name,
                "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
                "backward_passes_per_step": self.backward_passes_per_step,
                "average_aggregated_gradients": self.average_aggregated_gradients}

    # ---- the step ---------------------------------------------------------------------------
    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        """Reduce `grads` across ranks (every backward_passes_per_step-th call), then apply."""
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                raise ValueError("pass trainable_variables on the first apply, or build() first")
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        if self.backward_passes_per_step == 1:
            self._reduce_and_apply(grads, trainable_variables)
            return
        index = {self._var_key(v): i for i, v in enumerate(self._trainable_variables)}
        accs = [self._accumulators[index[self._var_key(v)]] for v in trainable_variables]
        for acc, g in zip(accs, grads):
            if g is not None:
                acc.assign_add(keras.ops.cast(keras.ops.convert_to_tensor(g), acc.dtype))
        self._passes.assign_add(1)

        def flush() -> None:
            n = self.backward_passes_per_step if self.average_aggregated_gradients else 1
            summed = [None if g is None else (acc.value / n if n > 1 else acc.value)
                      for acc, g in zip(accs, grads)]
            self._reduce_and_apply(summed, trainable_variables)
            for acc in accs:
                acc.assign(keras.ops.zeros_like(acc))

        keras.ops.cond(keras.ops.equal(self._passes % self.backward_passes_per_step, 0),
                       flush, lambda: None)

    def _reduce_and_apply(self, grads: list, trainable_variables: list) -> None:
        reduced = self._reduce(grads, [v.path for v in trainable_variables])
        self.inner_optimizer.apply(reduced, trainable_variables)
        self._mark_step(reduced)

    def _reduce(self, grads: list, keys: list) -> list:
        if _hvd.backend_name() == "tensorflow":
            import tensorflow as tf

            if tf.executing_eagerly():  # one graph per signature: Horovod's graph ops, no per-op dispatch
                if self._eager_reduce is None:
                    object.__setattr__(self, "_eager_reduce", tf.function(
                        lambda gs, ks: _reduce_gradients(gs, self.compression, self.op,
                                                         self.process_set, ks)))
                live = [i for i, g in enumerate(grads) if g is not None]
                out = self._eager_reduce([grads[i] for i in live], [keys[i] for i in live])
                reduced = [None] * len(grads)
                for i, r in zip(live, out):
                    reduced[i] = r
                return reduced
        return _reduce_gradients(grads, self.compression, self.op, self.process_set, keys)

    def _mark_step(self, reduced: list) -> None:
        """Close the compressor's byte-statistics step (graph mode: on every run of the graph)."""
        stats = getattr(self.compression, "stats", None)
        if stats is None:
            return
        if not _hvd.in_tf_graph():
            stats.mark_step()
            return
        import tensorflow as tf

        with tf.control_dependencies([g for g in reduced if g is not None]):
            tf.py_function(lambda: stats.mark_step(), [], Tout=tf.int64)


class _DistributedLossScaleOptimizer(_DistributedOptimizer, _LSO):
    """The wrapper around a LossScaleOptimizer: also an instance of it, so that model.compile
    under mixed_float16 does not wrap it once more (with the check on unreduced gradients)."""

    @property
    def dynamic_scale(self) -> Any:
        return self.inner_optimizer.dynamic_scale

    @property
    def initial_scale(self) -> Any:
        return self.inner_optimizer.initial_scale

    @initial_scale.setter
    def initial_scale(self, value: Any) -> None:
        pass  # set by LossScaleOptimizer.__init__ only, which this class never runs

    @property
    def step_counter(self) -> Any:
        return self.inner_optimizer.step_counter


def _called_by_loss_scale_optimizer() -> bool:
    frame = inspect.currentframe()
    for _ in range(6):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return False
        owner = frame.f_locals.get("self")
        if isinstance(owner, _LSO) and not isinstance(owner, _DistributedOptimizer):
            return True
    return False


def DistributedOptimizer(optimizer: keras.optimizers.Optimizer, compression: Any = None,
                         op: Any = None, backward_passes_per_step: int = 1,
                         average_aggregated_gradients: bool = False, process_set: Any = None,
                         name: str | None = None) -> keras.optimizers.Optimizer:
    """Wrap a Keras 3 optimizer so that it applies gradients reduced across Horovod ranks.

    compression: a horovod_nuq compressor (either protocol, as its `protocol_for` picks), or
    Horovod's Compression.none / fp16, or None (plain allreduce). op: Average (default) or Sum.
    backward_passes_per_step: accumulate this many local gradients before one reduction
    (summed, or averaged with average_aggregated_gradients=True; Horovod's semantics).
    process_set: the Horovod process set to reduce over (default: all ranks).
    """
    _hvd.check_keras3()
    backend = _hvd.backend_name()
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        module = type(optimizer).__module__
        if module.startswith(("tf_keras", "keras.optimizers.legacy", "tensorflow.python.keras")) or (
                hasattr(optimizer, "get_gradients") or hasattr(optimizer, "_create_slots")):
            raise TypeError(
                f"{type(optimizer).__module__}.{type(optimizer).__name__} is a Keras 2 (tf_keras) "
                "optimizer; horovod_nuq.keras wraps Keras 3 optimizers (keras.optimizers.*). For "
                "tf_keras use horovod.tensorflow.keras.DistributedOptimizer(opt, compression=...) "
                "with TF_USE_LEGACY_KERAS=1.")
        raise TypeError(f"expected a Keras 3 optimizer (keras.optimizers.Optimizer), got "
                        f"{type(optimizer).__module__}.{type(optimizer).__name__}")
    if isinstance(optimizer, _DistributedOptimizer):
        raise TypeError("this optimizer is already a horovod_nuq.keras.DistributedOptimizer")
    if getattr(optimizer, "gradient_accumulation_steps", None):
        raise ValueError("the wrapped optimizer accumulates gradients itself (gradient_accumulation_"
                         "steps), which would reduce on every step: use backward_passes_per_step here")
    if backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
    hvd = _hvd.horovod()
    op = hvd.Average if op is None else op
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("op must be hvd.Average or hvd.Sum (Adasum is not supported here)")
    if process_set is None:
        process_set = hvd.global_process_set
    if hasattr(compression, "protocol"):
        if backend == "torch":
            import horovod_nuq.torch  # (registers the quantizers' torch frontend)
        else:
            import horovod_nuq.tensorflow  # noqa: F401  (the TF frontend, before any trace)
        if process_set is not hvd.global_process_set:
            if compression.process_set is None:
                compression.process_set = process_set  # field widths follow the reducing ranks
            elif compression.process_set is not process_set:
                raise ValueError("the compressor and the optimizer name different process sets")
    cls = _DistributedLossScaleOptimizer if isinstance(optimizer, _LSO) else _DistributedOptimizer
    return cls(optimizer, compression, op, backward_passes_per_step, average_aggregated_gradients,
               process_set, name)
