"""Data-parallel MLP on sklearn's digits with Horovod's Keras API + horovod_nuq quantization.

    horovodrun -np 2 -H localhost:2 python examples/keras_digits.py --compression nuq
    mpirun -np 2 python examples/keras_digits.py --compression qsgdinf
    mpirun -np 2 python examples/keras_digits.py --compression nuq --synthetic   # img/sec

Uses tf_keras (Keras 2; Horovod's Keras integration does not support Keras 3) with
horovod.tensorflow.keras.DistributedOptimizer(compression=...) and Horovod's callbacks; the
compressor carries either protocol through Horovod's optimizer.
"""
from __future__ import annotations

import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported: tf.keras -> tf_keras
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
import tf_keras as keras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import horovod.tensorflow as hvd_tf
import horovod.tensorflow.keras as hvd

import horovod_nuq.tensorflow  # noqa: F401  (the quantizers' TF frontend, loaded before Keras traces)

# Horovod 0.28.1 picks its Keras backend with `from keras import backend as K`, which is Keras 3
# when Keras 3 is installed next to tf_keras (as with TensorFlow >= 2.16), and its callbacks
# then fail (e.g. MetricAverageCallback: "module 'keras.backend' has no attribute 'constant'").
# Point Horovod at tf_keras' backend, the Keras its DistributedOptimizer is wrapping here.
# (scripts/setup.sh patches this in the Horovod it builds; this guard covers other installs.)
for _mod in (hvd, hvd.callbacks):
    if not hasattr(getattr(_mod, "K", keras.backend), "constant"):
        _mod.K = keras.backend


def digits_model() -> keras.Model:
    return keras.Sequential([keras.layers.Dense(256, activation="relu", input_shape=(64,)),
                             keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(10)])


def synthetic_model() -> keras.Model:
    # ~9.4M parameters: 3x32x32 input -> 2048 -> 1024 -> 1000 classes
    return keras.Sequential([keras.layers.Flatten(input_shape=(32, 32, 3)),
                             keras.layers.Dense(2048, activation="relu"),
                             keras.layers.Dense(1024, activation="relu"),
                             keras.layers.Dense(1000)])


def compile_model(model: keras.Model, lr: float, momentum: float, compression) -> None:
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(learning_rate=lr, momentum=momentum),
                                   compression=compression)
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])


def grad_numel(model: keras.Model) -> int:
    return int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))


class Progress(keras.callbacks.Callback):
    """Per-step loss and bytes, per-epoch test accuracy and the summary (printed by rank 0).

    Keras reports, after batch b, the sample-weighted running mean of the epoch's loss; the
    batch's own loss is recovered from consecutive running means. That is this rank's loss
    (Horovod's MetricAverageCallback averages over ranks only at epoch end).
    """

    def __init__(self, args, meter, rep, n_train, Xte, yte) -> None:
        super().__init__()
        self.args, self.meter, self.rep = args, meter, rep
        self.n_train, self.Xte, self.yte = n_train, Xte, yte
        self.step = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.seen, self.prev_sum, self.losses = 0, 0.0, []

    def on_train_batch_end(self, batch, logs=None):
        self.meter.step()
        self.step += 1
        bs = min(self.args.batch_size, self.n_train - batch * self.args.batch_size)
        self.seen += bs
        running_sum = float(logs["loss"]) * self.seen
        loss = (running_sum - self.prev_sum) / bs
        self.prev_sum = running_sum
        self.losses.append(loss)
        self.rep.step(self.step, self.epoch1, loss, self.meter)

    @property
    def epoch1(self) -> int:
        return len(self.rep.log["epochs"]) + 1

    def test_accuracy(self) -> float:
        logits = self.model.predict(self.Xte, verbose=0, batch_size=512) if len(self.Xte) else None
        correct = float(np.sum(np.argmax(logits, 1) == self.yte)) if logits is not None else 0.0
        counts = hvd_tf.allreduce(tf.constant([correct, float(len(self.Xte))], tf.float64),
                                  op=hvd_tf.Sum, name="eval_counts").numpy()
        return float(counts[0] / counts[1])

    def on_epoch_end(self, epoch, logs=None):
        # logs["loss"] is already averaged over ranks by MetricAverageCallback (listed before us)
        self.final_acc = self.test_accuracy()
        self.rep.epoch(epoch + 1, float(logs["loss"]), self.final_acc, self.meter)


def train(args) -> None:
    rank, size = hvd.rank(), hvd.size()
    Xtr, ytr, Xte, yte, n_steps = common.rank_data(rank, size, args.batch_size)

    model = digits_model()
    compression = common.make_compression(args, hvd)
    compile_model(model, args.lr * size, 0.9, compression)
    desc = common.describe_compression(args, compression)
    meter = common.ByteMeter(args.compression, compression, grad_numel(model))
    rep = common.Reporter(args, "keras", rank, size, desc, grad_numel(model), n_steps)
    progress = Progress(args, meter, rep, len(Xtr), Xte, yte)
    callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                 hvd.callbacks.MetricAverageCallback(),
                 progress]
    # Per-epoch shuffling with a seeded generator: same batches per rank as the other examples.
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
    compression = common.make_compression(args, hvd)
    compile_model(model, 0.01 * size, 0.0, compression)
    bs = args.synthetic_batch_size
    rng = np.random.default_rng([args.seed, rank])
    x = rng.standard_normal((bs, 32, 32, 3), np.float32)
    y = rng.integers(0, 1000, bs)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    meter = common.ByteMeter(args.compression, compression, grad_numel(model))
    # model.fit once to build and broadcast; then time model.train_on_batch-sized fits
    model.fit(ds, steps_per_epoch=1, epochs=1, verbose=0,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), Throughput(meter)])
    common.run_throughput(args, lambda: model.train_on_batch(x, y), meter, rank, size,
                          f"MLP 3072-2048-1024-1000 ({grad_numel(model) / 1e6:.1f}M params)",
                          common.describe_compression(args, compression), "keras")


def main() -> None:
    args = common.parse_args(common.build_parser(__doc__.splitlines()[0]), drop_in=False)
    hvd.init()
    keras.utils.set_random_seed(args.seed)
    (synthetic if args.synthetic else train)(args)


if __name__ == "__main__":
    main()
