"""Bytes on the wire: what a compressor handed to Horovod, next to float32 and float16."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# per-tensor records kept between mark_step() calls; bounded, since stock Horovod optimizers
# never call mark_step() and the totals do not need the list
OPEN_TENSORS_MAX = 100_000


@dataclass
class WireStats:
    """Running totals of payload bytes handed to collectives, and the float32 bytes they replace.

    `mark_step()` closes a training step; `steps` then lists bytes sent per step, and
    `step_tensors` the (elements, bytes sent) of each tensor of the last closed step. Inside
    tf.function the counts are taken each time the graph runs (a run-time callback op).
    """

    _sent: int = 0
    _float32: int = 0
    _count: int = 0
    steps: list = field(default_factory=list)
    step_tensors: list = field(default_factory=list)
    _open_tensors: deque = field(default_factory=lambda: deque(maxlen=OPEN_TENSORS_MAX))
    _step_start: int = 0

    def record(self, sent: int, numel: int) -> None:
        self._sent += int(sent)
        self._float32 += 4 * int(numel)
        self._count += 1
        self._open_tensors.append((int(numel), int(sent)))

    def record_overhead(self, sent: int) -> None:
        """Bytes sent that belong to no single tensor (a batched scale agreement's ids)."""
        self._sent += int(sent)

    def _totals(self) -> tuple[int, int, int]:
        return self._sent, self._float32, self._count

    @property
    def tensors(self) -> int:
        """Tensors compressed so far."""
        return self._totals()[2]

    @property
    def total_bytes(self) -> int:
        return self._totals()[0]

    @property
    def total_float32_bytes(self) -> int:
        return self._totals()[1]

    @property
    def ratio_vs_float32(self) -> float:
        sent, f32, _ = self._totals()
        return f32 / sent if sent else float("nan")

    @property
    def ratio_vs_float16(self) -> float:
        sent, f32, _ = self._totals()
        return f32 / 2 / sent if sent else float("nan")

    def mark_step(self) -> int:
        """Close a step; return the bytes sent during it."""
        total = self.total_bytes
        sent = total - self._step_start
        self.steps.append(sent)
        self._step_start = total
        self.step_tensors = list(self._open_tensors)
        self._open_tensors.clear()
        return sent

    def reset(self) -> None:
        self._sent = self._float32 = self._count = self._step_start = 0
        self.steps.clear()
        self.step_tensors = []
        self._open_tensors.clear()

    def summary(self) -> str:
        sent, f32, n = self._totals()
        if not sent:
            return "no tensors compressed yet"
        return (f"{n} tensors, {sent / 1e6:.3f} MB sent vs {f32 / 1e6:.3f} MB float32 "
                f"({f32 / sent:.2f}x smaller; {f32 / 2 / sent:.2f}x vs float16)")
