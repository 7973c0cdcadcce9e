"""Keras 3 (plain `keras`) under real Horovod collectives: horovod_nuq.keras.DistributedOptimizer
and its callbacks. Runs in its own mpirun, with TF_USE_LEGACY_KERAS unset (conftest.py sets it
for the other suites; it is removed here before TensorFlow is imported), and never imports
tf_keras. TensorFlow backend by default; test_keras3_torch_mpi.py reruns the backend-neutral
tests on Keras' PyTorch backend over horovod.torch.
"""
import os
import sys

os.environ.pop("TF_USE_LEGACY_KERAS", None)
BACKEND = os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if BACKEND == "torch":
    import horovod.torch as hvd
    import torch
    tf = None
else:
    tf = pytest.importorskip("tensorflow")
    import horovod.tensorflow as hvd
from harness import digest, rank_gradient

import horovod_nuq.keras as nuqk
from horovod_nuq import (
    GlobalQSGDCompressor,
    NUQCompressor,
    QSGDCompressor,
    QSGDInfCompressor,
    TNQCompressor,
)

hvd.init()
N, RANK = hvd.size(), hvd.rank()
# HNUQ_KERAS3_CHECK_HOROVOD=1 runs the one-step fit test against horovod.tensorflow.keras's
# optimizer, which fails it under Keras 3 (each rank applies its own gradient).
if os.environ.get("HNUQ_KERAS3_CHECK_HOROVOD"):
    import horovod.tensorflow.keras as _hvdk
    WRAP = lambda opt, compression=None: _hvdk.DistributedOptimizer(opt, compression=compression or
                                                                    hvd.Compression.none)
else:
    WRAP = nuqk.DistributedOptimizer
CASES = [(QSGDCompressor, "allreduce"), (QSGDCompressor, "allgather"),
         (QSGDInfCompressor, "allreduce"), (QSGDInfCompressor, "allgather"),
         (NUQCompressor, "allreduce"), (NUQCompressor, "allgather"),
         (TNQCompressor, "allreduce"), (TNQCompressor, "allgather"),
         (GlobalQSGDCompressor, "allreduce")]
ids = lambda x: getattr(x, "__name__", x)
tf_only = pytest.mark.skipif(tf is None, reason="TensorFlow backend only")


def graph(fn):
    """tf.function on the TensorFlow backend (the traced path), the function itself on torch."""
    return tf.function(fn) if tf is not None else fn


def tensor(x):
    return keras.ops.convert_to_tensor(np.asarray(x))


def all_same(x) -> bool:
    d = digest(np.asarray(x))
    gathered = hvd.allgather(tf.constant(d[None, :]) if tf is not None
                             else torch.from_numpy(d[None, :])).numpy()
    return bool((gathered == gathered[0]).all())


def gather_all(x: np.ndarray) -> np.ndarray:
    """Every rank's copy of the float64 array x, stacked."""
    t = tf.constant(x[None]) if tf is not None else torch.from_numpy(x[None])
    return hvd.allgather(t, name="gather_all").numpy()


def flat(variables) -> np.ndarray:
    return np.concatenate([np.asarray(keras.ops.convert_to_numpy(v)).ravel() for v in variables])


def test_runs_on_plain_keras3():
    assert keras.__version__.startswith("3") and keras.backend.backend() == BACKEND
    assert "TF_USE_LEGACY_KERAS" not in os.environ


def _one_weight_model():
    return keras.Sequential([keras.Input((1,)),
                             keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])


@pytest.mark.parametrize("compression", [None, "fp16", "nuq"])
def test_one_step_fit_averages(compression):
    """MAE at w=0 has gradient -(rank+1): one SGD(0.1) step must give 0.1 * mean(rank+1) on
    every rank (horovod.tensorflow.keras under Keras 3 leaves 0.1 * (rank+1) instead)."""
    comp = {"fp16": hvd.Compression.fp16, "nuq": NUQCompressor(seed=1)}.get(compression)
    model = _one_weight_model()
    model.compile(WRAP(keras.optimizers.SGD(0.1), compression=comp), "mean_absolute_error")
    model.fit(np.array([[RANK + 1.0]], np.float32), np.array([[100.0]], np.float32), verbose=0)
    want = 0.1 * np.mean(np.arange(1, N + 1))
    np.testing.assert_allclose(model.get_weights()[0].ravel(), [want], rtol=1e-6)


def _apply_once(opt, grads_np, var):
    opt.apply([tensor(grads_np)], [var])
    return np.asarray(var.numpy())


def test_sum_and_custom_loop():
    """op=Sum in a tf.function custom loop: w = -lr * sum over ranks of g."""
    var = keras.Variable(np.zeros(5, np.float32))
    opt = nuqk.DistributedOptimizer(keras.optimizers.SGD(0.5), op=hvd.Sum)
    g = np.full(5, RANK + 1.0, np.float32)

    @graph
    def step(x):
        opt.apply_gradients([(x, var)])

    step(tensor(g))
    np.testing.assert_allclose(var.numpy(), -0.5 * np.full(5, N * (N + 1) / 2), rtol=1e-6)


