"""Data-parallel MLP on sklearn's digits with Horovod + horovod_nuq gradient quantization (TF2).

    horovodrun -np 2 -H localhost:2 python examples/tensorflow2_digits.py --compression nuq
    mpirun -np 2 python examples/tensorflow2_digits.py --compression qsgd --protocol allgather
    mpirun -np 2 python examples/tensorflow2_digits.py --compression nuq --synthetic   # img/sec

Training step: tf.GradientTape wrapped by Horovod's own hvd.DistributedGradientTape with the
compressor line only (--optimizer horovod, the default) or by
horovod_nuq.tensorflow.DistributedGradientTape (--optimizer horovod_nuq), inside one tf.function.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.keras = tf_keras, as horovod.tensorflow.keras needs
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import horovod.tensorflow as hvd

import horovod_nuq.tensorflow as nuq_tf


def digits_model() -> tf.keras.Model:
    return tf.keras.Sequential([tf.keras.layers.Dense(256, activation="relu", input_shape=(64,)),
                                tf.keras.layers.Dense(128, activation="relu"),
                                tf.keras.layers.Dense(10)])


def synthetic_model() -> tf.keras.Model:
    # ~9.4M parameters: 3x32x32 input -> 2048 -> 1024 -> 1000 classes
    return tf.keras.Sequential([tf.keras.layers.Flatten(input_shape=(32, 32, 3)),
                                tf.keras.layers.Dense(2048, activation="relu"),
                                tf.keras.layers.Dense(1024, activation="relu"),
                                tf.keras.layers.Dense(1000)])


def grad_numel(model: tf.keras.Model) -> int:
    return int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))


def make_train_step(model, opt, compression, optimizer: str = "horovod"):
    tape_cls = nuq_tf.DistributedGradientTape if optimizer == "horovod_nuq" else hvd.DistributedGradientTape
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(reduce_retracing=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        tape = tape_cls(tape, compression=compression, op=hvd.Average)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return hvd.allreduce(loss, op=hvd.Average, name="loss")

    return train_step


def evaluate(model, X: np.ndarray, y: np.ndarray) -> float:
    """Accuracy over the whole test set: each rank scores its shard, counts are summed."""
    correct = float(np.sum(np.argmax(model(X, training=False).numpy(), 1) == y)) if len(X) else 0.0
    counts = hvd.allreduce(tf.constant([correct, float(len(X))], tf.float64), op=hvd.Sum,
                           name="eval_counts").numpy()
    return float(counts[0] / counts[1])


def train(args) -> None:
    rank, size = hvd.rank(), hvd.size()
    Xtr, ytr, Xte, yte, n_steps = common.rank_data(rank, size, args.batch_size)

    model = digits_model()
    opt = tf.keras.optimizers.SGD(learning_rate=args.lr * size, momentum=0.9)
    compression = common.make_compression(args, hvd)
    hvd.broadcast_variables(model.variables, root_rank=0)  # optimizer slots start at zero everywhere
    train_step = make_train_step(model, opt, compression, args.optimizer)

    meter = common.ByteMeter(args.compression, compression, grad_numel(model))
    rep = common.Reporter(args, "tensorflow", rank, size, common.describe_compression(args, compression),
                          grad_numel(model), n_steps)
    step = 0
    for epoch in range(1, args.epochs + 1):
        losses = []
        for idx in common.epoch_batches(len(Xtr), args.batch_size, args.seed, epoch, rank):
            loss = float(train_step(tf.constant(Xtr[idx]), tf.constant(ytr[idx])))
            meter.step()
            step += 1
            losses.append(loss)
            rep.step(step, epoch, loss, meter)
        acc = evaluate(model, Xte, yte)
        rep.epoch(epoch, float(np.mean(losses)), acc, meter)
    rep.summary(acc, meter, compressor=common.describe_compression(args, compression))


def synthetic(args) -> None:
    rank, size = hvd.rank(), hvd.size()
    model = synthetic_model()
    opt = tf.keras.optimizers.SGD(learning_rate=0.01 * size)
    compression = common.make_compression(args, hvd)
    hvd.broadcast_variables(model.variables, root_rank=0)
    train_step = make_train_step(model, opt, compression, args.optimizer)
    rng = np.random.default_rng([args.seed, rank])
    data = tf.constant(rng.standard_normal((args.synthetic_batch_size, 32, 32, 3), np.float32))
    target = tf.constant(rng.integers(0, 1000, args.synthetic_batch_size))
    meter = common.ByteMeter(args.compression, compression, grad_numel(model))
    common.run_throughput(args, lambda: train_step(data, target).numpy(), meter, rank, size,
                          f"MLP 3072-2048-1024-1000 ({grad_numel(model) / 1e6:.1f}M params)",
                          common.describe_compression(args, compression), "tensorflow")


def main() -> None:
    args = common.parse_args(common.build_parser(__doc__.splitlines()[0]))
    hvd.init()
    tf.keras.utils.set_random_seed(args.seed)  # Python, NumPy and TF seeds (Keras initializers use all)
    (synthetic if args.synthetic else train)(args)


if __name__ == "__main__":
    main()
