"""Bits per coordinate of QSGD's Elias-coded payload, against the paper's bound and the
fixed-width code, on a Gaussian tensor.

    python benchmarks/elias_bits.py [--numel 1048576] [--out benchmarks/results/elias_bits.md]

For s in {1, 2, 4, sqrt(d)} and buckets of d in {512, 8192, the whole tensor}: the payload one
rank sends (everything: settings id, length, float32 norms, chunk offsets, streams) per
coordinate; the bound of Theorem 3.2 (arXiv 1610.02132; bounds.qsgd_elias_bits, per bucket,
norm included, divided by d) where its condition s^2 + sqrt(d) <= d/2 holds; and the
fixed-width payload (bits = ceil(log2(2s + 1)) per coordinate, plus norms and id). The codes
are 8 bits at most, so s <= 127: for the whole tensor, s = sqrt(d) = 1024 is replaced by 127.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

import horovod_nuq as H
from horovod_nuq import bounds, elias


def row(x: np.ndarray, d: int, s: int, seed: int) -> dict:
    coded = H.QSGDCompressor(levels=s, bucket_size=d, seed=seed, encoding="elias")
    fixed = H.QSGDCompressor(levels=s, bucket_size=d, seed=seed, protocol="allgather")
    p, _ = coded.compress_for_allgather(x)
    f, _ = fixed.compress_for_allgather(x)
    n, nb = x.size, -(-x.size // d)
    frame = elias.prefix_bytes(nb, nb * d)
    applies = bounds.qsgd_elias_applies(d, s)
    return {"d": d, "s": s, "elias": 8 * p.size / n, "streams": 8 * (p.size - frame) / n,
            "bound": nb * bounds.qsgd_elias_bits(d, s) / n if applies else None,
            "fixed": 8 * f.size / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/elias_bits.md")
    args = ap.parse_args()
    x = np.random.default_rng(args.seed).standard_normal(args.numel).astype(np.float32)
    lines = [f"# QSGD Elias code: bits per coordinate, Gaussian tensor of {args.numel} elements",
             "", "`python benchmarks/elias_bits.py` (seed 0). bits/coord = 8 x payload bytes / elements.",
             ("Theorem 3.2 bound: arXiv 1610.02132, per bucket (norm included) / d, o(1) dropped; "
              "'n/a' where its condition s^2 + sqrt(d) <= d/2 fails (there the paper's Corollary 3.3 "
              "gives 2.8 d + 32 bits for a different, dense code, which this package does not send)."),
             "", ("| bucket d | s | Elias payload | of which streams | Thm 3.2 bound | fixed-width payload "
                  "| fixed / Elias |"), "|---|---|---|---|---|---|---|"]
    for d in (512, 8192, args.numel):
        root = math.isqrt(d)
        for s in (1, 2, 4, min(root, 127)):
            r = row(x, d, s, args.seed)
            tag = f"{s} (sqrt d)" if s == root else (f"{s} (max; sqrt d = {root})" if s == 127 else str(s))
            bound = f"{r['bound']:.3f}" if r["bound"] is not None else "n/a"
            name = "whole (2^20)" if d == args.numel and d == 1 << 20 else ("whole" if d == args.numel else str(d))
            lines.append(f"| {name} | {tag} | {r['elias']:.3f} | {r['streams']:.3f} | {bound} | "
                         f"{r['fixed']:.3f} | {r['fixed'] / r['elias']:.1f}x |")
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
