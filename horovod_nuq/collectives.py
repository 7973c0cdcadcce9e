"""The collective calls the transports make, one object per framework, passed in explicitly.

`HorovodCollectives` serves horovod.torch and horovod.tensorflow alike (they share the API);
the TensorFlow frontend adds only what graphs need. `LOCAL` is the single-process stand-in
(NumPy arrays, tests, offline tools). Frontends `register` theirs; `for_framework` finds it.
"""
from __future__ import annotations

import importlib
from collections import defaultdict
from typing import Any

_FRONTENDS = {"torch": "horovod_nuq.torch.collectives",
              "tensorflow": "horovod_nuq.tensorflow.collectives"}
_REGISTRY: dict[str, Any] = {}


class LocalCollectives:
    """One rank, no communication: every collective returns its input."""

    linear_ops: tuple = ()  # the reduction ops a compressor can decode (Horovod's Average, Sum)

    def __init__(self) -> None:
        self.in_flight: dict[tuple, dict] = defaultdict(dict)  # named slots in flight -> handle

    def rank(self) -> int:
        return 0

    def size(self, process_set: Any = None) -> int:
        return 1

    def gather_text(self, text: str, process_set: Any = None) -> list:
        return [text]

    def allreduce_max(self, x: Any, process_set: Any = None, name: str | None = None) -> Any:
        return x

    def allgather_async(self, x: Any, name: str | None, process_set: Any = None) -> Any:
        return x

    def allreduce_max_async(self, x: Any, name: str | None, process_set: Any = None) -> Any:
        return x

    def allreduce_average_async(self, x: Any, name: str | None, process_set: Any = None) -> Any:
        return x

    def wait(self, handle: Any) -> Any:
        return handle

    def poll(self, handle: Any) -> bool:
        return True

    def alive(self, handle: Any) -> bool:
        """False for a handle of an earlier Horovod session (elastic reset), which never completes."""
        return True

    def make_rng(self, xp: Any, seed: int, like: Any) -> Any:
        return xp.make_rng(seed, like)

    def record(self, stats: Any, sent: int, numel: int) -> None:
        stats.record(sent, numel)


LOCAL = LocalCollectives()


class HorovodCollectives(LocalCollectives):
    """Horovod's rank, size, Max allreduce, asynchronous allgather and error-message gathering."""

    def __init__(self, hvd: Any, stable_names: bool) -> None:
        super().__init__()
        self.hvd = hvd
        self.stable_names = stable_names
        self.linear_ops = (hvd.Average, hvd.Sum)

    def rank(self) -> int:
        return self.hvd.rank()

    def size(self, process_set: Any = None) -> int:
        return process_set.size() if process_set is not None else self.hvd.size()

    def gather_text(self, text: str, process_set: Any = None) -> list:
        """Every rank's `text`, in rank order (for error messages that name each rank's
        settings). Horovod gathers objects over all ranks only: within a smaller process set
        only this rank's text is known."""
        if getattr(process_set, "process_set_id", 0) != 0:
            return [f"{text} (this rank; the others of the process set are not gathered)"]
        return self.hvd.allgather_object(text)

    def allreduce_max(self, x: Any, process_set: Any = None, name: str | None = None) -> Any:
        """Synchronous Max allreduce. With stable_names, `name` or one that depends only on the
        size: it is never in flight twice (one tensor at a time) and stays in Horovod's
        response cache from step to step (unnamed calls get a new name each time and evict it)."""
        name = (name or f"horovod_nuq.scale.{_numel(x)}") if self.stable_names else None
        return self.hvd.allreduce(x, op=self.hvd.Max, name=name, **_ps(process_set))

    def allgather_async(self, x: Any, name: str | None, process_set: Any = None) -> Any:
        return self.hvd.allgather_async(x, name=name, **_ps(process_set))

    def allreduce_max_async(self, x: Any, name: str | None, process_set: Any = None) -> Any:
        return self.hvd.allreduce_async(x, name=name, op=self.hvd.Max, **_ps(process_set))

    def allreduce_average_async(self, x: Any, name: str | None, process_set: Any = None) -> Any:
        return self.hvd.allreduce_async(x, name=name, op=self.hvd.Average, **_ps(process_set))

    def wait(self, handle: Any) -> Any:
        return self.hvd.synchronize(handle)

    def poll(self, handle: Any) -> bool:
        return self.hvd.poll(handle)

    def alive(self, handle: Any) -> bool:
        """Horovod's init() (an elastic reset) forgets every handle: torch keeps them in
        mpi_ops._handle_map until synchronize()."""
        handles = getattr(getattr(self.hvd, "mpi_ops", None), "_handle_map", None)
        return handles is None or handle in handles


def register(framework: str, collectives: Any) -> Any:
    """Make `collectives` the default for tensors of `framework` ('torch', 'tensorflow',
    'numpy'); returns the one it replaces (None if none), so tests can restore it."""
    old = _REGISTRY.get(framework)
    _REGISTRY[framework] = collectives
    return old


def for_framework(framework: str) -> Any:
    """The registered collectives for a framework's tensors, importing its frontend on first use."""
    if framework not in _REGISTRY:
        module = _FRONTENDS.get(framework)
        if module is None:
            return LOCAL
        try:
            importlib.import_module(module)  # registers itself
        except ImportError as e:
            raise RuntimeError(
                f"horovod_nuq needs Horovod for {framework} tensors ({e}). Install Horovod with "
                f"{framework} support, or pass collectives=horovod_nuq.collectives.LOCAL for a "
                "single process.") from e
    return _REGISTRY[framework]


def _ps(process_set: Any) -> dict:
    return {"process_set": process_set} if process_set is not None else {}


def _numel(x: Any) -> int:
    return x.numel() if callable(getattr(x, "numel", None)) else int(x.shape.num_elements())
