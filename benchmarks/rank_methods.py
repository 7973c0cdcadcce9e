"""Rank the communication methods on a task where they differ: a character-level LSTM LM
on the standard library's source (benchmarks/charlm_task.py), trained once per method.

    bash benchmarks/rank_methods.sh                      # the sweep: 100 Mbit/s, N = 2 and 4
    mpirun -np 2 python benchmarks/rank_methods.py --smoke --out /tmp/rm   # quick, unshaped

Every method (benchmarks/rank_methods_registry.py) starts from the same seeded weights
(broadcast from rank 0), sees the same per-rank batch sequence and runs the same number of
steps with Adam (or plain SGD: --base sgd). Per step rank 0 records its training loss, the wall-clock time of the step
(ranks are coupled by the collectives), the bytes this rank handed to Horovod (the compressor's
WireStats; numel * 4 or * 2 for float32 / float16) and, inside the private network namespace of
rank_methods.sh, the bytes that crossed the shaped loopback (all ranks, /proc/net/dev). Every
`--eval-every` steps the validation loss over fixed held-out windows is averaged over the ranks
(evaluation time is not counted as training time). One JSON line per method is appended to
`<out>.jsonl`; benchmarks/rank_methods_report.py turns the lines into the table and plots.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # this checkout's horovod_nuq, not an installed one

import charlm_task as task
import rank_methods_registry as registry
from slow_link import lo_sent, parse_rate

SMOKE = {"dim": 16, "hidden": 32, "layers": 1, "heads": 2, "context": 32, "batch": 4, "steps": 6, "eval_every": 3,
         "val_windows": 8, "methods": ["none", "fp16", "qsgd2", "tnq4", "globalqsgd2", "tnq4+ef", "cser",
                                       "localsgd"]}


def lo_bytes() -> int | None:
    """Bytes sent on loopback, only inside rank_methods.sh's private namespace (else None:
    the host's lo also carries other programs' traffic)."""
    netns = os.environ.get("SLOW_LINK_NETNS")
    if netns is None or os.readlink("/proc/self/ns/net") != netns:
        return None
    return lo_sent()


class Evaluator:
    """Validation loss over fixed windows, averaged over the ranks."""

    def __init__(self, hvd, torch, corpus: task.Corpus, args) -> None:
        self.hvd, self.torch = hvd, torch
        self.x, self.y = task.val_windows(corpus.val, args.val_windows, args.context)

    def __call__(self, model, local_models: bool, tag: str) -> float:
        hvd, torch = self.hvd, self.torch
        rank, size = hvd.rank(), hvd.size()
        # synchronised models: each rank scores a share of the windows; local models: all windows
        x, y = (self.x, self.y) if local_models else (self.x[rank::size], self.y[rank::size])
        with torch.no_grad():
            total = model.loss(x, y).double() * x.shape[0] if x.shape[0] else torch.zeros((), dtype=torch.float64)
        parts = torch.stack([total, torch.tensor(float(x.shape[0]), dtype=torch.float64)])
        s = hvd.allreduce(parts, op=hvd.Sum, name=f"rm.val.{tag}")
        return float(s[0] / s[1])


def models_agree(hvd, torch, model, tag: str) -> bool:
    """Whether every rank holds the same weights (a float64 checksum of every parameter)."""
    with torch.no_grad():
        sums = torch.stack([p.double().sum() for p in model.parameters()] +
                           [(p.double() * torch.arange(p.numel(), dtype=torch.float64).view_as(p)).sum()
                            for p in model.parameters()])
    gathered = hvd.allgather(sums[None], name=f"rm.agree.{tag}")
    return bool((gathered == gathered[0]).all())


def run_method(method: registry.Method, hvd, nuq, torch, corpus: task.Corpus, evaluate: Evaluator, args) -> dict:
    """Train one method from the common initial weights; its record (rank 0 writes it)."""
    rank, size = hvd.rank(), hvd.size()
    torch.manual_seed(args.seed)
    model = task.build_model(args.arch, args.dim, args.hidden, args.layers, args.heads, args.context)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    numel = sum(p.numel() for p in model.parameters())
    tag = method.name.replace("+", "_")
    ctx = registry.Context(hvd=hvd, nuq=nuq, numel=numel, seed=args.seed, steps=args.steps,
                           named_parameters=[(f"{tag}.{n}", p) for n, p in model.named_parameters()],
                           base=lambda: base_optimizer(torch, model, args))
    head = {"method": method.name, "family": method.family, "describe": method.describe,
            "ranks": size, "rate": args.rate, "rate_bps": parse_rate(args.rate), "numel": numel}
    try:
        built = method.build(ctx)
    except registry.Unavailable as exc:
        return {**head, "status": "unavailable", "reason": str(exc)}
    comp, opt = built.compressor, built.optimizer
    protocol = (comp.protocol_for(size) if comp is not None else
                "allreduce" if built.fixed_bytes_per_step is not None else "-")
    batches = task.Batches(task.shard(corpus.train, rank, size), args.batch, args.context,
                           seed=args.seed * 1000 + rank)
    series = {k: [] for k in ("step", "train_loss", "wall_s", "bytes", "lo_bytes")}
    val = {k: [] for k in ("step", "loss", "wall_s", "bytes", "lo_bytes")}

    def bytes_so_far(step: int) -> int | None:
        if comp is not None:
            return comp.stats.total_bytes
        return None if built.fixed_bytes_per_step is None else built.fixed_bytes_per_step * step

    def record_val(step: int) -> None:
        val["step"].append(step)
        val["loss"].append(evaluate(model, built.local_models, f"{tag}.{step}"))
        val["wall_s"].append(series["wall_s"][-1] if step else 0.0)
        val["bytes"].append(series["bytes"][-1] if step else (None if bytes_so_far(0) is None else 0))
        val["lo_bytes"].append(series["lo_bytes"][-1] if step else (None if lo_bytes() is None else 0))

    record_val(0)
    base_bytes = bytes_so_far(0) or 0
    wall, lo_sum = 0.0, 0
    for step in range(1, args.steps + 1):
        x, y = batches.next()
        lo0 = lo_bytes()
        t = time.perf_counter()
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        wall += time.perf_counter() - t
        lo1 = lo_bytes()  # read per step, so that validation traffic is not counted
        lo_sum = None if lo0 is None or lo1 is None or lo_sum is None else lo_sum + lo1 - lo0
        b = bytes_so_far(step)
        series["step"].append(step)
        series["train_loss"].append(float(loss.detach()))
        series["wall_s"].append(wall)
        series["bytes"].append(None if b is None else b - base_bytes)
        series["lo_bytes"].append(lo_sum)
        if step % args.eval_every == 0 or step == args.steps:
            record_val(step)
    sent = series["bytes"][-1]
    lo_total = series["lo_bytes"][-1]
    return {**head, "status": "ok", "protocol": protocol, "steps": args.steps,
            "final_val": val["loss"][-1], "s_per_step": wall / args.steps,
            "bytes_per_step": None if sent is None else sent / args.steps,
            "lo_bytes_per_step": None if lo_total is None else lo_total / args.steps,
            "models_agree": models_agree(hvd, torch, model, tag), "local_models": built.local_models,
            "series": series, "val": val}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(registry.METHODS),
                    help="subset/order of: " + " ".join(registry.METHODS))
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--val-windows", type=int, default=64, help="held-out windows of --context bytes")
    ap.add_argument("--arch", choices=task.ARCHS, default="lstm",
                    help="lstm (default: its loss falls smoothly, see charlm_task) or transformer")
    ap.add_argument("--dim", type=int, default=64, help="embedding width (transformer: model width)")
    ap.add_argument("--hidden", type=int, default=192, help="LSTM hidden size")
    ap.add_argument("--layers", type=int, default=1, help="LSTM layers / transformer blocks")
    ap.add_argument("--heads", type=int, default=4, help="transformer attention heads")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="windows per rank per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="the base optimizer's learning rate (all methods, all N)")
    ap.add_argument("--base", choices=("adam", "sgd"), default="adam",
                    help="base optimizer: Adam, or plain SGD (the setting of EF-SGD's analysis; try --lr 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", default="unshaped", help="label of the link shaping, e.g. 100mbit")
    ap.add_argument("--transport", default="MPI over TCP on lo", help="label for the table")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "rank_methods"),
                    help="appends one JSON line per method to OUT.jsonl")
    ap.add_argument("--smoke", action="store_true",
                    help=f"a tiny model and few steps (sets {', '.join(k for k in SMOKE if k != 'methods')}; "
                         "--methods defaults to a few)")
    args = ap.parse_args(argv)
    if args.smoke:
        explicit = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for k, v in SMOKE.items():
            if k not in explicit:
                setattr(args, k, v)
    for name in ("steps", "eval_every", "val_windows", "batch", "context", "dim", "hidden", "layers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        args.selected = registry.select(args.methods)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def base_optimizer(torch, model, args):
    """The optimizer every method wraps: Adam (default) or plain SGD."""
    if args.base == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr)
    return torch.optim.Adam(model.parameters(), lr=args.lr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import horovod.torch as hvd
    import torch

    import horovod_nuq.torch as nuq
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hvd.init()
    corpus = task.load_corpus()
    evaluate = Evaluator(hvd, torch, corpus, args)
    config = {k: getattr(args, k) for k in ("steps", "base", "eval_every", "val_windows", "arch", "dim", "hidden",
                                            "layers", "heads", "context", "batch", "lr", "seed")}
    meta = {"when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "transport": args.transport,
            "horovod_nuq": os.path.dirname(os.path.dirname(nuq.__file__)),
            "corpus": {"files": corpus.files, "train_bytes": corpus.train.numel(),
                       "val_bytes": corpus.val.numel(), "sha256_12": corpus.digest},
            "config": config, "load_start": os.getloadavg()[0]}
    for method in args.selected:
        rec = run_method(method, hvd, nuq, torch, corpus, evaluate, args)
        if hvd.rank() != 0:
            continue
        if rec["status"] == "ok":
            lo = rec["lo_bytes_per_step"]
            print(f"  [{args.rate} N={hvd.size()}] {method.name:14s} val {rec['final_val']:.4f}  "
                  f"{rec['s_per_step']:.3f} s/step  "
                  + (f"{rec['bytes_per_step'] / 1e6:.3f} MB/step/rank" if rec["bytes_per_step"] is not None else "")
                  + (f"  lo {lo / 1e6:.2f} MB/step" if lo is not None else "")
                  + ("" if rec["models_agree"] else "  (ranks' models differ at the end)"), flush=True)
        else:
            print(f"  [{args.rate} N={hvd.size()}] {method.name:14s} skipped: {rec['reason']}", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".jsonl", "a") as f:
            f.write(json.dumps({**rec, **meta, "load_end": os.getloadavg()[0]}) + "\n")
    hvd.shutdown()


if __name__ == "__main__":
    main()
