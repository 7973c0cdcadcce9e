"""The Horovod calls the compressors make on tf tensors (eager or inside tf.function)."""
from __future__ import annotations

from typing import Any

import horovod.tensorflow as hvd
import tensorflow as tf

from ..backends import tensorflow as _tf_backend  # noqa: F401  (keeps AutoGraph out of horovod_nuq)
from ..collectives import HorovodCollectives


class GraphCounters:
    """Byte counters that advance each time a traced graph runs, not once per trace."""

    def __init__(self) -> None:
        with tf.init_scope():
            self.vars = [tf.Variable(0, dtype=tf.int64, trainable=False) for _ in range(3)]

    def add(self, sent: int, numel: int) -> None:
        for v, inc in zip(self.vars, (sent, 4 * numel, 1)):
            v.assign_add(tf.constant(inc, tf.int64))

    def read(self) -> tuple[int, int, int]:
        return tuple(int(v.numpy()) for v in self.vars)

    def reset(self) -> None:
        for v in self.vars:
            v.assign(0)


class TFCollectives(HorovodCollectives):
    """Graph-aware: generators and counters live outside traced graphs. Horovod names graph
    ops after their (unique, stable) graph nodes, so no names are given here."""

    def make_rng(self, xp: Any, seed: int, like: Any) -> Any:
        with tf.init_scope():  # a generator made while tracing must live outside the graph
            return tf.random.Generator.from_seed(seed)

    def record(self, stats: Any, sent: int, numel: int) -> None:
        if tf.executing_eagerly():
            stats.record(sent, numel)
            return
        if stats._graph_counters is None:
            stats._graph_counters = GraphCounters()
        stats._graph_counters.add(sent, numel)


COLLECTIVES = TFCollectives(hvd, stable_names=False)
