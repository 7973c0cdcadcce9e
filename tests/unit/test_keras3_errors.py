"""horovod_nuq.keras refuses bad setups with a clear error (single process, no collectives)."""
import os

import pytest

keras = pytest.importorskip("keras")
if not keras.__version__.startswith("3") or keras.backend.backend() != "tensorflow":
    pytest.skip("needs Keras 3 on the TensorFlow backend", allow_module_level=True)
pytest.importorskip("horovod.tensorflow")

import horovod.tensorflow as hvd

import horovod_nuq.keras as nuqk
from horovod_nuq import NUQCompressor
from horovod_nuq.keras import _hvd


def test_tf_keras_optimizer_points_to_horovod_keras():
    tf_keras = pytest.importorskip("tf_keras")
    with pytest.raises(TypeError, match=r"Keras 2 \(tf_keras\).*horovod\.tensorflow\.keras"):
        nuqk.DistributedOptimizer(tf_keras.optimizers.SGD(0.1))


def test_non_keras_optimizer_is_refused():
    torch = pytest.importorskip("torch")
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="Keras 3 optimizer"):
        nuqk.DistributedOptimizer(torch.optim.SGD(params, lr=0.1))


@pytest.mark.parametrize("backend", ["jax", "numpy", "openvino"])
def test_unsupported_backend(monkeypatch, backend):
    monkeypatch.setattr(keras.backend, "backend", lambda: backend)
    with pytest.raises(ValueError, match=f"Keras runs on '{backend}'.*KERAS_BACKEND"):
        nuqk.DistributedOptimizer(keras.optimizers.SGD(0.1))


def test_keras2_is_refused(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "2.15.0")
    with pytest.raises(ImportError, match="needs Keras 3.*horovod.tensorflow.keras"):
        _hvd.check_keras3()


def test_bad_arguments():
    opt = nuqk.DistributedOptimizer(keras.optimizers.SGD(0.1), compression=NUQCompressor())
    with pytest.raises(TypeError, match="already"):
        nuqk.DistributedOptimizer(opt)
    with pytest.raises(ValueError, match="Adasum"):
        nuqk.DistributedOptimizer(keras.optimizers.SGD(0.1), op=hvd.Adasum)
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        nuqk.DistributedOptimizer(keras.optimizers.SGD(0.1), backward_passes_per_step=0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        nuqk.DistributedOptimizer(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2))


def test_wrapper_forwards_learning_rate_and_state():
    sgd = keras.optimizers.SGD(0.1, momentum=0.9)
    opt = nuqk.DistributedOptimizer(sgd)
    opt.learning_rate = 0.25
    assert float(sgd.learning_rate.numpy()) == pytest.approx(0.25)
    v = keras.Variable([1.0, 2.0])
    opt.build([v])
    assert sgd.built and all(any(w is x for x in opt.variables) for w in sgd.variables)
    assert opt.iterations is sgd.iterations


def test_loss_scale_optimizer_outside_the_wrapper_is_refused():
    """model.compile wraps a LossScaleOptimizer around the optimizer under mixed_float16; around
    this wrapper that would check finiteness before the reduction (ranks could diverge)."""
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        with pytest.raises(ValueError, match=r"DistributedOptimizer\(keras.optimizers.LossScaleOptimizer"):
            model.compile(nuqk.DistributedOptimizer(keras.optimizers.SGD(0.1)), "mse")
        lso = nuqk.DistributedOptimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)))
        model.compile(lso, "mse")
        assert model.optimizer is lso
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_no_legacy_keras_switch_in_the_package():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "horovod_nuq", "keras")
    for name in os.listdir(root):
        if name.endswith(".py"):
            with open(os.path.join(root, name)) as f:
                text = f.read()
            assert "environ" not in text and "import tf_keras" not in text, name
