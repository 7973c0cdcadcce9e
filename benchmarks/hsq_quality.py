"""HSQ against QSGD and NUQ: bits per coordinate, error, bias and codec time on a Gaussian tensor.

    python -m benchmarks.hsq_quality [--numel 1048576] [--draws 8] [--framework torch|tensorflow|numpy]
For each setting: bits per coordinate of the payload one rank hands to the allgather (its real
size), the relative error ||Q(v) - v|| / ||v|| of one draw, the relative bias
||mean of `draws` draws - v|| / ||v|| (HSQ's codeword choice is deterministic: its bias is
nearly its error, only the stochastic rounding of its quantized scalars averages out; for
the unbiased schemes it shrinks as 1 / sqrt(draws)), and encode / decode milliseconds per MB of
float32 input (best of 3, one process, collectives replaced by single-process ones).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import horovod_nuq as H
from horovod_nuq.collectives import LOCAL

# (K, dim, scalar_bits): the authors' 6-bit scalars everywhere, and the default with float32 ones
HSQ_SETTINGS = [(256, 16, 6), (256, 16, 32), (256, 8, 6), (1024, 16, 6), (256, 32, 6), (64, 8, 6),
                (16, 16, 6), (16, 4, 6)]
BASELINES = [("qsgd", H.QSGDCompressor, 2), ("qsgd", H.QSGDCompressor, 4),
             ("nuq", H.NUQCompressor, 2), ("nuq", H.NUQCompressor, 4)]


def convert(framework: str, x: np.ndarray):
    if framework == "torch":
        import torch
        return torch.from_numpy(x)
    if framework == "tensorflow":
        import tensorflow as tf
        return tf.constant(x)
    return x


def to_numpy(t) -> np.ndarray:
    return t if isinstance(t, np.ndarray) else np.asarray(t.numpy() if hasattr(t, "numpy") else t)


def best_ms(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def measure(label: str, comp, x: np.ndarray, framework: str, draws: int) -> str:
    comp.collectives = LOCAL
    t = convert(framework, x)
    mb = x.nbytes / 2**20
    payload, ctx = comp.compress_for_allgather(t)
    decoded = [to_numpy(comp.decompress_gathered(payload, ctx)).astype(np.float64)]
    for _ in range(draws - 1):
        decoded.append(to_numpy(comp.decompress_gathered(*comp.compress_for_allgather(t))).astype(np.float64))
    v = x.astype(np.float64)
    norm = np.linalg.norm(v)
    err = np.linalg.norm(decoded[0] - v) / norm
    bias = np.linalg.norm(np.mean(decoded, axis=0) - v) / norm
    bits = 8 * to_numpy(payload).size / x.size
    enc = best_ms(lambda: comp.compress_for_allgather(t)) / mb
    dec = best_ms(lambda: comp.decompress_gathered(payload, ctx)) / mb
    return f"| {label} | {bits:.3f} | {err:.4f} | {bias:.4f} | {enc:.2f} | {dec:.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 20)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--framework", default="torch", choices=["torch", "tensorflow", "numpy"])
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal(args.numel).astype(np.float32)
    print(f"Gaussian tensor, {args.numel} float32 elements, {args.framework}; bias over {args.draws} draws")
    print("| scheme | bits / coordinate | rel. error | rel. bias | encode ms/MB | decode ms/MB |")
    print("|---|---|---|---|---|---|")
    for k, dim, scalar_bits in HSQ_SETTINGS:
        t0 = time.perf_counter()
        comp = H.HSQCompressor(k, dim, scalar_bits=scalar_bits, seed=0)
        build = time.perf_counter() - t0
        scalars = "float32 scalars" if scalar_bits == 32 else f"{scalar_bits}-bit scalars"
        row = measure(f"hsq K={k}, dim={dim}, {scalars}", comp, x, args.framework, args.draws)
        print(row + (f" (codebook built in {build:.2f} s)" if build > 0.05 else ""))
    for name, cls, bits in BASELINES:
        comp = cls(bits=bits, seed=0, protocol="allgather")
        print(measure(f"{name} {bits} bits, bucket 512", comp, x, args.framework, args.draws))


if __name__ == "__main__":
    main()
