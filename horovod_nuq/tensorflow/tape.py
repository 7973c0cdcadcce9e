"""hvd.DistributedGradientTape with the same signature, which can also route the allgather protocol.

For compressors that use protocol "allreduce" over this process set (and Horovod's own)
this is Horovod's tape unchanged. For "allgather" (chosen, or picked by "auto" because it
moves fewer bytes at this many ranks) it swaps the tape's reduction for: pack codes, allgather, decode
every rank's payload in rank order, average. With error feedback it also swaps the allreduce
path, to name each gradient after its variable (the residual's key).
"""
from __future__ import annotations

import re
from typing import Any

import horovod.tensorflow as hvd
import tensorflow as tf

from .. import policy


def _key(name: str) -> str:
    """A variable's name as an error-feedback key that is also a valid op name ("w:0" -> "w")."""
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name.split(":")[0])


def _reduce_grads_fn(compression: Any, op: Any, process_set: Any, gathers: bool, predivide: float):
    average = op == hvd.Average
    scaling = {"prescale_factor": 1.0 / predivide, "postscale_factor": predivide} if average else {}

    def reduce_grads(grads, vars=None, use_generic_names=False):
        out = []
        for i, g in enumerate(grads):
            if g is None:
                out.append(None)
                continue
            if isinstance(g, tf.IndexedSlices):  # dense, with the variable's static shape
                g = tf.convert_to_tensor(g)
                if vars is not None:
                    g = tf.reshape(g, vars[i].shape)
            key = _key(vars[i].name) if vars is not None else f"grad_{i}"
            if not gathers:  # error feedback over the allreduce protocol: Horovod's, named
                out.append(hvd.allreduce(g, compression=compression, op=op, name=key,
                                         process_set=process_set, **scaling))
                continue
            payload, ctx = compression.compress_for_allgather(g, key=key)
            gathered = hvd.allgather(payload, name=f"nuq_grad_{i}", process_set=process_set)
            gathered = tf.reshape(gathered, [process_set.size() * payload.shape[0]])  # static shape
            out.append(compression.decompress_gathered(gathered, ctx, average))
        return out

    return tf.function(reduce_grads) if tf.executing_eagerly() else reduce_grads


def DistributedGradientTape(gradtape: tf.GradientTape, device_dense: str = "",
                            device_sparse: str = "", compression: Any = hvd.Compression.none,
                            sparse_as_dense: bool = False, op: Any = hvd.Average,
                            gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                            groups: Any = None, process_set: Any = hvd.global_process_set,
                            scale_local_gradients: bool = True) -> tf.GradientTape:
    """Horovod's DistributedGradientTape; also routes the allgather protocol (see module doc)."""
    protocol = policy.route(compression, process_set, op, hvd.Average, hvd.Sum)
    gathers = protocol == "allgather"
    tape = hvd.DistributedGradientTape(
        gradtape, device_dense=device_dense, device_sparse=device_sparse,
        compression=hvd.Compression.none if gathers else compression,
        sparse_as_dense=sparse_as_dense, op=op, gradient_predivide_factor=gradient_predivide_factor,
        num_groups=num_groups, groups=groups, process_set=process_set,
        scale_local_gradients=scale_local_gradients)
    if gathers or (protocol is not None and compression.memory is not None):
        tape._allreduce_grads = _reduce_grads_fn(compression, op, process_set, gathers,
                                                 gradient_predivide_factor)
    return tape
