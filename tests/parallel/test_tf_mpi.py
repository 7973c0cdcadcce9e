"""TensorFlow under real Horovod collectives: hvd.allreduce (eager and tf.function),
DistributedGradientTape (both protocols) and tf_keras's DistributedOptimizer."""
import os

import numpy as np
import pytest

os.environ["TF_USE_LEGACY_KERAS"] = "1"
tf = pytest.importorskip("tensorflow")
import horovod.tensorflow as hvd
from harness import (
    assert_hsq_average,
    check_near,
    check_unbiased,
    check_variance,
    digest,
    exact_variance_of_average,
    rank_gradient,
    run_rounds,
)

import horovod_nuq.tensorflow as nuq

hvd.init()
N, RANK = hvd.size(), hvd.rank()
D, ROUNDS = 2000, 100
ALL = [nuq.QSGDCompressor, nuq.QSGDInfCompressor, nuq.NUQCompressor, nuq.TNQCompressor,
       nuq.GlobalQSGDCompressor]


def all_same(x) -> bool:
    d = digest(np.asarray(x))
    gathered = hvd.allgather(tf.constant(d[None, :])).numpy()
    return bool((gathered == gathered[0]).all())


def reducer(comp, g, op=hvd.Average):
    if comp.protocol == "allreduce":
        return lambda: hvd.allreduce(g, compression=comp, op=op).numpy()

    def gather():
        payload, ctx = comp.compress_for_allgather(g)
        return comp.decompress_gathered(hvd.allgather(payload), ctx, op == hvd.Average).numpy()
    return gather


ENGINES = {"fused": None, "generic": False}  # host tensors' default, and what GPUs use


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES.keys())
@pytest.mark.parametrize("cls,protocol", [(nuq.NUQCompressor, "allreduce"),
                                          (nuq.QSGDCompressor, "allgather"),
                                          (nuq.GlobalQSGDCompressor, "allreduce")],
                         ids=lambda x: getattr(x, "__name__", x))
def test_unbiased_and_variance_across_ranks(cls, protocol, engine):
    comp = cls(seed=3, protocol=protocol, fused=engine)
    grads = [rank_gradient(r, D) for r in range(N)]
    true = np.mean(grads, axis=0, dtype=np.float64)
    var = exact_variance_of_average(grads, comp.scheme, shared=protocol == "allreduce")
    mean, outs = run_rounds(reducer(comp, tf.constant(grads[RANK])), ROUNDS)
    check_unbiased(mean, true, var, ROUNDS)
    check_variance(outs, true, var)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_allreduce_inside_tf_function_agrees(cls):
    comp = cls(seed=2)
    g = tf.constant(rank_gradient(RANK, 1500))

    @tf.function
    def step(x):
        return hvd.allreduce(x, compression=comp)

    out = step(g).numpy()
    want = np.mean([rank_gradient(r, 1500) for r in range(N)], axis=0)
    assert out.shape == want.shape and np.isfinite(out).all()
    assert all_same(out)
    if cls is not nuq.TNQCompressor:  # unbiased: near the exact average
        grads = [rank_gradient(r, 1500) for r in range(N)]
        check_near(out, want, exact_variance_of_average(grads, comp.scheme, comp.protocol_for(N) == "allreduce"))
    step(g)
    assert comp.stats.tensors == 2, "graph-mode byte counters must advance per run"


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES.keys())
@pytest.mark.parametrize("op", [hvd.Average, hvd.Sum], ids=["average", "sum"])
@pytest.mark.parametrize("cls,protocol", [(nuq.NUQCompressor, "allgather"), (nuq.QSGDInfCompressor, "allreduce")],
                         ids=lambda x: getattr(x, "__name__", x))
