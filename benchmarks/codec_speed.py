"""Compress + decompress throughput of each scheme and protocol, next to `clone`, in one run.

    python benchmarks/codec_speed.py [--framework torch|tensorflow] [--sizes-mb 1 16 64]
        [--schemes qsgd --levels 1 --elias]
Prints GB/s of float32 input processed and the ratio to clone() of the same tensor. The
collectives are replaced by single-process ones, so this times the codec alone. --elias adds
a row "elias" (QSGD's Elias-coded allgather payload) beside QSGD's fixed-width rows.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import threading
import time

import horovod_nuq as H
from horovod_nuq.collectives import LOCAL

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


def make_compressor(name: str, protocol: str, levels: int | None):
    """The compressor of a row: protocol "elias" is QSGD's Elias-coded allgather payload."""
    opts = {} if levels is None else {"levels": levels}
    if protocol == "elias":
        return H.QSGDCompressor(seed=0, encoding="elias", **opts)
    return SCHEMES[name](seed=0, protocol=protocol, **opts)


def peak_extra_mb(framework: str, name: str, protocol: str, mb: int, levels: int | None) -> float:
    """Peak resident memory added by one compress + decompress, measured in a fresh process."""
    extra = [] if levels is None else ["--levels", str(levels)]
    out = subprocess.run([sys.executable, __file__, "--framework", framework, "--rss-probe",
                          name, protocol, str(mb)] + extra, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def rss_probe(framework: str, name: str, protocol: str, mb: int, levels: int | None) -> None:
    """Print the peak resident memory above the baseline during one compress + decompress,
    sampled every ~0.2 ms by a thread (large buffers are mmapped, so RSS tracks them)."""
    make, _, _ = frame(framework)
    x = make(mb * (1 << 20) // 4)
    comp = make_compressor(name, protocol, levels)
    comp.collectives = LOCAL
    enc, dec = ((comp.compress, comp.decompress) if protocol == "allreduce"
                else (comp.compress_for_allgather, comp.decompress_gathered))
    dec(*enc(make(4096)))  # warm the code paths before the baseline
    base, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.0002)

    t = threading.Thread(target=sample)
    t.start()
    out = dec(*enc(x))
    done.set()
    t.join()
    del out
    print(max(peak[0], _rss_mb()) - base)


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
    ap.add_argument("--levels", type=int, default=None, help="non-zero levels s (default: 4 bits)")
    ap.add_argument("--elias", action="store_true", help="add QSGD's Elias-coded payload as protocol 'elias'")
    ap.add_argument("--memory", action="store_true", help="also measure peak extra memory (subprocesses)")
    ap.add_argument("--rss-probe", nargs=3, metavar=("SCHEME", "PROTOCOL", "MB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_probe:
        return rss_probe(args.framework, args.rss_probe[0], args.rss_probe[1], int(args.rss_probe[2]),
                         args.levels)
    make, clone, _ = frame(args.framework)
    print(f"{'size':>6s} {'scheme':10s} {'protocol':9s} {'compress':>9s} {'decompress':>10s} "
          f"{'both GB/s':>9s} {'clone GB/s':>10s} {'ratio':>6s}" + ("  peak extra MB" if args.memory else ""))
    for mb in args.sizes_mb:
        n = mb * (1 << 20) // 4
        x = make(n)
        best_of(lambda x=x: clone(x), args.repeats)  # let the allocator settle (the first row read high)
        for name in args.schemes:
            protocols = ("allreduce", "allgather") + (("elias",) if args.elias and name == "qsgd" else ())
            for protocol in protocols:
                if protocol == "allgather" and name == "globalqsgd":
                    continue
                comp = make_compressor(name, protocol, args.levels)
                comp.collectives = LOCAL
                if protocol == "allreduce":
                    enc, dec = comp.compress, comp.decompress
                else:
                    enc, dec = comp.compress_for_allgather, comp.decompress_gathered
                payload, ctx = enc(x)
                t_clone = best_of(lambda x=x: clone(x), args.repeats)  # re-measured: load drifts
                t_enc = best_of(lambda enc=enc, x=x: enc(x), args.repeats)
                t_dec = best_of(lambda dec=dec, p=payload, c=ctx: dec(p, c), args.repeats)
                gb = 4 * n / 1e9
                both = gb / (t_enc + t_dec)
                mem = (f"  {peak_extra_mb(args.framework, name, protocol, mb, args.levels):12.1f}"
                       if args.memory else "")
                print(f"{mb:4d}MB {name:10s} {protocol:9s} {gb / t_enc:8.3f}  {gb / t_dec:9.3f}  "
                      f"{both:9.3f} {gb / t_clone:10.3f} {both / (gb / t_clone):6.2f}{mem}", flush=True)
    print("GB/s = float32 input bytes per second; ratio = (compress + decompress) vs clone")


if __name__ == "__main__":
    main()
