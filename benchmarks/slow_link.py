"""Step time of a ~10.5M-parameter model over a shaped (slow) link, per compression and protocol.

Run by benchmarks/slow_link.sh, which makes a private network namespace, shapes its loopback
with `tc ... tbf` and starts this script under `mpirun --mca btl self,tcp` (no shared memory),
once per (rate, ranks):

    bash benchmarks/slow_link.sh                       # 100mbit and 1gbit, N = 2 and 4

Every rank trains the same synthetic step (an MLP 3072 -> 2048 -> 2048 -> 10 on a batch of
random 3x32x32 "images") through horovod_nuq.torch.DistributedOptimizer for each configuration:
none (float32), fp16 (hvd.Compression.fp16), the default NUQCompressor() (protocol "auto": the
optimizer routes whichever protocol moves fewer bytes at this N), the default NUQCompressor() and
QSGDCompressor() through Horovod's own hvd.DistributedOptimizer ("stock": auto, which at small N
gathers the packed codes beside a sentinel; "stock-allreduce": summable words, the scale
agreement started in the backward hook and the words sent from decompress),
qsgd/qsgdinf/nuq/tnq/globalqsgd with protocol "allreduce" (horovod_nuq's optimizer: one scale
agreement per step) and qsgd/qsgdinf/nuq/tnq with protocol "allgather", all other settings at
their defaults; "qsgd-elias/stock" and "qsgd-elias/allgather" are QSGDCompressor(encoding="elias")
(QSGD's Elias-coded payload, gathered) through Horovod's own optimizer and horovod_nuq's.
Configs other than "stock*" run through horovod_nuq.torch.DistributedOptimizer.
Rank 0 prints one table (and appends it to benchmarks/results/slow_link.md and one JSON line per
configuration to benchmarks/results/slow_link.jsonl). `--summarize FILE.jsonl` prints, from those
lines, which protocol wins per scheme as N and the rate change, and the headline ratios.

Columns: step time (mean over the timed steps, rank 0's wall clock; ranks are coupled by the
collectives), images/s (all ranks), bytes/step one rank hands to Horovod (the compressor's
WireStats; numel*4 and numel*2 for none and fp16), speed-ups vs float32 and float16 measured in
the same run, the bytes that actually crossed `lo` per step (all ranks, from /proc/net/dev: proves
the traffic takes the shaped link), link utilisation, and where the time goes on rank 0: codec
(compress + decompress, excluding the scale agreement), agree (time blocked in the compressor's
Max allreduce of the per-bucket scales, which queues behind earlier gradients' transfers) and the
forward/backward compute measured without Horovod with all ranks computing at once.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ["none", "fp16", "nuq/auto", "nuq/stock", "qsgd/stock", "nuq/stock-allreduce",
           "qsgd/stock-allreduce", "qsgd/allreduce", "qsgdinf/allreduce", "nuq/allreduce", "tnq/allreduce",
           "globalqsgd/allreduce", "qsgd/allgather", "qsgdinf/allgather", "nuq/allgather",
           "tnq/allgather", "qsgd-elias/stock", "qsgd-elias/allgather", "hsq/stock"]


# ---- model and step ------------------------------------------------------------------------
def build_model(torch, hidden: int):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def make_batch(torch, batch: int, rank: int):
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)


def train_step(torch, model, opt, x, y) -> None:
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


# ---- timing hooks (no package file is changed: instance attributes / module attribute) -----
class Clock:
    def __init__(self) -> None:
        self.codec = 0.0
        self.agree = 0.0

    def reset(self) -> None:
        self.codec = self.agree = 0.0

    def wrap(self, fn, field: str):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - t)
        return timed


class TimedCompression:
    """Horovod's stateless compressors (none/fp16) with their compress/decompress timed."""

    def __init__(self, inner, clock: Clock) -> None:
        self.compress = clock.wrap(inner.compress, "codec")
        self.decompress = clock.wrap(inner.decompress, "codec")


