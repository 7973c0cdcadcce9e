"""Which optimizer steps communicate: the schedules of Local SGD and CSER, framework-free.

- `GrowingIntervals`: Local SGD whose averaging rounds spread out as training goes on
  (Spiridonoff, Olshevsky, Paschalidis, "Communication-efficient SGD: From Local SGD to
  One-Shot Averaging", NeurIPS 2021, arXiv 2106.04759). Round r holds H_r = a*r local steps,
  so the r-th average falls after tau_r = floor(a * r * (r + 1) / 2) steps. The paper (and
  its experiment code, github.com/spiridonoff/Local-SGD-re, quadratic.ipynb) fixes R rounds
  over T steps with a = 2T / (R (R + 1)), so tau_R = T, and takes R = N, the number of
  workers: Omega(N) communications give the 1/(NT) error, independent of T. R = 1 is
  one-shot averaging (a single average after step T).
- `Periodic`: every H-th step (CSER's error reset, classical Local SGD).

Steps count from 1: step t communicates after the t-th local optimizer step.
"""
from __future__ import annotations

import math
from fractions import Fraction
from numbers import Integral, Real


def _positive_int(name: str, value: object, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}{hint}")
    return int(value)


class GrowingIntervals:
    """Averages after steps tau_r = floor(a r (r+1) / 2), r = 1, 2, ... (round r: a*r steps).

    Give either `total_steps` T (with `rounds` R, default 1 here; the torch wrapper defaults
    it to the number of ranks, the paper's R = N), which sets a = 2T / (R (R+1)) so that the
    R-th average lands exactly after step T; or `growth` a (>= 1) directly, for training of
    open length. Rounds past R continue the same formula. R = 1 is one-shot averaging.
    """

    def __init__(self, total_steps: int | None = None, rounds: int | None = None,
                 growth: float | None = None) -> None:
        if growth is not None:
            if total_steps is not None or rounds is not None:
                raise ValueError("give either growth (a) or total_steps (T, with rounds R), not "
                                 "both: a = 2T / (R (R+1)) follows from T and R")
            if isinstance(growth, bool) or not isinstance(growth, Real) or not math.isfinite(growth):
                raise ValueError(f"growth must be a finite number >= 1, got {growth!r}")
            if growth < 1:
                raise ValueError(f"growth must be >= 1 (round r holds growth*r local steps, and "
                                 f"round 1 needs at least one), got {growth!r}")
            self.growth = Fraction(growth).limit_denominator(1 << 20)
            self.total_steps, self.rounds = None, None
            return
        if total_steps is None:
            if rounds is not None:
                raise ValueError("rounds (R) needs total_steps (T): the R-th average lands after step T")
            raise ValueError("give total_steps (T, the number of optimizer steps to train; the R-th "
                             "average lands after it) or growth (a: round r holds a*r local steps)")
        t = _positive_int("total_steps", total_steps)
        r = _positive_int("rounds", 1 if rounds is None else rounds,
                          " (rounds=1 is one-shot averaging)")
        if 2 * t < r * (r + 1):
            raise ValueError(f"total_steps={t} is too few for rounds={r}: round i holds a*i steps "
                             f"with a = 2T/(R(R+1)) >= 1, so T must be >= R(R+1)/2 = "
                             f"{r * (r + 1) // 2}; raise total_steps or lower rounds")
        self.total_steps, self.rounds = t, r
        self.growth = Fraction(2 * t, r * (r + 1))

    def time(self, r: int) -> int:
        """tau_r: the step after which the r-th average happens (r >= 1)."""
        r = _positive_int("r", r)
        return math.floor(self.growth * r * (r + 1) / 2)

    def times(self, until: int) -> list[int]:
        """Every averaging step <= `until`."""
        out, r = [], 1
        while (t := self.time(r)) <= until:
            out.append(t)
            r += 1
        return out

    def round_of(self, step: int) -> int | None:
        """r if step == tau_r, else None."""
        if step < 1:
            return None
        guess = int(math.sqrt(2 * step / float(self.growth)))
        for r in range(max(1, guess - 2), guess + 3):
            if self.time(r) == step:
                return r
        return None

    def communicates(self, step: int) -> bool:
        return self.round_of(step) is not None

    def describe(self) -> str:
        if self.total_steps is not None:
            return f"GrowingIntervals(total_steps={self.total_steps}, rounds={self.rounds})"
        return f"GrowingIntervals(growth={self.growth})"

    __repr__ = describe


class Periodic:
    """Communicates after every `period`-th step (H): steps H, 2H, 3H, ..."""

    def __init__(self, period: int) -> None:
        self.period = _positive_int("period", period)

    def communicates(self, step: int) -> bool:
        return step >= 1 and step % self.period == 0

    def times(self, until: int) -> list[int]:
        return list(range(self.period, until + 1, self.period))

    def describe(self) -> str:
        return f"Periodic(period={self.period})"

    __repr__ = describe
