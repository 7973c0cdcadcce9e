"""The CUDA path's correctness and speed in one run: `python scripts/gpu_check.py [--out DIR]`.

Correctness (single process, horovod_nuq.collectives.LOCAL): every scheme and protocol, float32 /
float16 / bfloat16, odd sizes, zeros, NaN: payload and output stay on the GPU; the GPU output
equals the CPU (C kernels) decode of the same payload bit for bit, and a CPU-made payload decodes
on the GPU to the CPU's bits; host syncs per call (torch sync debug mode); unbiasedness and exact
variance (z^2 test of tests/unit/test_fused.py). Speed: compress+decompress GB/s (float32 input
bytes / time) at 1..256 MB beside clone and Horovod's fp16 cast. Without a GPU it runs a reduced
mode on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1), or says why it skips.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import horovod_nuq as H
from horovod_nuq import collectives, engines_cuda, kernels, reference
from horovod_nuq.backends import backend_for

collectives.register("torch", collectives.LOCAL)  # single process, no Horovod
DEV = "cuda" if GPU else "cpu"
CLASSES = [H.QSGDCompressor, H.QSGDInfCompressor, H.NUQCompressor, H.TNQCompressor, H.GlobalQSGDCompressor]
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def gpu_comp(cls, **kw):
    """A compressor whose torch tensors take the Triton engine (on CPU: forced, interpreted)."""
    comp = cls(**kw)
    if not GPU:
        tri = engines_cuda.TritonEngine(backend_for(torch.zeros(1)), comp.scheme, comp.codec.tables)
        comp.codec.engine = lambda xp, t: tri
    return comp


def protocols(cls):
    return ["allreduce"] if cls is H.GlobalQSGDCompressor else ["allreduce", "allgather"]


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * rng.random(n) ** 3).astype(np.float32)
    x[rng.random(n) < 0.1] = 0.0
    return x


def count_syncs(fn):
    """fn's result and how many host syncs torch's sync debug mode reported during it."""
    if not GPU:
        return fn(), -1
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message) for w in seen)


def encode(comp, x):
    if comp.protocol == "allreduce":
        return comp.compress(x)
    return comp.compress_for_allgather(x)


def decode(comp, p, ctx):
    return comp.decompress(p, ctx) if comp.protocol == "allreduce" else comp.decompress_gathered(p, ctx)


def ctx_to(ctx, dev):
    return dataclasses.replace(ctx, scale=ctx.scale.to(dev)) if hasattr(ctx, "scale") else ctx


def check_sentinel(cls) -> tuple[bool, str]:
    """Horovod's own optimizers' path: compress() gathers the codes and returns the 3-word
    sentinel on the device; decompress(sentinel) equals the gathered decode of the same draws."""
    x = torch.from_numpy(data(3000)).to(DEV)
    g, twin = gpu_comp(cls, seed=5, protocol="allgather"), gpu_comp(cls, seed=5, protocol="allgather")
    (sentinel, ctx), s_enc = count_syncs(lambda: g.compress(x))
    out, s_dec = count_syncs(lambda: g.decompress(sentinel * 2.0, ctx))  # e.g. op Sum over 2 ranks
    want = 2.0 * twin.decompress_gathered(*twin.compress_for_allgather(x))
    ok = sentinel.device.type == DEV and sentinel.numel() == 3 and torch.equal(out, want)
    return ok, (f"{cls.__name__:22s} sentinel  on-device={sentinel.device.type == DEV} "
                f"equals gathered decode x2={torch.equal(out, want)} syncs enc/dec={s_enc}/{s_dec}")


def check_case(cls, protocol, dtype, n, bucket) -> tuple[bool, str]:
    """One correctness row: devices, bit-exact decodes both ways, encode agreement, syncs."""
    x = torch.from_numpy(data(n)).to(getattr(torch, dtype))
    g = gpu_comp(cls, seed=11, protocol=protocol, bucket_size=bucket)
    c = cls(seed=11, protocol=protocol, bucket_size=bucket)
    xg = x.to(DEV)
    (p, ctx), s_enc = count_syncs(lambda: encode(g, xg))
    out, s_dec = count_syncs(lambda: decode(g, p, ctx))
    ok_dev = p.device.type == DEV and out.device.type == DEV and out.dtype == x.dtype and out.shape == x.shape
    cpu_out = decode(c, p.cpu(), ctx_to(ctx, "cpu"))
    same_gpu_payload = torch.equal(out.cpu(), cpu_out)
    pc, ctxc = encode(c, x)  # the same seed: the same keys
    back = decode(g, pc.to(DEV), ctx_to(ctxc, DEV))
    same_cpu_payload = torch.equal(back.cpu(), decode(c, pc, ctxc))
    match = (p.cpu() == pc).double().mean().item() if p.shape == pc.shape else 0.0
    ok = ok_dev and same_gpu_payload and same_cpu_payload
    row = (f"{cls.__name__:22s} {protocol:9s} {dtype:8s} n={n:<6d} B={bucket:<4d} on-device={ok_dev!s:5s} "
           f"gpu->cpu={same_gpu_payload!s:5s} cpu->gpu={same_cpu_payload!s:5s} payload-equal={match:.4f} "
           f"syncs enc/dec={s_enc}/{s_dec}")
    return ok, row


def check_special(cls, protocol) -> tuple[bool, str]:
    """Zeros decode to zeros; a NaN makes its own bucket (only) non-finite."""
    g = gpu_comp(cls, protocol=protocol)
    z = decode(g, *encode(g, torch.zeros(1500, device=DEV)))
    x = torch.from_numpy(data(1024)).to(DEV)
    x[5] = float("nan")
    y = decode(g, *encode(g, x)).cpu()
    ok = bool((z == 0).all()) and not torch.isfinite(y[:512]).any() and bool(torch.isfinite(y[512:]).all())
    return ok, f"{cls.__name__:22s} {protocol:9s} zeros->0 and NaN bucket only: {ok}"


def check_unbiased(cls, protocol, n, T) -> tuple[bool, str]:
    """mean z^2 over live coordinates within 6 sd of 1, as test_fused_is_unbiased_with_the_exact_variance."""
    x = data(n)
    g = gpu_comp(cls, seed=7, protocol=protocol)
    xg = torch.from_numpy(x).to(DEV)
    outs = np.stack([decode(g, *encode(g, xg)).cpu().numpy() for _ in range(T)]).astype(np.float64)
    var = reference.coordinate_variance(x, g.scheme)
    sc = reference.bucket_scales(x, g.scheme).repeat(g.scheme.bucket_size)[:n]
    target = x if g.scheme.unbiased else np.clip(x, -sc, sc)
    live = var > 0
    z = (outs.mean(0)[live] - target[live]) / np.sqrt(var[live] / T)
    zz, tol = float(np.mean(z * z)), 6 * np.sqrt(2 / live.sum())
    err = ((outs - target) ** 2).sum(1)
    var_ok = abs(err.mean() - var.sum()) < 5 * err.std(ddof=1) / np.sqrt(T)
    ok = abs(zz - 1) < tol and var_ok
    return ok, (f"{cls.__name__:22s} {protocol:9s} T={T} mean z^2={zz:.4f} (|.-1| < {tol:.4f}) "
                f"E|err|^2={err.mean():.5g} vs exact {var.sum():.5g}: {ok}")


def guarded(fn, *args) -> tuple[bool, str]:
    """fn(*args), or a failed row naming the exception (one broken case does not end the run)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001  (reported as a failure)
        return False, f"{getattr(fn, '__name__', fn)}{args}: {type(e).__name__}: {str(e)[:300]}"