def make_compression(name: str, hvd, nuq, clock: Clock, bits, engine: str):
    if name in ("none", "fp16"):
        return TimedCompression(getattr(hvd.Compression, name), clock), name, "allreduce"
    scheme, protocol = name.split("/")
    elias = scheme.endswith("-elias")  # QSGD's Elias-coded payload (gathered, as auto picks)
    cls = nuq.COMPRESSORS[scheme.removesuffix("-elias")]
    chosen = {"stock": "auto", "stock-allreduce": "allreduce"}.get(protocol, protocol)
    if cls.gather_only:  # HSQ: sized by codebook and chunk length, not bits; no fused kernels
        comp = cls(protocol=chosen)
    else:
        comp = cls(bits=bits, protocol=chosen, **({"fused": False} if engine == "generic" else {}),
                   **({"encoding": "elias"} if elias else {}))
    if protocol == "stock":
        protocol = f"stock hvd optimizer, auto: {comp.protocol_for(hvd.size())}"
    elif protocol == "stock-allreduce":
        protocol = "stock hvd optimizer, allreduce"
    elif protocol == "auto":
        protocol = f"auto: {comp.protocol_for(hvd.size())}"
    for meth in ("compress", "decompress", "compress_for_allgather", "agree_scales"):
        setattr(comp, meth, clock.wrap(getattr(comp, meth), "codec"))
    return comp, scheme, protocol


def engine_of(comp) -> str:
    """Which codec the compressor runs on host tensors: the fused C kernels or the generic one."""
    if not hasattr(comp, "scheme"):
        return "-"
    try:
        from horovod_nuq import kernels
        lib = kernels.load()
    except ImportError:
        return "generic"
    return "fused C" if lib is not None and getattr(comp, "fused", None) is not False else "generic"