@pytest.mark.parametrize("cls,protocol", CASES, ids=ids)
def test_every_compressor_one_step(cls, protocol):
    """Known per-rank gradients, one eager apply: identical weights on every rank, close to
    -lr * mean, one closed stats step with bytes below float32."""
    comp = cls(seed=5, protocol=protocol)
    d = 1200
    var = keras.Variable(np.zeros(d, np.float32))
    opt = nuqk.DistributedOptimizer(keras.optimizers.SGD(1.0), compression=comp)
    grads = [rank_gradient(r, d) for r in range(N)]
    w = _apply_once(opt, grads[RANK], var)
    want = -np.mean(grads, axis=0)
    assert all_same(w)
    scale = np.abs(want).max()
    assert np.abs(w - want).mean() < 0.15 * scale, (np.abs(w - want).mean(), scale)
    assert len(comp.stats.steps) == 1 and 0 < comp.stats.steps[0] < 4 * d


def _data(seed, n=128):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 10)).astype(np.float32)
    w = np.random.default_rng(7).standard_normal((10, 3)).astype(np.float32)
    return x, (x @ w).argmax(1)


def _model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(3)])


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.lrs, self.epoch_logs = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.lrs.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_logs.append(dict(logs))


@pytest.mark.parametrize("cls,protocol", [(None, None), (QSGDInfCompressor, "allgather")], ids=ids)
def test_fit_broadcast_average_and_learn(cls, protocol):
    """Differently initialised ranks, rank-dependent data: after fit with the callbacks every
    rank holds the same weights and optimizer state, the loss fell, and the logged metrics are
    the ranks' mean (so equal on all ranks)."""
    comp = cls(seed=1, protocol=protocol) if cls else None
    model = _model(seed=10 + RANK)
    assert not all_same(flat(model.variables)), "ranks must start different for this test"
    opt = nuqk.DistributedOptimizer(keras.optimizers.Adam(0.02), compression=comp)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    x, y = _data(100 + RANK)
    rec = _Recorder()
    hist = model.fit(x, y, batch_size=32, epochs=3, verbose=0, shuffle=False,
                     callbacks=[nuqk.callbacks.BroadcastGlobalVariablesCallback(0),
                                nuqk.callbacks.MetricAverageCallback(), rec])
    losses = hist.history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all_same(flat(model.variables)) and all_same(flat(opt.variables))
    assert all_same(np.array([losses, hist.history["accuracy"]]))
    assert rec.epoch_logs[-1]["loss"] == losses[-1]
    if comp is not None:
        # one closed step per applied step (graph mode, via the wrapper); the float32 bytes
        # replaced are exactly 4 per gradient element per step
        assert len(comp.stats.steps) == 3 * 4 and comp.stats.total_bytes > 0
        assert comp.stats.total_float32_bytes == 12 * 4 * sum(int(np.prod(v.shape))
                                                             for v in model.trainable_variables)


def test_metric_average_callback_means_rank_values():
    logs = {"loss": float(RANK + 1), "accuracy": 10.0 * RANK, "name": "text"}
    nuqk.callbacks.MetricAverageCallback().on_epoch_end(0, logs)
    assert logs["loss"] == pytest.approx((N + 1) / 2)
    assert logs["accuracy"] == pytest.approx(10.0 * (N - 1) / 2)
    assert logs["name"] == "text"


def test_broadcast_model_and_optimizer_state():
    model = _model(seed=20 + RANK)
    opt = keras.optimizers.Adam(0.01)
    opt.build(model.trainable_variables)
    for v in opt.variables:
        v.assign(keras.ops.ones_like(v) * (RANK + 3))
    cb = nuqk.callbacks.BroadcastGlobalVariablesCallback(0)
    model.compile(nuqk.DistributedOptimizer(opt), "mse")
    model.optimizer.build(model.trainable_variables)
    cb.set_model(model)
    cb.on_train_begin()
    assert cb.broadcast_done
    assert all_same(flat(model.variables)) and all_same(flat(model.optimizer.variables))
    assert float(opt.variables[0].numpy()) == 3.0  # rank 0's value everywhere


