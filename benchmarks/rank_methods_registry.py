"""The communication methods that benchmarks/rank_methods.py ranks: name -> optimizer factory.

Each entry is one small function `build(ctx) -> Built` that wraps a fresh base optimizer
(`ctx.base()`) for the model's parameters. Plain compressors go through Horovod's own
`hvd.DistributedOptimizer` (the one-line path of the README). Methods that need an API this
checkout may not have (error feedback, CSER, Local SGD) raise `Unavailable` with the reason,
and the runner prints "not available on this checkout" instead of crashing.

Adding a method: write a build function and add one `Method(...)` line to METHODS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

SCHEMES = ("qsgd", "qsgdinf", "nuq", "tnq", "globalqsgd")


class Unavailable(RuntimeError):
    """The method's API does not exist on this checkout (the message says which)."""


@dataclass
class Context:
    """What a factory may use: Horovod, horovod_nuq.torch, the parameters and a base optimizer."""

    hvd: Any
    nuq: Any
    named_parameters: list
    base: Callable[[], Any]
    numel: int
    seed: int
    steps: int  # the run's optimizer steps (Local SGD's schedule spans them)


@dataclass
class Built:
    """A method ready to train: `optimizer.zero_grad()` / `.step()` after `loss.backward()`.

    compressor: a horovod_nuq Compressor whose `stats.total_bytes` counts what this rank hands to
    the collectives; else fixed_bytes_per_step says it (fp32 / fp16), or None when unknown.
    local_models: ranks hold different models between synchronisations (Local SGD, CSER), so
    validation runs every window on every rank and averages the ranks' losses.
    """

    optimizer: Any
    compressor: Any = None
    fixed_bytes_per_step: int | None = None
    local_models: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    describe: str
    build: Callable[[Context], Built] = field(repr=False)


# ---- factories -----------------------------------------------------------------------------
def _horovod(kind: str) -> Callable[[Context], Built]:
    """Horovod's own compression (none = float32, fp16) through hvd.DistributedOptimizer."""
    def build(ctx: Context) -> Built:
        opt = ctx.hvd.DistributedOptimizer(ctx.base(), named_parameters=ctx.named_parameters,
                                           compression=getattr(ctx.hvd.Compression, kind))
        return Built(opt, fixed_bytes_per_step=ctx.numel * (4 if kind == "none" else 2))
    return build


def _scheme(scheme: str, bits: int | None) -> Callable[[Context], Built]:
    """A horovod_nuq compressor (default protocol "auto") through Horovod's own optimizer
    (bits None: the compressor's own sizing, e.g. HSQ's codebook and chunk length)."""
    def build(ctx: Context) -> Built:
        comp = ctx.nuq.COMPRESSORS[scheme](**({} if bits is None else {"bits": bits}), seed=ctx.seed)
        opt = ctx.hvd.DistributedOptimizer(ctx.base(), named_parameters=ctx.named_parameters,
                                           compression=comp)
        return Built(opt, comp)
    return build


def _error_feedback(scheme: str, bits: int | None, gamma: bool | float = True) -> Callable[[Context], Built]:
    """The compressor with error feedback (EF-SGD, Karimireddy et al. 2019): horovod_nuq's
    optimizer, which knows each gradient's parameter (the residual is kept per parameter).
    gamma: True, the package's contraction-safe default 1/(1 + omega); a float, that gamma."""
    def build(ctx: Context) -> Built:
        try:
            comp = ctx.nuq.COMPRESSORS[scheme](**({} if bits is None else {"bits": bits}), seed=ctx.seed,
                                               error_feedback=gamma)
        except TypeError as exc:
            if "error_feedback" not in str(exc):
                raise
            raise Unavailable("Compressor(error_feedback=True) is not available on this checkout") from exc
        opt = ctx.nuq.DistributedOptimizer(ctx.base(), named_parameters=ctx.named_parameters,
                                           compression=comp)
        return Built(opt, comp)
    return build


def _wrapper(cls_name: str, scheme: str | None, bits: int, **options: Any) -> Callable[[Context], Built]:
    """An optimizer wrapper of horovod_nuq.torch (CSER, LocalSGD) at its default schedule,
    communicating through `scheme` at `bits` (None: uncompressed float32). `options` name
    Context fields passed as keywords (Local SGD's schedule needs the run's total_steps)."""
    def build(ctx: Context) -> Built:
        cls = getattr(ctx.nuq, cls_name, None)
        if cls is None:
            raise Unavailable(f"horovod_nuq.torch.{cls_name} is not available on this checkout")
        comp = ctx.nuq.COMPRESSORS[scheme](bits=bits, seed=ctx.seed) if scheme else None
        opt = cls(ctx.base(), named_parameters=ctx.named_parameters, compression=comp,
                  **{k: getattr(ctx, field) for k, field in options.items()})
        # no byte count: CSER's resets and Local SGD's averages also travel uncompressed
        # (hvd.Compression.none), which counts nothing; the shaped link's counter has them all
        return Built(opt, None, None, local_models=True)
    return build


def _methods() -> dict[str, Method]:
    out = [Method("none", "baseline", "float32 allreduce (hvd.Compression.none)", _horovod("none")),
           Method("fp16", "baseline", "float16 allreduce (hvd.Compression.fp16)", _horovod("fp16"))]
    for bits in (4, 2):
        out += [Method(f"{s}{bits}", "scheme", f"{s} {bits}-bit, hvd.DistributedOptimizer", _scheme(s, bits))
                for s in SCHEMES]
    out += [Method("tnq4+ef", "error feedback", "tnq 4-bit + error feedback", _error_feedback("tnq", 4))]
    out += [Method(f"{s}2+ef", "error feedback", f"{s} 2-bit + error feedback", _error_feedback(s, 2))
            for s in SCHEMES]
    out += [Method("nuq4+ef", "error feedback", "nuq 4-bit + error feedback (omega < 1: gamma = 1)",
                   _error_feedback("nuq", 4)),
            Method("hsq", "scheme", "HSQ (K 256, dim 16, 6-bit scalars: 0.875 bits), hvd.DistributedOptimizer",
                   _scheme("hsq", None)),
            Method("hsq+ef", "error feedback", "HSQ + error feedback (its authors' pairing)",
                   _error_feedback("hsq", None)),
            Method("qsgdinf2+ef1", "error feedback", "qsgdinf 2-bit + error feedback with gamma = 1 "
                   "(no contraction guarantee)", _error_feedback("qsgdinf", 2, 1.0))]
    out += [Method("cser", "optimizer", "CSER (Xie et al. 2020): nuq 2-bit updates, full resets",
                   _wrapper("CSER", "nuq", 2)),
            Method("localsgd", "optimizer", "Local SGD, growing intervals (Spiridonoff et al. 2021), float32",
                   _wrapper("LocalSGD", None, 32, total_steps="steps"))]
    return {m.name: m for m in out}


METHODS: dict[str, Method] = _methods()


def select(names: list[str]) -> list[Method]:
    """The methods named, in order; an unknown name raises with the list of known ones."""
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from: {' '.join(METHODS)}")
    return [METHODS[n] for n in names]