def test_graph_values_equal_eager(cls, protocol, op, engine):
    """Inside tf.function (Horovod's tf.cond path included) the reduction decodes to what the
    eager one does: with the fused kernels the same draws give bit-equal results (up to the
    op's factor); the generic engine draws differently in graphs, so it is held to the
    exact expectation within its rounding noise instead."""
    g = tf.constant(rank_gradient(RANK, 1500))
    graph = cls(seed=6, protocol=protocol, fused=engine)
    out = tf.function(lambda x: hvd.allreduce(x, compression=graph, op=op))(g).numpy().astype(np.float64)
    eager = hvd.allreduce(g, compression=cls(seed=6, protocol=protocol, fused=engine), op=op)
    eager = eager.numpy().astype(np.float64)
    grads = [rank_gradient(r, 1500) for r in range(N)]
    scale = N if op == hvd.Sum else 1
    want = np.mean(grads, axis=0) * scale
    if engine is None:
        np.testing.assert_allclose(out, eager, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    var = exact_variance_of_average(grads, graph.scheme, protocol == "allreduce") * scale**2
    check_near(out, want, var, "graph")
    check_near(eager, want, var, "eager")


def test_horovod_benchmark_step_retraced_with_python_argument():
    """The shape of Horovod's own examples/tensorflow2/tensorflow2_synthetic_benchmark.py: a
    tf.function taking a Python bool (traced twice), Horovod's DistributedGradientTape with
    the compressor made inside it (a new one per trace, through hvd.Compression.<name>),
    Horovod's tf.cond around each allreduce, broadcast after the first step."""
    import horovod_nuq  # noqa: F401  (registers hvd.Compression.nuq)

    model = _model()
    model(tf.zeros((1, 10)))
    opt = tf.keras.optimizers.SGD(0.1)
    x, y = _data(300 + RANK)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    used = []

    @tf.function
    def step(first_batch):
        compression = hvd.Compression.nuq
        used.append(compression)
        with tf.GradientTape() as tape:
            loss = loss_fn(y[:64], model(x[:64]))
        tape = hvd.DistributedGradientTape(tape, compression=compression)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        if first_batch:
            hvd.broadcast_variables(model.variables, root_rank=0)
            hvd.broadcast_variables(opt.variables(), root_rank=0)
        return loss

    losses = [float(step(True))] + [float(step(False)) for _ in range(20)]
    same = all_same(np.concatenate([v.numpy().ravel() for v in model.variables]))  # collective first
    # traced at least twice (the Python argument; TF may add a trace that creates the
    # optimizer's variables), a new compressor each time
    assert step.experimental_get_tracing_count() >= 2 and len(used) == step.experimental_get_tracing_count()
    assert len({id(c) for c in used}) == len(used)
    assert same
    assert losses[-1] < 0.9 * losses[1], losses
    n_grads = len(model.trainable_variables)  # bytes are counted per run of the graph, not per trace
    assert used[-1].stats.tensors == 20 * n_grads and sum(c.stats.tensors for c in used) == 21 * n_grads


def test_sum_and_predivide():
    comp = nuq.QSGDInfCompressor(bits=8)
    g = tf.constant(rank_gradient(RANK, 1024))
    total = np.sum([rank_gradient(r, 1024) for r in range(N)], axis=0)
    out = hvd.allreduce(g, compression=comp, op=hvd.Sum).numpy()
    assert np.abs(out - total).max() < 0.1 * np.abs(total).max()
    out = hvd.allreduce(g, compression=comp, op=hvd.Average, prescale_factor=0.25,
                        postscale_factor=4.0).numpy()
    assert np.abs(out - total / N).max() < 0.1 * np.abs(total / N).max()


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
def test_dtypes_preserved(dtype):
    g = tf.cast(tf.constant(rank_gradient(RANK, 777)), dtype)
    out = hvd.allreduce(g, compression=nuq.NUQCompressor())
    assert out.dtype == dtype and out.shape == g.shape


def _model():
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential([tf.keras.layers.Dense(16, activation="relu", input_shape=(10,)),
                                tf.keras.layers.Dense(3)])


def _data(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, 10)).astype(np.float32)
    w = np.random.default_rng(7).standard_normal((10, 3)).astype(np.float32)
    return x, (x @ w).argmax(1)