def test_learning_rate_warmup():
    """lr goes from base/N to base over the warm-up, per batch (Horovod's formula)."""
    model = _model(seed=0)
    base, steps = 0.08, 4
    model.compile(nuqk.DistributedOptimizer(keras.optimizers.SGD(base)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(5, n=32 * steps)
    rec = _Recorder()
    model.fit(x, y, batch_size=32, epochs=3, verbose=0,
              callbacks=[nuqk.callbacks.LearningRateWarmupCallback(base, warmup_epochs=2), rec])
    want = [base / N * ((e + b / steps) * (N - 1) / 2 + 1) for e in range(2) for b in range(steps)]
    np.testing.assert_allclose(rec.lrs[:2 * steps], want, rtol=1e-5)
    np.testing.assert_allclose(rec.lrs[2 * steps:], base, rtol=1e-6)


def test_backward_passes_per_step():
    var = keras.Variable(np.zeros(4, np.float32))
    sgd = keras.optimizers.SGD(0.1)
    opt = nuqk.DistributedOptimizer(sgd, backward_passes_per_step=2, compression=NUQCompressor(seed=2))
    g1, g2 = np.full(4, RANK + 1.0, np.float32), np.full(4, 2.0 * (RANK + 1), np.float32)

    @graph
    def step(x):
        opt.apply([x], [var])

    step(tensor(g1))
    np.testing.assert_array_equal(var.numpy(), 0.0)
    step(tensor(g2))
    np.testing.assert_allclose(var.numpy(), -0.1 * 3 * np.mean(np.arange(1, N + 1)), rtol=1e-5)
    assert int(sgd.iterations.numpy()) == 1 and len(opt.compression.stats.steps) == 1


@pytest.fixture
def mixed_policy():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@tf_only
@pytest.mark.parametrize("cls", [NUQCompressor], ids=ids)
def test_mixed_precision_fit(mixed_policy, cls):
    """LossScaleOptimizer inside the wrapper: compile keeps it (no second wrapper), the still
    scaled gradients are reduced, and training works."""
    comp = cls(seed=3) if cls else None
    model = _model(seed=0)
    opt = nuqk.DistributedOptimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
                                    compression=comp)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert model.optimizer is opt and isinstance(opt, keras.optimizers.LossScaleOptimizer)
    x, y = _data(300 + RANK)
    hist = model.fit(x, y, batch_size=32, epochs=3, verbose=0,
                     callbacks=[nuqk.callbacks.BroadcastGlobalVariablesCallback(0)])
    assert hist.history["loss"][-1] < 0.85 * hist.history["loss"][0], hist.history["loss"]
    assert all_same(flat(model.variables))


def test_mixed_precision_loss_scale_outside_is_refused(mixed_policy):
    model = _model(seed=0)
    with pytest.raises(ValueError, match="LossScaleOptimizer"):
        model.compile(nuqk.DistributedOptimizer(keras.optimizers.SGD(0.1)), "mse")


@pytest.mark.parametrize("compression", [None, "nuq", "qsgd-allgather"])
def test_non_finite_on_one_rank_skips_everywhere(compression):
    """Rank 1 alone has an inf: every rank skips the step and halves the loss scale; the next,
    finite step applies the average of the unscaled gradients."""
    comp = {"nuq": NUQCompressor(seed=1),
            "qsgd-allgather": QSGDCompressor(seed=1, protocol="allgather")}.get(compression)
    var = keras.Variable(np.zeros(8, np.float32))
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=4.0)
    opt = nuqk.DistributedOptimizer(lso, compression=comp)

    @graph
    def step(x):
        opt.apply([x], [var])

    bad = np.full(8, 4.0, np.float32)
    if RANK == 1 % N:
        bad[3] = np.inf
    step(tensor(bad))
    np.testing.assert_array_equal(var.numpy(), 0.0)
    assert float(lso.dynamic_scale.numpy()) == 2.0
    step(tensor(np.full(8, 2.0 * (RANK + 1), np.float32)))  # scaled by 2: unscaled rank+1
    want = -np.mean(np.arange(1, N + 1))
    if comp is None:
        np.testing.assert_allclose(var.numpy(), want, rtol=1e-5)
    else:  # quantized: the same on every rank, near the mean (4-bit rounding of 8 entries)
        assert all_same(var.numpy()) and abs(var.numpy().mean() - want) < 0.5 * abs(want)


def test_tf_keras_never_imported():
    assert "tf_keras" not in sys.modules


def test_error_feedback_keyed_by_variable_path():
    """Keras 3 wrapper with error feedback: sum of applied updates + mean residual = the
    ranks' mean summed gradient, over eager applies."""
    comp = TNQCompressor(bits=2, seed=3, protocol="allgather", error_feedback=True)
    d = 700
    var = keras.Variable(np.zeros(d, np.float32), name="ef_kernel")
    opt = nuqk.DistributedOptimizer(keras.optimizers.SGD(1.0), compression=comp)
    rng = np.random.default_rng(RANK)
    total = np.zeros(d)
    for _ in range(6):
        g = rng.standard_normal(d).astype(np.float32)
        g[::7] *= 10
        total += g
        _apply_once(opt, g, var)
    assert list(comp.memory.state_dict()) == [var.path]
    e = np.asarray(comp.memory.state_dict()[var.path], np.float64)
    mean_total, mean_e = gather_all(total).mean(axis=0), gather_all(e).mean(axis=0)
    np.testing.assert_allclose(-np.asarray(var.numpy(), np.float64) + mean_e, mean_total,
                               rtol=0, atol=1e-4 * np.abs(mean_total).max())
