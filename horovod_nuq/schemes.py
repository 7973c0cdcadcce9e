"""The quantization schemes: configuration and validation only, no framework code.

A Scheme says how one worker maps a bucket of coordinates to signed level indices:
which levels, which scale (L2 norm, max norm, or a Laplace-fitted truncation threshold)
and how many coordinates share a scale. The math that applies it lives in `codec.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import levels as L
from .levels import Levels

SCALES = ("l2", "max", "laplace")


@dataclass(frozen=True)
class Scheme:
    """One quantizer: `levels` on [0, 1], a per-bucket `scale` rule, `bucket_size` coordinates per scale.

    scale="laplace" is TNQSGD's: the bucket is clipped to alpha = truncation * mean|v|
    (mean|v| is the Laplace scale's maximum-likelihood estimate), which is biased.
    """

    name: str
    levels: Levels
    scale: str = "l2"
    bucket_size: int = 512
    truncation: float | None = None
    spacing: str = field(default="uniform", compare=False)

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale rule {self.scale!r}; allowed: {', '.join(SCALES)}")
        bs = self.bucket_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0:
            raise ValueError(f"bucket_size must be a positive int, got {bs!r}")
        if (self.scale == "laplace") != (self.truncation is not None):
            raise ValueError("truncation is set exactly when scale='laplace'")
        if self.truncation is not None and not self.truncation > 0:
            raise ValueError(f"truncation must be > 0, got {self.truncation!r}")

    @property
    def unbiased(self) -> bool:
        """Every scale rule but truncation bounds all coordinates, so E[Q(v)] = v."""
        return self.scale != "laplace"

    @property
    def code_bits(self) -> int:
        """Bits per coordinate of the per-worker code (sign and level index)."""
        return self.levels.code_bits

    def describe(self) -> str:
        t = f", truncation={self.truncation:.3g}" if self.truncation else ""
        return (f"{self.name}(bits={self.code_bits}, levels={self.levels.k}, scale={self.scale}, "
                f"bucket_size={self.bucket_size}{t})")


def _levels(bits: int | None, levels: int | None, default_bits: int) -> int:
    """Resolve the user's `bits` or `levels` keyword to k, the number of non-zero levels."""
    if bits is not None and levels is not None:
        raise ValueError("give either bits or levels, not both")
    if levels is not None:
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"levels (the number of non-zero levels) must be an int >= 1, got {levels!r}")
        if levels > 127:
            raise ValueError(f"levels must be <= 127 so a signed code fits 8 bits, got {levels}")
        return levels
    return L.levels_for_bits(default_bits if bits is None else bits)


def qsgd(bits: int | None = None, bucket_size: int = 512, levels: int | None = None) -> Scheme:
    """QSGD (arXiv 1610.02132): uniform levels, L2 scale."""
    return Scheme("qsgd", L.uniform(_levels(bits, levels, 4)), "l2", bucket_size)


def qsgd_inf(bits: int | None = None, bucket_size: int = 512, levels: int | None = None) -> Scheme:
    """QSGDinf: uniform levels, max-norm scale (lower variance, same unbiasedness)."""
    return Scheme("qsgdinf", L.uniform(_levels(bits, levels, 4)), "max", bucket_size)


def nuqsgd(bits: int | None = None, bucket_size: int = 512, levels: int | None = None) -> Scheme:
    """NUQSGD (arXiv 1908.06077): exponentially spaced levels, L2 scale."""
    k = _levels(bits, levels, 4)
    if k > 62:
        raise ValueError(f"NUQSGD supports at most 62 non-zero levels (bits <= 6), got {k}")
    return Scheme("nuqsgd", L.exponential(k), "l2", bucket_size, spacing="exponential")


def global_qsgd(bits: int | None = None, bucket_size: int = 512, levels: int | None = None,
                spacing: str = "linear") -> Scheme:
    """Global-QSGD (arXiv 2305.18627): one max-norm scale shared by all ranks (agreed by a Max
    allreduce, as the authors' code does), linear or exponential levels."""
    k = _levels(bits, levels, 4)
    if spacing == "linear":
        lv = L.uniform(k)
    elif spacing == "exponential":
        lv = L.exponential(k)
    else:
        raise ValueError(f"spacing must be 'linear' or 'exponential', got {spacing!r}")
    return Scheme("globalqsgd", lv, "max", bucket_size, spacing=spacing)


def tnqsgd(bits: int | None = None, bucket_size: int = 512, levels: int | None = None,
           truncation: float | None = None) -> Scheme:
    """TNQSGD (arXiv 2402.01160): clip at alpha = truncation * mean|v|, then non-uniform levels."""
    from .tnq import optimal_truncation, tnq_levels

    k = _levels(bits, levels, 4)
    c = optimal_truncation(k) if truncation is None else truncation
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
        raise ValueError(f"truncation must be > 0 and finite (alpha in units of mean|v|), got {c!r}")
    c = float(c)
    return Scheme("tnqsgd", tnq_levels(k, c), "laplace", bucket_size, truncation=c,
                  spacing="tnq")


SCHEMES = {"qsgd": qsgd, "qsgdinf": qsgd_inf, "nuqsgd": nuqsgd, "nuq": nuqsgd,
           "tnqsgd": tnqsgd, "tnq": tnqsgd, "globalqsgd": global_qsgd}


def make_scheme(name: str, **options) -> Scheme:
    """Build a scheme by name ('qsgd', 'qsgdinf', 'nuqsgd', 'tnqsgd', 'globalqsgd')."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; allowed: qsgd, qsgdinf, nuqsgd, tnqsgd, globalqsgd")
    return SCHEMES[key](**options)
