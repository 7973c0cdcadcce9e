"""Compress + decompress throughput of each scheme and protocol, next to `clone`, in one run.

    python benchmarks/codec_speed.py [--framework torch|tensorflow] [--sizes-mb 1 16 64]
Prints GB/s of float32 input processed and the ratio to clone() of the same tensor. The
collectives are replaced by single-process ones, so this times the codec alone.
"""
from __future__ import annotations

import argparse
import time

import horovod_nuq as H
from horovod_nuq import local

SCHEMES = {"qsgd": H.QSGDCompressor, "qsgdinf": H.QSGDInfCompressor, "nuq": H.NUQCompressor,
           "tnq": H.TNQCompressor, "globalqsgd": H.GlobalQSGDCompressor}


def best_of(fn, repeats: int) -> float:
    fn()  # warm up (allocations, compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def frame(name: str):
    """(make tensor, clone, sync) for a framework."""
    if name == "torch":
        import torch
        return (lambda n: torch.randn(n), lambda x: x.clone(), lambda: None)
    import tensorflow as tf
    return (lambda n: tf.random.normal([n]), lambda x: tf.identity(x + 0.0), lambda: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--framework", choices=["torch", "tensorflow"], default="torch")
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    args = ap.parse_args()
    make, clone, _ = frame(args.framework)
    print(f"{'size':>6s} {'scheme':10s} {'protocol':9s} {'compress':>9s} {'decompress':>10s} "
          f"{'both GB/s':>9s} {'clone GB/s':>10s} {'ratio':>6s}")
    for mb in args.sizes_mb:
        n = mb * (1 << 20) // 4
        x = make(n)
        t_clone = best_of(lambda x=x: clone(x), args.repeats)
        for name in args.schemes:
            for protocol in ("allreduce", "allgather"):
                if protocol == "allgather" and name == "globalqsgd":
                    continue
                comp = SCHEMES[name](seed=0, protocol=protocol)
                comp._collectives = lambda xp: local
                if protocol == "allreduce":
                    enc, dec = comp.compress, comp.decompress
                else:
                    enc, dec = comp.compress_for_allgather, comp.decompress_gathered
                payload, ctx = enc(x)
                t_enc = best_of(lambda enc=enc, x=x: enc(x), args.repeats)
                t_dec = best_of(lambda dec=dec, p=payload, c=ctx: dec(p, c), args.repeats)
                gb = 4 * n / 1e9
                both = gb / (t_enc + t_dec)
                print(f"{mb:4d}MB {name:10s} {protocol:9s} {gb / t_enc:8.3f}  {gb / t_dec:9.3f}  "
                      f"{both:9.3f} {gb / t_clone:10.3f} {both / (gb / t_clone):6.2f}", flush=True)
    print("GB/s = float32 input bytes per second; ratio = (compress + decompress) vs clone")


if __name__ == "__main__":
    main()