@pytest.mark.parametrize("cls,protocol", [(nuq.NUQCompressor, "allreduce"),
                                          (nuq.TNQCompressor, "allreduce"),
                                          (nuq.QSGDInfCompressor, "allgather"),
                                          (nuq.NUQCompressor, "allgather"),
                                          (nuq.NUQCompressor, "auto")],
                         ids=lambda x: getattr(x, "__name__", x))
def test_gradient_tape_training(cls, protocol):
    comp = cls(seed=1, protocol=protocol)
    model = _model()
    model(tf.zeros((1, 10)))
    opt = tf.keras.optimizers.SGD(0.1)
    hvd.broadcast_variables(model.variables, root_rank=0)
    x, y = _data(100 + RANK)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb))
        tape = nuq.DistributedGradientTape(tape, compression=comp)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    losses = [float(step(x[i:i + 64], y[i:i + 64])) for _ in range(6) for i in range(0, 256, 64)]
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    assert all_same(np.concatenate([v.numpy().ravel() for v in model.variables]))


def test_tf_keras_distributed_optimizer():
    import horovod.tensorflow.keras as hvdk
    comp = nuq.NUQCompressor(seed=4)
    model = _model()
    opt = hvdk.DistributedOptimizer(tf.keras.optimizers.SGD(0.1), compression=comp)
    model.compile(opt, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(200 + RANK)
    hist = model.fit(x, y, batch_size=32, epochs=4, verbose=0,
                     callbacks=[hvdk.callbacks.BroadcastGlobalVariablesCallback(0),
                                hvdk.callbacks.MetricAverageCallback()])  # needs setup.sh's patch (e)
    assert hist.history["loss"][-1] < 0.8 * hist.history["loss"][0]
    assert all_same(np.concatenate([v.numpy().ravel() for v in model.variables]))
    assert comp.stats.total_bytes > 0


def test_registered_with_horovod():
    for name in ("qsgd", "qsgdinf", "nuq", "tnq", "globalqsgd"):
        out = hvd.allreduce(tf.ones(6000), compression=getattr(hvd.Compression, name))
        assert abs(float(tf.reduce_mean(out)) - 1.0) < 0.1, name


def _rank_inputs(rank):
    return (np.random.default_rng(50 + rank).standard_normal((1, 10)) * (1 + rank)).astype(np.float32)


TAPE_OPTIONS = {"average": {}, "sum": {"op": hvd.Sum}, "predivide": {"gradient_predivide_factor": 2.0}}


@pytest.mark.parametrize("protocol", ["allreduce", "allgather"])
@pytest.mark.parametrize("options", TAPE_OPTIONS.values(), ids=TAPE_OPTIONS.keys())
@pytest.mark.parametrize("tape_cls", ["stock", "nuq"])
def test_tape_reduces_to_the_expected_values(tape_cls, options, protocol):
    """One tape.gradient with known per-rank gradients, inside tf.function: the ranks'
    average (or sum), within 8-bit rounding, through Horovod's tape and horovod_nuq's."""
    factory = hvd.DistributedGradientTape if tape_cls == "stock" else nuq.DistributedGradientTape
    layer = tf.keras.layers.Dense(3)
    layer.build((None, 10))
    comp = nuq.QSGDInfCompressor(bits=8, seed=RANK, protocol=protocol)
    x = tf.constant(_rank_inputs(RANK))

    @tf.function
    def grads():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x))
        return factory(tape, compression=comp, **options).gradient(loss, layer.trainable_variables)

    kernel, bias = (g.numpy() for g in grads())
    factor = 1.0 if options.get("op") == hvd.Sum else 1.0 / N
    xs = np.concatenate([_rank_inputs(r) for r in range(N)])
    want_kernel = np.repeat(xs.sum(0)[:, None], 3, axis=1) * factor
    assert np.abs(kernel - want_kernel).max() <= 0.03 * np.abs(want_kernel).max()
    np.testing.assert_allclose(bias, np.full(3, N * factor), rtol=0.03)
    assert all_same(kernel)


