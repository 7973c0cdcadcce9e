"""Data-parallel MLP on sklearn's digits with Keras 3 + horovod_nuq.keras gradient quantization.

    mpirun -np 2 python examples/keras3_digits.py --compression nuq
    horovodrun -np 2 -H localhost:2 python examples/keras3_digits.py --compression nuq
    mpirun -np 2 python examples/keras3_digits.py --compression qsgd --protocol allgather
    mpirun -np 2 python examples/keras3_digits.py --compression nuq --synthetic   # img/sec

Plain Keras 3 (`import keras`; no tf_keras, TF_USE_LEGACY_KERAS is removed here): model.fit
with horovod_nuq.keras.DistributedOptimizer (either protocol) and horovod_nuq.keras.callbacks
(broadcast from rank 0, metric averaging). --checkpoint PATH: rank 0 alone writes the weights
after every epoch. KERAS_BACKEND=torch runs the same script over horovod.torch.
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ.pop("TF_USE_LEGACY_KERAS", None)  # this example needs no tf_keras
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

import horovod_nuq.keras as nuq_keras

BACKEND = keras.backend.backend()
hvd = importlib.import_module({"torch": "horovod.torch"}.get(BACKEND, "horovod.tensorflow"))


def digits_model() -> keras.Model:
    return keras.Sequential([keras.Input((64,)),
                             keras.layers.Dense(256, activation="relu"),
                             keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(10)])


def synthetic_model() -> keras.Model:
    # ~9.4M parameters: 3x32x32 input -> 2048 -> 1024 -> 1000 classes
    return keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                             keras.layers.Dense(2048, activation="relu"),
                             keras.layers.Dense(1024, activation="relu"),
                             keras.layers.Dense(1000)])


def compile_model(model: keras.Model, lr: float, momentum: float, compression) -> None:
    opt = nuq_keras.DistributedOptimizer(keras.optimizers.SGD(learning_rate=lr, momentum=momentum),
                                         compression=compression)
    # jit_compile=False: Horovod's collectives are not XLA ops ("auto" turns XLA on with a GPU)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)


def grad_numel(model: keras.Model) -> int:
    return int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))


def allreduce_sum(values: list[float]) -> np.ndarray:
    """Sum a few floats over the ranks (evaluation counts), on the backend's Horovod."""
    x = np.asarray(values, np.float64)
    if BACKEND == "torch":
        import torch

        return hvd.allreduce(torch.from_numpy(x), op=hvd.Sum, name="eval_counts").numpy()
    import tensorflow as tf

    return hvd.allreduce(tf.constant(x), op=hvd.Sum, name="eval_counts").numpy()


class Progress(keras.callbacks.Callback):
    """Per-step loss and bytes, per-epoch test accuracy and the summary (printed by rank 0).

    Keras reports, after batch b, the sample-weighted running mean of the epoch's loss; the
    batch's own loss is recovered from consecutive running means. That is this rank's loss
    (MetricAverageCallback averages over ranks only at epoch end).
    """

    def __init__(self, args, meter, rep, n_train, Xte, yte) -> None:
        super().__init__()
        self.args, self.meter, self.rep = args, meter, rep
        self.n_train, self.Xte, self.yte = n_train, Xte, yte
        self.step = 0
        self.final_acc = float("nan")

    def on_epoch_begin(self, epoch, logs=None):
        self.seen, self.prev_sum = 0, 0.0

    def on_train_batch_end(self, batch, logs=None):
        self.meter.step()
        self.step += 1
        bs = min(self.args.batch_size, self.n_train - batch * self.args.batch_size)
        self.seen += bs
        running_sum = float(logs["loss"]) * self.seen
        loss = (running_sum - self.prev_sum) / bs
        self.prev_sum = running_sum
        self.rep.step(self.step, len(self.rep.log["epochs"]) + 1, loss, self.meter)

    def test_accuracy(self) -> float:
        correct = 0.0
        if len(self.Xte):
            logits = self.model.predict(self.Xte, verbose=0, batch_size=512)
            correct = float(np.sum(np.argmax(logits, 1) == self.yte))
        counts = allreduce_sum([correct, float(len(self.Xte))])
        return float(counts[0] / counts[1])

    def on_epoch_end(self, epoch, logs=None):
        # logs["loss"] is already averaged over ranks by MetricAverageCallback (listed before us)
        self.final_acc = self.test_accuracy()
        self.rep.epoch(epoch + 1, float(logs["loss"]), self.final_acc, self.meter)


