"""The Horovod calls the compressors make on tf tensors (eager or inside tf.function)."""
from __future__ import annotations

from typing import Any

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from .. import collectives
from ..backends.tensorflow import run_time_call  # importing it also keeps AutoGraph out


class TFCollectives(collectives.HorovodCollectives):
    """Graph-aware: the allgather is an op of the graph (its handle is its result), and byte
    counts are taken when the graph runs. Horovod names graph ops after their graph nodes
    (unique and stable), so no names are given here."""

    def allgather_async(self, x: Any, name: str | None, process_set: Any = None) -> Any:
        """Every rank's 1-d `x`: with the static shape decoding needs when all ranks' are of
        one static length; else (Elias payloads, lengths known at run time) as gathered."""
        out = hvd.allgather(x, **collectives._ps(process_set))
        if x.shape[0] is None or tf.executing_eagerly():
            return out
        return tf.reshape(out, [self.size(process_set) * int(x.shape[0])])

    def wait(self, handle: Any) -> Any:
        return handle

    def poll(self, handle: Any) -> bool:
        return True

    def record(self, stats: Any, sent: Any, numel: int) -> None:
        """Count `sent` bytes when the graph runs; `sent` may be a run-time scalar tensor (the
        length of an Elias payload)."""
        if tf.executing_eagerly():
            stats.record(int(sent), numel)
        elif isinstance(sent, tf.Tensor):
            tf.numpy_function(lambda s: np.int64(stats.record(int(s), numel) or 0), [sent], tf.int64,
                              stateful=True)
        else:
            run_time_call(lambda: stats.record(sent, numel) or 0)


COLLECTIVES = TFCollectives(hvd, stable_names=False)
collectives.register("tensorflow", COLLECTIVES)