def test_tape_allgather_with_indexed_slices():
    """Embedding gradients arrive as tf.IndexedSlices; the allgather tape reduces them dense."""
    emb = tf.keras.layers.Embedding(20, 4)
    emb.build((None,))
    comp = nuq.QSGDInfCompressor(bits=8, protocol="allgather")
    ids = tf.constant(np.random.default_rng(RANK).integers(0, 20, 12))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(emb(ids))
    grad = nuq.DistributedGradientTape(tape, compression=comp).gradient(loss, emb.trainable_variables)[0]
    want = np.mean([np.bincount(np.random.default_rng(r).integers(0, 20, 12), minlength=20) for r in range(N)],
                   axis=0)[:, None] * np.ones(4)
    got = tf.convert_to_tensor(grad).numpy()
    assert np.abs(got - want).max() <= 0.03 * want.max()


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("protocol", ["allgather", "allreduce"])
def test_tape_error_feedback_sends_every_gradient(protocol, graph):
    """Over T steps: sum of the reduced gradients + the ranks' mean residual = the ranks'
    mean summed gradient; residuals are keyed by variable name and persist across graph runs."""
    comp = nuq.TNQCompressor(bits=2, seed=4, protocol=protocol, error_feedback=True) \
        if protocol == "allgather" else nuq.QSGDCompressor(bits=2, seed=4, protocol=protocol,
                                                           error_feedback=True)
    w = tf.Variable(tf.random.stateless_normal([30, 6], [1, 2]), name="ef_w")
    b = tf.Variable(tf.zeros([6]), name="ef_b")

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.tanh(x @ w + b)))
        local = tape.gradient(loss, [w, b])
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.tanh(x @ w + b)))
        reduced = nuq.DistributedGradientTape(tape, compression=comp).gradient(loss, [w, b])
        return local, reduced

    step = tf.function(step) if graph else step
    rng = np.random.default_rng(100 + RANK)
    true = [np.zeros(v.shape, np.float64) for v in (w, b)]
    sent = [np.zeros(v.shape, np.float64) for v in (w, b)]
    for _ in range(5):
        local, reduced = step(tf.constant(rng.standard_normal((16, 30)), tf.float32))
        for i in range(2):
            true[i] += local[i].numpy()
            sent[i] += reduced[i].numpy()
    assert sorted(comp.memory.state_dict()) == ["ef_b", "ef_w"]
    for i, v in enumerate((w, b)):
        e = comp.memory.residual(v.name.split(":")[0]).numpy().astype(np.float64)
        lhs = sent[i] + hvd.allreduce(tf.constant(e), op=hvd.Average, name=f"ef_e{i}").numpy()
        rhs = hvd.allreduce(tf.constant(true[i]), op=hvd.Average, name=f"ef_g{i}").numpy()
        np.testing.assert_allclose(lhs, rhs, rtol=0, atol=1e-5 * np.abs(rhs).max() + 1e-6)
        assert np.abs(sent[i] - rhs).max() > 1e-3 * np.abs(rhs).max()


def test_stock_tape_error_feedback_is_refused_clearly():
    """Horovod's own TF tape names no gradient, so it cannot key residuals: a clear error."""
    comp = nuq.TNQCompressor(bits=2, error_feedback=True)
    v = tf.Variable(tf.ones([50]))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(v * v)
    with pytest.raises(ValueError, match="horovod_nuq.tensorflow.DistributedGradientTape"):
        hvd.DistributedGradientTape(tape, compression=comp).gradient(loss, [v])


@pytest.mark.parametrize("tape_cls,op,graph,scalar_bits", [
    ("stock", hvd.Average, False, 6), ("stock", hvd.Sum, True, 6), ("nuq", hvd.Sum, False, 6),
    ("nuq", hvd.Average, True, 6), ("stock", hvd.Sum, False, 32), ("nuq", hvd.Average, True, 32)],
    ids=["stock-average-eager", "stock-sum-tf_function", "nuq-sum-eager", "nuq-average-tf_function",
         "stock-sum-eager-float32", "nuq-average-tf_function-float32"])