def correctness(full: bool) -> bool:
    say("== correctness ==")
    good = True
    sizes = [(2001, 512), (1, 512), (7, 300), (1000, 300), (0, 512)] if full else [(2001, 512), (7, 300)]
    for cls in CLASSES:
        for protocol in protocols(cls):
            dts = ["float32", "float16", "bfloat16"] if full or cls is H.NUQCompressor else ["float32"]
            for dtype in dts:
                for n, b in (sizes if dtype == "float32" else sizes[:1]):
                    ok, row = guarded(check_case, cls, protocol, dtype, n, b)
                    good &= ok
                    say(("ok   " if ok else "FAIL ") + row)
            ok, row = guarded(check_special, cls, protocol)
            good &= ok
            say(("ok   " if ok else "FAIL ") + row)
        if cls is not H.GlobalQSGDCompressor:
            ok, row = guarded(check_sentinel, cls)
            good &= ok
            say(("ok   " if ok else "FAIL ") + row)
    for cls in CLASSES:
        for protocol in protocols(cls):
            ok, row = guarded(check_unbiased, cls, protocol, 2000 if full else 600, 400 if full else 60)
            good &= ok
            say(("ok   " if ok else "FAIL ") + row)
    say(f"correctness: {'ALL OK' if good else 'FAILURES'}")
    return good