# ---- helpers -------------------------------------------------------------------------------
def lo_sent() -> int | None:
    """Bytes transmitted on this network namespace's loopback (= bytes received on it), or
    None where there is no lo."""
    with open("/proc/self/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    return None


def lo_bytes() -> int:
    return lo_sent() or 0


def load_avg() -> str:
    """The machine's 1-minute load average (other jobs on the machine skew CPU-bound steps)."""
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def agree(hvd, torch, value: float, name: str) -> float:
    """Rank 0's value on every rank (so all ranks take the same number of steps)."""
    return float(hvd.broadcast(torch.tensor([value], dtype=torch.float64), 0, name=name)[0])


def parse_rate(text: str) -> float | None:
    t = text.lower()
    for suffix, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * mult
    return None


def local_compute(torch, hvd, args) -> float:
    """Seconds per forward/backward/SGD step without Horovod, all ranks computing at once."""
    model = build_model(torch, args.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = make_batch(torch, args.batch, hvd.rank())
    hvd.barrier()  # line the ranks up (tiny message)
    train_step(torch, model, opt, x, y)
    t = time.perf_counter()
    for _ in range(3):
        train_step(torch, model, opt, x, y)
    return (time.perf_counter() - t) / 3


def run_config(name: str, torch, hvd, nuq, args, clock: Clock) -> dict:
    comp, scheme, protocol = make_compression(name, hvd, nuq, clock, args.bits, args.engine)
    model = build_model(torch, args.hidden)
    numel = sum(p.numel() for p in model.parameters())
    tag = name.replace("/", "_")
    stock = "/stock" in name
    factory = hvd.DistributedOptimizer if stock else nuq.DistributedOptimizer
    opt = factory(torch.optim.SGD(model.parameters(), lr=0.01),
                  named_parameters=[(f"{tag}.{n}", p) for n, p in model.named_parameters()],
                  compression=comp)
    x, y = make_batch(torch, args.batch, hvd.rank())

    def step() -> None:
        train_step(torch, model, opt, x, y)
        if stock:  # Horovod's optimizer does not close the compressor's steps; ours does
            comp.stats.mark_step()

    # warm-up: one step, a second one too when it is cheap; the last one sets the step count
    t = time.perf_counter()
    step()
    est = agree(hvd, torch, time.perf_counter() - t, f"sl.{tag}.w1")
    warm = 1
    if args.warmup > 1 and est < args.cheap_warmup_s:
        for _ in range(args.warmup - 1):
            t = time.perf_counter()
            step()
            warm += 1
        est = agree(hvd, torch, time.perf_counter() - t, f"sl.{tag}.w2")
    steps = int(max(args.min_steps, min(args.max_steps, args.time_budget_s // max(est, 1e-6))))
    clock.reset()
    lo0 = lo_bytes()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    lo = (lo_bytes() - lo0) / steps
    if hasattr(comp, "stats"):
        per_step = comp.stats.steps[-steps:]
        sent = sum(per_step) / len(per_step)
        bits = getattr(comp.scheme, "code_bits", None) or round(8 * sent / numel, 2)  # HSQ: measured
    else:
        sent = numel * (4 if name == "none" else 2)
        bits = 32 if name == "none" else 16
    return {"config": name, "scheme": scheme, "protocol": protocol, "bits": bits, "numel": numel,
            "warmup": warm, "steps": steps, "step_s": dt, "bytes_per_step": sent,
            "lo_bytes_per_step": lo, "codec_s": (clock.codec - clock.agree) / steps,
            "agree_s": clock.agree / steps, "engine": engine_of(comp)}


# ---- output --------------------------------------------------------------------------------
def table(rows: list, meta: dict) -> str:
    base = {r["config"]: r["step_s"] for r in rows if r["config"] in ("none", "fp16")}
    rate = meta["rate_bps"]
    head = (f"### {meta['rate']}, N = {meta['ranks']} ({meta['transport']}; {meta['when']})\n\n"
            f"model: MLP {meta['numel'] / 1e6:.2f}M parameters, batch {meta['batch']}/rank; "
            f"fwd/bwd/SGD alone (all ranks at once): {meta['compute_s']:.3f} s/step; "
            f"codec: {meta['engines']}; cell wall time {meta['cell_s']:.0f} s; machine load average {meta['load']}"
            + (f"; best of {meta['n_rounds']} rounds (all rounds' step times in the last column)"
               if meta["n_rounds"] > 1 else "") + "\n\n"
            "| config | protocol | bits | steps | step s | img/s | bytes/step/rank | vs fp32 | vs fp16 "
            "| lo MB/step | link util | codec s | agree s | compute+codec share |"
            + (" rounds s |" if meta["n_rounds"] > 1 else "") + "\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if meta["n_rounds"] > 1 else "")
            + "\n")
    lines = []
    for r in rows:
        t = r["step_s"]
        v32 = f"{base['none'] / t:.2f}x" if "none" in base else "n/a"
        v16 = f"{base['fp16'] / t:.2f}x" if "fp16" in base else "n/a"
        util = f"{r['lo_bytes_per_step'] * 8 / t / rate:.0%}" if rate else "n/a"
        share = (meta["compute_s"] + r["codec_s"]) / t
        lines.append(f"| {r['scheme']} | {r['protocol']} | {r['bits']} | {r['steps']} | {t:.3f} "
                     f"| {meta['ranks'] * meta['batch'] / t:.1f} | {r['bytes_per_step'] / 1e6:.2f} MB "
                     f"| {v32} | {v16} | {r['lo_bytes_per_step'] / 1e6:.1f} | {util} "
                     f"| {r['codec_s']:.3f} | {r['agree_s']:.3f} | {share:.0%} |"
                     + (f" {' / '.join(f'{x:.2f}' for x in r['rounds'])} |" if meta["n_rounds"] > 1 else ""))
    return head + "\n".join(lines) + "\n"


def summarize(path: str) -> str:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    cells = sorted({(r["rate_bps"] or 0, r["rate"], r["ranks"]) for r in rows})
    by = {(r["rate"], r["ranks"], r["config"]): r for r in rows}
    out = ["### Protocol winner per scheme (step time, same run)\n",
           "| rate | N | scheme | allreduce s | allgather s | winner | by | lo MB/step allreduce / allgather |",
           "|---|---|---|---|---|---|---|---|"]
    for _, rate, n in cells:
        for scheme in ("qsgd", "qsgdinf", "nuq", "tnq"):
            a, g = by.get((rate, n, f"{scheme}/allreduce")), by.get((rate, n, f"{scheme}/allgather"))
            if a and g:
                win = "allreduce" if a["step_s"] <= g["step_s"] else "allgather"
                fast, slow = sorted((a["step_s"], g["step_s"]))
                out.append(f"| {rate} | {n} | {scheme} | {a['step_s']:.3f} | {g['step_s']:.3f} | {win} "
                           f"| {slow / fast:.2f}x | {a['lo_bytes_per_step'] / 1e6:.1f} / "
                           f"{g['lo_bytes_per_step'] / 1e6:.1f} |")
    out += ["", ("### Headline: NUQ vs float32 and float16 (targets at 100mbit, N = 4: >= 3x and >= 1.5x; "
                 "printed, not asserted)\n"), "| rate | N | config | step s | vs fp32 | vs fp16 |", "|---|---|---|---|---|---|"]
    for _, rate, n in cells:
        f32, f16 = by.get((rate, n, "none")), by.get((rate, n, "fp16"))
        labels = {"nuq/auto": " (default NUQCompressor(), horovod_nuq's optimizer)",
                  "nuq/stock": " (default NUQCompressor(), stock hvd.DistributedOptimizer)"}
        for cfg in ("nuq/auto", "nuq/stock", "nuq/allreduce", "nuq/allgather"):
            r = by.get((rate, n, cfg))
            if r and f32 and f16:
                protocol = f" [{r['protocol']}]" if cfg == "nuq/auto" else ""
                out.append(f"| {rate} | {n} | {cfg}{protocol}{labels.get(cfg, '')} "
                           f"| {r['step_s']:.3f} | {f32['step_s'] / r['step_s']:.2f}x "
                           f"| {f16['step_s'] / r['step_s']:.2f}x |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="unshaped", help="label of the link shaping, e.g. 100mbit (for the table)")
    ap.add_argument("--configs", nargs="+", default=CONFIGS, help="subset/order of: " + " ".join(CONFIGS))
    ap.add_argument("--bits", type=int, default=None, help="bits per coordinate (default: each scheme's)")
    ap.add_argument("--hidden", type=int, default=2048, help="hidden width (2048: 10.5M parameters)")
    ap.add_argument("--batch", type=int, default=64, help="images per rank per step")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps (1 when the first takes > --cheap-warmup-s)")
    ap.add_argument("--cheap-warmup-s", type=float, default=4.0)
    ap.add_argument("--min-steps", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--time-budget-s", type=float, default=12.0,
                    help="timed steps per config = budget / warm-up step time, clamped to [min, max]")
    ap.add_argument("--engine", choices=["auto", "generic"], default="auto",
                    help="auto: the package's default codec (fused C kernels when they build); generic: fused=False")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run all configs this many times (interleaved) and keep each one's fastest round")
    ap.add_argument("--transport", default="MPI over TCP on lo", help="label for the table")
    ap.add_argument("--md", default=os.path.join(HERE, "results", "slow_link.md"))
    ap.add_argument("--jsonl", default=os.path.join(HERE, "results", "slow_link.jsonl"))
    ap.add_argument("--summarize", metavar="JSONL", help="print the protocol/headline summary of a run and exit")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.summarize), end="")
        return
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {CONFIGS}")
    netns = os.environ.get("SLOW_LINK_NETNS")
    if netns is None or os.readlink("/proc/self/ns/net") != netns:
        sys.exit("slow_link.py: run me through benchmarks/slow_link.sh (a private network namespace); "
                 f"this process is in {os.readlink('/proc/self/ns/net')}, expected {netns}")

    import horovod.torch as hvd
    import torch

    import horovod_nuq.torch as nuq
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hvd.init()
    clock = Clock()
    t_cell = time.perf_counter()
    compute = agree(hvd, torch, local_compute(torch, hvd, args), "sl.compute")
    load0 = load_avg()
    best: dict = {}
    for rnd in range(args.rounds):
        for name in args.configs:
            r = run_config(name, torch, hvd, nuq, args, clock)
            if hvd.rank() == 0:
                print(f"  [{args.rate} N={hvd.size()} round {rnd + 1}/{args.rounds}] {name:22s} "
                      f"{r['step_s']:7.3f} s/step ({r['warmup']} warm-up + {r['steps']} timed)", flush=True)
            prev = best.get(name)
            r["rounds"] = [*(prev["rounds"] if prev else []), r["step_s"]]
            if prev is None or r["step_s"] < prev["step_s"]:
                best[name] = r
            else:
                prev["rounds"] = r["rounds"]
    rows = [best[name] for name in args.configs]
    if hvd.rank() == 0:
        meta = {"rate": args.rate, "rate_bps": parse_rate(args.rate), "ranks": hvd.size(),
                "batch": args.batch, "numel": rows[0]["numel"], "compute_s": compute,
                "transport": args.transport, "cell_s": time.perf_counter() - t_cell,
                "load": f"{load0} -> {load_avg()}", "n_rounds": args.rounds,
                "engines": ", ".join(sorted({r["engine"] for r in rows} - {"-"})) or "-",
                "when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
        text = table(rows, meta)
        print(text, flush=True)
        os.makedirs(os.path.dirname(args.md), exist_ok=True)
        with open(args.md, "a") as f:
            f.write(text + "\n")
        with open(args.jsonl, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, **{k: meta[k] for k in ("rate", "rate_bps", "ranks", "batch", "compute_s")}}) + "\n")
    hvd.shutdown()


if __name__ == "__main__":
    main()
