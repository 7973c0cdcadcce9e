"""Single-process collectives: used when the codec runs on NumPy arrays (tests, offline tools)."""
from __future__ import annotations

from typing import Any


def rank() -> int:
    return 0


def size(process_set: Any = None) -> int:
    return 1


def gather_text(text: str, process_set: Any = None) -> list:
    return [text]


def allreduce_max(x: Any, process_set: Any = None) -> Any:
    return x


def make_rng(xp: Any, seed: int, like: Any) -> Any:
    return xp.make_rng(seed, like)


def record(stats: Any, sent: int, numel: int) -> None:
    stats.record(sent, numel)