def test_hsq_tape_decodes_the_ranks_oracle_average(tape_cls, op, graph, scalar_bits):
    """HSQ through Horovod's tape (sentinel + gather) and horovod_nuq's (allgather), eager
    and in tf.function, with the default 6-bit scalars and float32 ones: every rank holds the
    average (or sum) of the ranks' oracle reconstructions (to within the scalars' rounding)."""
    factory = hvd.DistributedGradientTape if tape_cls == "stock" else nuq.DistributedGradientTape
    w = tf.Variable(tf.zeros([37, 29]))  # 1073 elements: a zero-padded tail chunk
    comp = nuq.HSQCompressor(scalar_bits=scalar_bits)
    grads = [rank_gradient(r, 37 * 29) for r in range(N)]
    g = tf.constant(grads[RANK].reshape(37, 29))

    def gradient():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(w * g)
        return factory(tape, compression=comp, op=op).gradient(loss, [w])[0]

    got = (tf.function(gradient) if graph else gradient)().numpy().reshape(-1).astype(np.float64)
    assert_hsq_average(got, grads, comp.scheme, 1.0 if op == hvd.Sum else 1.0 / N)
    assert all_same(got)


# ---- QSGD's Elias encoding: per-rank payload lengths, eager and inside tf.function --------
def _elias_pair():
    """Elias-coded and fixed-width QSGD with one seed: the same draws, so the same codes."""
    return (nuq.QSGDCompressor(levels=2, bucket_size=256, seed=21, encoding="elias"),
            nuq.QSGDCompressor(levels=2, bucket_size=256, seed=21, protocol="allgather"))


def _same_bits(a, b) -> bool:
    return np.array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_elias_allreduce_decodes_like_fixed(mode):
    """Horovod's allreduce(compression=) (sentinel + gather; in graphs the payload's length
    is known only at run time): every rank decodes the same tensor, bit for bit the
    fixed-width decode of the same draws, for two calls (fresh draws each)."""
    g = tf.constant(rank_gradient(RANK, 3000))
    outs = {}
    for comp in _elias_pair():
        fn = lambda x, c=comp: hvd.allreduce(x, compression=c)
        fn = tf.function(fn) if mode == "tf.function" else fn
        outs[comp.encoding] = [fn(g).numpy() for _ in range(2)]
        assert comp.stats.total_bytes > 0
    for got, want in zip(outs["elias"], outs["fixed"]):
        assert _same_bits(got, want) and all_same(got)
    assert not _same_bits(outs["elias"][0], outs["elias"][1])  # fresh draws per call


@pytest.mark.parametrize("tape_cls", ["stock", "nuq"])
def test_elias_tape_decodes_like_fixed(tape_cls):
    """Horovod's DistributedGradientTape (sentinel + gather) and horovod_nuq's (a direct
    allgather of payloads of per-rank lengths) inside one tf.function: every rank gets the
    same gradient, bit for bit the fixed-width code's for the same draws, on two runs (fresh
    draws each); the Elias payloads are the smaller. (One gradient per tape, so each
    compressor draws its keys in one order whatever order the graph runs its ops in.)"""
    factory = hvd.DistributedGradientTape if tape_cls == "stock" else nuq.DistributedGradientTape
    layer = tf.keras.layers.Dense(64, use_bias=False)
    layer.build((None, 40))
    coded, fixed = _elias_pair()
    x = tf.constant(np.random.default_rng(60 + RANK).standard_normal((8, 40)).astype(np.float32) * (1 + RANK))

    @tf.function
    def grads():
        out = []
        for comp in (coded, fixed):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(layer(x)))
            out.append(factory(tape, compression=comp).gradient(loss, layer.trainable_variables)[0])
        return out

    runs = [[g.numpy() for g in grads()] for _ in range(2)]
    for got, want in runs:
        assert _same_bits(got, want) and all_same(got)
    assert not _same_bits(runs[0][0], runs[1][0])
    assert 0 < coded.stats.total_bytes < fixed.stats.total_bytes
