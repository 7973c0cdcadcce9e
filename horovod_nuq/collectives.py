"""The few Horovod calls a compressor makes, for one Horovod framework module.

horovod.torch and horovod.tensorflow expose the same API, so one class serves both; the
TensorFlow frontend adds only what graphs need (generators outside the graph, byte counters
that run with the graph). horovod_nuq.local is the single-process stand-in.
"""
from __future__ import annotations

from typing import Any


class HorovodCollectives:
    """rank, size, the scale agreement (Max allreduce) and error-message gathering."""

    def __init__(self, hvd: Any, stable_names: bool) -> None:
        self.hvd = hvd
        self.stable_names = stable_names

    def rank(self) -> int:
        return self.hvd.rank()

    def size(self, process_set: Any = None) -> int:
        return process_set.size() if process_set is not None else self.hvd.size()

    def gather_text(self, text: str, process_set: Any = None) -> list:
        """Every rank's `text`, in rank order (for error messages that name each rank's settings)."""
        return self.hvd.allgather_object(text, **_ps(process_set))

    def allreduce_max(self, x: Any, process_set: Any = None) -> Any:
        """Synchronous Max allreduce. With stable_names, a name that depends only on the size:
        compressors call this one tensor at a time, so the name is never in flight twice, and
        it stays in Horovod's response cache from step to step (unnamed calls get a new name
        each time and evict it)."""
        name = f"horovod_nuq.scale.{_numel(x)}" if self.stable_names else None
        return self.hvd.allreduce(x, op=self.hvd.Max, name=name, **_ps(process_set))

    def make_rng(self, xp: Any, seed: int, like: Any) -> Any:
        return xp.make_rng(seed, like)

    def record(self, stats: Any, sent: int, numel: int) -> None:
        stats.record(sent, numel)


def _ps(process_set: Any) -> dict:
    return {"process_set": process_set} if process_set is not None else {}


def _numel(x: Any) -> int:
    return x.numel() if callable(getattr(x, "numel", None)) else int(x.shape.num_elements())
