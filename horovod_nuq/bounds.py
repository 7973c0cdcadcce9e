"""Error bounds for one worker's quantizer, each labelled [paper] (a theorem quoted from its
paper) or [derived] (this project's derivation, in docs/schemes.md; tested, not peer-reviewed).

qsgd, qsgd_inf, nuq: E||Q(v) - v||^2 <= coefficient * ||v||^2 for one bucket of d coordinates
quantized on the worker's OWN scale, i.e. the gathered protocol. In the summable "allreduce"
protocol every worker quantizes on the maximum scale over ranks, which can exceed its own,
so these per-worker bounds do not hold there (the multi-rank tests check that protocol
against its exact variance instead). global_linear is relative to the shared scale R^2, not
to ||v||^2; tnq_mse is an absolute per-coordinate error for Laplace-distributed inputs.
s is the number of non-zero levels per sign (k).
"""
from __future__ import annotations

import math


def qsgd(d: int, s: int) -> float:
    """[paper] QSGD, Lemma 3.1 of arXiv 1610.02132: min(d / s^2, sqrt(d) / s)."""
    return min(d / s**2, math.sqrt(d) / s)


def qsgd_inf(d: int, s: int) -> float:
    """[derived] QSGDinf (max-norm scale): min(d / (4 s^2), sqrt(d) / s)."""
    return min(d / (4 * s**2), math.sqrt(d) / s)


def nuq(d: int, s: int) -> float:
    """[derived] NUQSGD with levels {0, 2^-(s-1), ..., 1}, L2 scale (docs/schemes.md; the
    paper's own epsilon_Q is not reproduced).

    Above the smallest level l1 the relative variance is at most 1/8 per coordinate; below
    it each coordinate adds at most min(l1^2 / 4, l1 |v_i| / r) r^2.
    """
    l1 = 2.0 ** -(s - 1)
    return 1 / 8 + min(d * l1 * l1 / 4, math.sqrt(d) * l1)


def global_linear(d: int, s: int) -> float:
    """[derived] Shared max-norm scale R >= ||v||_inf, linear levels: E||Q(v) - v||^2 <=
    d R^2 / (4 s^2); the coefficient returned multiplies R^2, not ||v||^2."""
    return d / (4 * s**2)


def tnq_mse(s: int, b: float = 1.0) -> float:
    """[derived] TNQSGD mean squared error per coordinate for Laplace(0, b) coordinates at
    alpha* (truncation plus rounding): 27 b^2 / (2s + 3 sqrt(6) / 2)^2. This project's
    reconstruction of the analysis in arXiv 2402.01160 (docs/schemes.md), not a formula quoted
    from it; absolute (times b^2), and only for Laplace inputs."""
    return 27.0 * b * b / (2 * s + 3 * math.sqrt(6) / 2) ** 2


PER_WORKER = {"qsgd": qsgd, "qsgdinf": qsgd_inf, "nuqsgd": nuq}


def relative_variance(scheme: object) -> float | None:
    """omega with E||Q(v) - v||^2 <= omega ||v||^2 on one worker's own scales (gathered
    protocol; [paper] for QSGD, [derived] for QSGDinf and NUQSGD), or None where there is no
    such bound (TNQ's truncation; Global-QSGD's shared scale)."""
    fn = PER_WORKER.get(getattr(scheme, "name", ""))
    return None if fn is None else fn(scheme.bucket_size, scheme.levels.k)