def timed(fn, iters: int) -> float:
    """Seconds per call of fn, by CUDA events over `iters` calls after warm-up."""
    for _ in range(3):
        fn()
    if not GPU:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def stage_breakdown(x, iters: int) -> None:
    """Each NUQ kernel alone: time and the bandwidth of the bytes it reads and writes."""
    n = x.numel()
    comp = gpu_comp(H.NUQCompressor, protocol="allgather", seed=1)
    eng = comp.codec.engine(backend_for(x), x)
    eng.check_errors = False
    nb, layout = -(-n // comp.scheme.bucket_size), comp.codec.layout(1)

    class Keys:
        def key(self):
            return 99

    w, r = eng.scales(x, n)
    codes, words = eng.encode_codes(w, r, Keys()), eng.encode_sums(w, r, layout, Keys())
    acc = eng.decode_codes(codes, r, nb, None)
    cb, wb = codes.numel(), words.numel() * 8
    rows = [("scales", lambda: eng.scales(x, n), 4 * n),
            ("encode_codes", lambda: eng.encode_codes(w, r, Keys()), 4 * n + cb),
            ("encode_sums", lambda: eng.encode_sums(w, r, layout, Keys()), 4 * n + wb),
            ("decode_codes first", lambda: eng.decode_codes(codes, r, nb, None), cb + 4 * n),
            ("decode_codes accumulate", lambda: eng.decode_codes(codes, r, nb, acc), cb + 8 * n),
            ("decode_sums", lambda: eng.decode_sums(words, r, layout, nb), wb + 4 * n)]
    say(f"   stage breakdown (NUQ, {4 * n / 2**20:.0f} MB float32): time, bytes moved / time")
    for name, fn, nbytes in rows:
        t = timed(fn, iters)
        k = eng.launched.get(name.split()[0])
        regs = f"  {getattr(k, 'n_regs', '?')} registers, {getattr(k, 'n_spills', '?')} spills" if GPU else ""
        say(f"   {name:24s} {t * 1e6:9.1f} us {nbytes / t / 1e9:8.1f} GB/s  host {host_time(fn, iters) * 1e6:5.1f} us"
            + regs)
    eng.check_errors = True


def speed(sizes_mb: list[float]) -> None:
    say("== speed: GB/s of float32 input (numel * 4 bytes / time); % = of the clone's ==")
    say("kernels: the engine's stages back to back, error flags not read (GPU time of the fused kernels);")
    say("engine: the same with the flag reads; api: Compressor.compress + decompress (allreduce: scale")
    say("agreed inside, as under hvd.DistributedOptimizer; allgather: compress_for_allgather + decompress_gathered);")
    say("host us: host time to launch the kernels of one call (above the GPU time: launch-bound)")
    say(f"{'size':>7s} {'clone':>8s} {'fp16 cast':>9s}  {'scheme':6s} {'protocol':9s} {'kernels':>8s} "
        f"{'%':>5s} {'engine':>8s} {'%':>5s} {'api':>8s} {'%':>5s} {'host us':>7s}")

    for mb in sizes_mb:
        bench_size(mb)


class _Keys:
    def key(self):
        return 12345


def host_time(fn, iters: int) -> float:
    """Seconds of host time per call of fn (launches only; the GPU may still be busy after)."""
    if GPU:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t = (time.perf_counter() - t0) / iters
    if GPU:
        torch.cuda.synchronize()
    return t


def bench_combo(x, comp, protocol: str, iters: int) -> tuple[float, float, float, float]:
    """Seconds per compress+decompress: kernels alone, engine stages with flag reads, full API;
    and the host's launch time per call of the kernels alone."""
    n = x.numel()
    eng = comp.codec.engine(backend_for(x), x)
    nb, layout = -(-n // comp.scheme.bucket_size), comp.codec.layout(1)

    def stages():
        w, r = eng.scales(x, n)
        if protocol == "allreduce":
            return eng.decode_sums(eng.encode_sums(w, r, layout, _Keys()), r, layout, nb)
        return eng.finish_codes(eng.decode_codes(eng.encode_codes(w, r, _Keys()), r, nb, None), x, nb)

    eng.check_errors = False
    t_k = timed(stages, iters)
    t_h = host_time(stages, iters)
    eng.check_errors = True
    t_e = timed(stages, iters)
    t_a = timed(lambda: decode(comp, *encode(comp, x)), iters)
    return t_k, t_e, t_a, t_h


def bench_size(mb: float) -> None:
    """One size's rows of the speed table."""
    n = int(mb * 2**20) // 4
    x = torch.randn(n, device=DEV)
    iters = max(3, min(200, int(4e9 / (n * 4)))) if GPU else 2
    gb = n * 4 / 1e9
    t_clone = timed(lambda: x.clone(), iters)
    t_half = timed(lambda: x.half().float(), iters)
    head = f"{mb:5.0f}MB {gb / t_clone:8.1f} {gb / t_half:9.1f}"
    for name, cls in (("nuq", H.NUQCompressor), ("qsgd", H.QSGDCompressor)):
        for protocol in ("allreduce", "allgather"):
            try:
                times = bench_combo(x, gpu_comp(cls, protocol=protocol, seed=1), protocol, iters)
            except Exception as e:  # noqa: BLE001  (reported in the table)
                say(f"{head}  {name:6s} {protocol:9s} FAILED: {type(e).__name__}: {str(e)[:300]}")
                continue
            say(f"{head}  {name:6s} {protocol:9s} " + " ".join(
                f"{gb / t:8.1f} {100 * t_clone / t:5.0f}" for t in times[:3]) + f" {times[3] * 1e6:7.0f}")
            head = " " * len(head)
    if GPU and mb == 64:  # the generic engine on the same tensor, for scale
        for protocol in ("allreduce", "allgather"):
            comp = H.NUQCompressor(protocol=protocol, seed=1, fused=False)
            t_g = timed(lambda c=comp: decode(c, *encode(c, x)), 3)
            say(f"{head}  nuq    {protocol:9s} generic engine (fused=False) api: {gb / t_g:8.1f} "
                f"{100 * t_clone / t_g:5.0f}")
    if mb >= 256 or not GPU:
        stage_breakdown(x, iters)


def tune(mb: float = 256) -> None:
    """Time each stage kernel at a few launch shapes; keep each stage's fastest (summed over NUQ
    and QSGD) for the speed table."""
    n = int(mb * 2**20) // 4
    x = torch.randn(n, device=DEV)
    T = engines_cuda.TritonEngine
    default = dict(T.SHAPES)
    say(f"== launch shapes ({mb:.0f} MB float32; us per call; NUQ + QSGD) ==")
    engs, engines = [], []
    for cls in (H.NUQCompressor, H.QSGDCompressor):
        comp = gpu_comp(cls, protocol="allgather", seed=1)
        eng = comp.codec.engine(backend_for(x), x)
        eng.check_errors = False
        engines.append(eng)
        nb, lay = -(-n // comp.scheme.bucket_size), comp.codec.layout(1)
        w, r = eng.scales(x, n)
        codes, words = eng.encode_codes(w, r, _Keys()), eng.encode_sums(w, r, lay, _Keys())
        engs.append({"encode_codes": lambda e=eng, w=w, r=r: e.encode_codes(w, r, _Keys()),
                     "encode_sums": lambda e=eng, w=w, r=r, lay=lay: e.encode_sums(w, r, lay, _Keys()),
                     "decode_codes": lambda e=eng, c=codes, r=r, nb=nb: e.decode_codes(c, r, nb, None),
                     "decode_sums": lambda e=eng, p=words, r=r, lay=lay, nb=nb: e.decode_sums(p, r, lay, nb)})
    best = {}
    for stage in default:
        cells = []
        for variant in ((False, True) if stage == "decode_sums" else (False,)):
            for elems in (512, 1024, 2048, 4096):
                for warps in (2, 4, 8):
                    T.SHAPES = {**default, stage: (elems, warps, variant)}
                    t = sum(timed(fns[stage], 10) for fns in engs)
                    cells.append(f"{elems}/{warps}{'/w' if variant else ''}={t * 1e6:.0f}")
                    if stage not in best or t < best[stage][0]:
                        best[stage] = (t, (elems, warps, variant))
        say(f"{stage:13s} " + " ".join(cells))
    T.SHAPES = {stage: shape for stage, (_, shape) in best.items()}
    say(f"chosen: {T.SHAPES}")
    for eng in engines:
        eng.check_errors = True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the report to DIR/gpu_check.txt")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--tune", action="store_true", help="try launch shapes first, time with the best")
    args = ap.parse_args()
    if not engines_cuda.available():
        print("gpu_check: triton is not installed; nothing to check")
        return 0
    if kernels.load() is None:
        print("gpu_check: no C compiler for the CPU reference kernels; nothing to compare against")
        return 0
    import triton

    name = torch.cuda.get_device_name() if GPU else "none (CPU tensors, Triton interpreter, reduced sizes)"
    say(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}")
    t0 = time.time()
    good = correctness(full=GPU)
    say(f"(correctness took {time.time() - t0:.0f} s)")
    if args.tune:
        tune(256 if GPU else 0.0625)
    if not args.skip_speed:
        speed([1, 16, 64, 256] if GPU else [0.0625])
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.txt").write_text("\n".join(LINES) + "\n")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