def train(args) -> None:
    rank, size = hvd.rank(), hvd.size()
    Xtr, ytr, Xte, yte, n_steps = common.rank_data(rank, size, args.batch_size)

    model = digits_model()
    compression = common.make_compression(args, hvd, names_gradients=True)
    compile_model(model, args.lr * size, 0.9, compression)
    desc = common.describe_compression(args, compression)
    meter = common.ByteMeter(args.compression, compression, grad_numel(model))
    rep = common.Reporter(args, "keras3", rank, size, desc, grad_numel(model), n_steps)
    progress = Progress(args, meter, rep, len(Xtr), Xte, yte)
    callbacks = [nuq_keras.callbacks.BroadcastGlobalVariablesCallback(0),
                 nuq_keras.callbacks.MetricAverageCallback(),
                 progress]
    if args.checkpoint and rank == 0:  # one writer: the other ranks hold the same weights
        callbacks.append(keras.callbacks.ModelCheckpoint(args.checkpoint, save_weights_only=True))
    # Per-epoch shuffling with a seeded generator: same batches per rank as the other examples.
    import tensorflow as tf

    ds = (tf.data.Dataset.from_tensor_slices((Xtr, ytr))
          .shuffle(len(Xtr), seed=args.seed + rank, reshuffle_each_iteration=True)
          .batch(args.batch_size))
    model.fit(ds, epochs=args.epochs, steps_per_epoch=n_steps, callbacks=callbacks, verbose=0)
    rep.summary(progress.final_acc, meter, compressor=desc)


class Throughput(keras.callbacks.Callback):
    def __init__(self, meter) -> None:
        super().__init__()
        self.meter = meter

    def on_train_batch_end(self, batch, logs=None):
        self.meter.step()


def synthetic(args) -> None:
    rank, size = hvd.rank(), hvd.size()
    model = synthetic_model()
    compression = common.make_compression(args, hvd, names_gradients=True)
    compile_model(model, 0.01 * size, 0.0, compression)
    bs = args.synthetic_batch_size
    rng = np.random.default_rng([args.seed, rank])
    x = rng.standard_normal((bs, 32, 32, 3), np.float32)
    y = rng.integers(0, 1000, bs)
    meter = common.ByteMeter(args.compression, compression, grad_numel(model))
    # model.fit once to build and broadcast; then time model.train_on_batch steps
    model.fit(x, y, batch_size=bs, epochs=1, verbose=0,
              callbacks=[nuq_keras.callbacks.BroadcastGlobalVariablesCallback(0), Throughput(meter)])
    common.run_throughput(args, lambda: model.train_on_batch(x, y), meter, rank, size,
                          f"MLP 3072-2048-1024-1000 ({grad_numel(model) / 1e6:.1f}M params)",
                          common.describe_compression(args, compression), "keras3")


def main() -> None:
    parser = common.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", metavar="PATH", default=None,
                        help="rank 0 writes the weights here after every epoch (ends in .weights.h5)")
    args = common.parse_args(parser)
    if args.checkpoint and not args.checkpoint.endswith(".weights.h5"):
        parser.error("--checkpoint: Keras 3 wants weight files named *.weights.h5")
    hvd.init()
    keras.utils.set_random_seed(args.seed)
    (synthetic if args.synthetic else train)(args)


if __name__ == "__main__":
    main()
