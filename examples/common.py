"""Shared pieces of the horovod_nuq examples (PyTorch, TensorFlow 2, Keras).

Nothing here imports a deep-learning framework or Horovod: each example passes its own
`hvd` module where one is needed. What lives here:

- the command line every example accepts (`build_parser` / `parse_args`);
- the digits data set (sklearn's 8x8 digits: ships with scikit-learn, no download),
  split deterministically into train/test and sharded by rank;
- `make_compression`: hvd.Compression.none / fp16, or a horovod_nuq compressor;
- `ByteMeter`: bytes one rank hands to the gradient collectives, for every compression
  (none/fp16 are counted here as numel * 4 / numel * 2; the quantizers count themselves);
- `Reporter`: rank-0 progress lines, the SUMMARY line and the --log-json file;
- `run_throughput`: the timing loop of the --synthetic benchmark mode.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import timeit
from typing import Any, Callable

import numpy as np

from horovod_nuq import COMPRESSORS
from horovod_nuq.policy import PROTOCOLS

SCHEMES = tuple(COMPRESSORS)
COMPRESSIONS = ("none", "fp16", *SCHEMES)


# ---- command line --------------------------------------------------------------------
def build_parser(description: str, *, epochs: int = 15, batch_size: int = 32,
                 lr: float = 0.025) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("gradient compression")
    g.add_argument("--compression", choices=COMPRESSIONS, default="none",
                   help="none/fp16: Horovod's own; the rest: horovod_nuq quantizers")
    g.add_argument("--bits", type=int, default=None,
                   help="bits per coordinate, sign included (quantizers only; default: the "
                        "scheme's default, 4)")
    g.add_argument("--bucket-size", type=int, default=None,
                   help="coordinates sharing one scale (quantizers only; default: 512)")
    g.add_argument("--protocol", choices=PROTOCOLS, default="auto",
                   help="allgather: per-rank bit-packed codes; allreduce: summable words on "
                        "agreed scales; auto: whichever moves fewer bytes at this many ranks")
    g.add_argument("--error-feedback", action="store_true",
                   help="keep each parameter's compression error and add it to its next gradient "
                        "(quantizers only; PyTorch: either optimizer; TF/Keras: --optimizer horovod_nuq, "
                        "since Horovod's own TF tape names no gradient)")
    g.add_argument("--optimizer", choices=("horovod", "horovod_nuq"), default="horovod",
                   help="horovod: Horovod's own DistributedOptimizer/tape with the compressor "
                        "line only; horovod_nuq: horovod_nuq's drop-in with the same signature "
                        "(no sentinel per tensor; one scale agreement per step)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=epochs)
    t.add_argument("--batch-size", type=int, default=batch_size, help="per-rank batch size")
    t.add_argument("--lr", type=float, default=lr,
                   help="per-rank learning rate; scaled by the number of ranks (Horovod convention)")
    t.add_argument("--seed", type=int, default=0,
                   help="seeds model init, shuffling and the quantizers' random rounding")
    t.add_argument("--log-json", metavar="PATH", default=None,
                   help="rank 0 writes per-step loss and bytes, per-epoch accuracy and a summary")
    s = p.add_argument_group("throughput mode")
    s.add_argument("--synthetic", action="store_true",
                   help="benchmark images/sec on random data with a larger model instead of "
                        "training on digits")
    s.add_argument("--num-warmup-batches", type=int, default=3)
    s.add_argument("--num-batches-per-iter", type=int, default=3)
    s.add_argument("--num-iters", type=int, default=5)
    s.add_argument("--synthetic-batch-size", type=int, default=32)
    return p


def say(msg: str) -> None:
    """Print one line in a single write (mpirun --tag-output / horovodrun split separate writes)."""
    sys.stdout.write(f"{msg}\n")
    sys.stdout.flush()


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None, *,
               drop_in: bool = True) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.optimizer == "horovod_nuq" and not drop_in:
        parser.error("--optimizer horovod_nuq: this example has no horovod_nuq drop-in (Horovod's "
                     "tf_keras DistributedOptimizer carries every protocol); leave --optimizer out")
    quantized = args.compression in SCHEMES
    if not quantized and (args.bits is not None or args.bucket_size is not None):
        parser.error(f"--bits/--bucket-size configure a quantizer; --compression {args.compression} "
                     "takes neither")
    if args.protocol == "allgather" and not quantized:
        parser.error(f"--protocol allgather applies to the quantizers only; --compression "
                     f"{args.compression} is Horovod's own and always uses allreduce")
    for name in ("epochs", "batch_size", "num_iters", "num_batches_per_iter", "synthetic_batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    return args


# ---- data --------------------------------------------------------------------------------
def load_digits_split(test_fraction: float = 0.2, split_seed: int = 0):
    """sklearn's digits (1797 x 64), stratified split, standardized with train statistics.

    Returns float32 X_train, int64 y_train, X_test, y_test. Same on every rank and every run
    (the split does not depend on --seed, so runs with different seeds share a test set).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_fraction, random_state=split_seed,
                                          stratify=y)
    mean, std = Xtr.mean(0), Xtr.std(0) + 1.0  # +1: many border pixels are constant 0
    f = lambda a: ((a - mean) / std).astype(np.float32)
    return f(Xtr), ytr.astype(np.int64), f(Xte), yte.astype(np.int64)


def shard(X: np.ndarray, y: np.ndarray, rank: int, size: int, equal: bool = True):
    """Rank `rank`'s strided shard. equal=True trims every shard to len(X) // size rows, so all
    ranks run the same number of steps (Horovod needs every rank to reach every allreduce)."""
    Xs, ys = X[rank::size], y[rank::size]
    if equal:
        n = len(X) // size
        Xs, ys = Xs[:n], ys[:n]
    return Xs, ys


def rank_data(rank: int, size: int, batch_size: int):
    """This rank's train shard (equal sizes on all ranks), test shard, and steps per epoch."""
    Xtr, ytr, Xte, yte = load_digits_split()
    Xtr, ytr = shard(Xtr, ytr, rank, size)
    Xte, yte = shard(Xte, yte, rank, size, equal=False)
    return Xtr, ytr, Xte, yte, batches_per_epoch(len(Xtr), batch_size)


def batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int):
    """Shuffled index batches for one epoch (last one may be short; same count on all ranks)."""
    perm = np.random.default_rng([seed, epoch, rank]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


# ---- compression -------------------------------------------------------------------------
def make_compression(args: argparse.Namespace, hvd: Any, names_gradients: bool = False) -> Any:
    """hvd.Compression.none/fp16 of the given Horovod frontend, or a horovod_nuq compressor.
    names_gradients: the caller reduces through a wrapper that names each gradient (horovod_nuq's
    Keras 3 optimizer), which error feedback needs under TensorFlow."""
    if args.compression == "none":
        return hvd.Compression.none
    if args.compression == "fp16":
        return hvd.Compression.fp16
    kw = {"seed": args.seed, "protocol": args.protocol}
    if args.bits is not None:
        kw["bits"] = args.bits
    if args.bucket_size is not None:
        kw["bucket_size"] = args.bucket_size
    if args.error_feedback:
        if hvd.__name__.startswith("horovod.tensorflow") and args.optimizer == "horovod" \
                and not names_gradients:
            sys.exit("error: --error-feedback with TensorFlow needs --optimizer horovod_nuq: Horovod's "
                     "own tape and tf_keras optimizer do not say which parameter a gradient is")
        kw["error_feedback"] = True
    try:
        comp = COMPRESSORS[args.compression](**kw)
    except ValueError as e:  # e.g. globalqsgd + allgather, or an unsupported bits value
        sys.exit(f"error: --compression {args.compression}: {e}")
    # the protocol actually used (auto resolves by the number of ranks), for routing and the logs
    args.protocol = comp.protocol_for(hvd.size())
    return comp


def describe_compression(args: argparse.Namespace, compression: Any) -> str:
    return repr(compression) if hasattr(compression, "stats") else f"Horovod {args.compression}"


class ByteMeter:
    """Bytes this rank hands to the gradient collectives, and the float32 bytes they replace.

    Quantizers count their own payloads (compressor.stats, including the small Max allreduce
    of the scales in the allreduce protocol); for none / fp16 each step sends every gradient
    at 4 / 2 bytes per element. Call `step()` once after each optimizer step.
    """

    def __init__(self, compression_name: str, compression: Any, grad_numel: int) -> None:
        self.name = compression_name
        self.stats = getattr(compression, "stats", None)
        self.grad_numel = int(grad_numel)
        self.steps = 0
        self.sent = 0
        self.float32 = 0
        self._base = (0, 0)
        self._warned = False
        self._marks = 0
        if self.stats is not None:  # bytes counted before the meter existed are not ours
            self._base = (self.stats.total_bytes, self.stats.total_float32_bytes)

    def step(self) -> int:
        """Close one optimizer step; return the bytes sent during it."""
        self.steps += 1
        before = self.sent
        if self.stats is None:
            self.sent += self.grad_numel * (2 if self.name == "fp16" else 4)
            self.float32 += self.grad_numel * 4
        else:
            # horovod_nuq's optimizer closes the compressor's step itself; Horovod's stock
            # optimizer / tape / Keras do not, so close it here (keeps stats.steps per step).
            if len(self.stats.steps) == self._marks:
                self.stats.mark_step()
            self._marks = len(self.stats.steps)
            self.sent = self.stats.total_bytes - self._base[0]
            self.float32 = self.stats.total_float32_bytes - self._base[1]
            expected = 4 * self.grad_numel * self.steps
            if self.float32 != expected and not self._warned:
                self._warned = True
                print(f"warning: compressor stats count {self.float32} float32 bytes after "
                      f"{self.steps} steps, expected {expected} (= 4 x {self.grad_numel} "
                      "gradient elements per step)", file=sys.stderr)
        return self.sent - before

    @property
    def bytes_per_step(self) -> float:
        return self.sent / self.steps if self.steps else float("nan")

    @property
    def ratio_vs_fp32(self) -> float:
        return self.float32 / self.sent if self.sent else float("nan")

    @property
    def ratio_vs_fp16(self) -> float:
        return self.ratio_vs_fp32 / 2


# ---- reporting -----------------------------------------------------------------------------
class Reporter:
    """Rank-0 progress printing and the --log-json file. On other ranks every call is a no-op."""

    def __init__(self, args: argparse.Namespace, framework: str, rank: int, size: int,
                 compression_desc: str, n_params: int, steps_per_epoch: int) -> None:
        self.args, self.rank, self.size = args, rank, size
        self.active = rank == 0
        self.t0 = time.perf_counter()
        self.log = {
            "framework": framework,
            "config": {**vars(args), "ranks": size, "compressor": compression_desc,
                       "params": int(n_params), "steps_per_epoch": int(steps_per_epoch)},
            "steps": [], "epochs": [], "summary": None,
        }
        if self.active:
            say(f"[{framework}] {size} ranks, {compression_desc}, protocol={args.protocol}, "
                  f"{n_params} params, {args.epochs} epochs x {steps_per_epoch} steps, "
                  f"batch {args.batch_size}/rank, lr {args.lr * size:g}")

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def step(self, step: int, epoch: int, loss: float, meter: ByteMeter) -> None:
        if self.active:
            self.log["steps"].append({"step": step, "epoch": epoch, "loss": float(loss),
                                      "bytes": int(meter.sent), "float32_bytes": int(meter.float32)})

    def epoch(self, epoch: int, loss: float, acc: float, meter: ByteMeter) -> None:
        if not self.active:
            return
        wall = time.perf_counter() - self.t0
        self.log["epochs"].append({"epoch": epoch, "loss": float(loss), "test_acc": float(acc),
                                   "bytes": int(meter.sent), "float32_bytes": int(meter.float32),
                                   "wall_s": wall})
        say(f"epoch {epoch}/{self.args.epochs} loss {loss:.4f} acc {acc:.4f} "
              f"bytes_sent {meter.sent / 1e6:.3f} MB (vs float32 {meter.float32 / 1e6:.3f} MB, "
              f"{meter.ratio_vs_fp32:.1f}x smaller)")

    def summary(self, acc: float, meter: ByteMeter, **extra: Any) -> dict | None:
        if not self.active:
            return None
        wall = time.perf_counter() - self.t0
        s = {"compression": self.args.compression, "protocol": self.args.protocol,
             "ranks": self.size, "epochs": self.args.epochs, "test_acc": float(acc),
             "wall_s": wall, "steps": meter.steps, "bytes_per_step": meter.bytes_per_step,
             "total_bytes": int(meter.sent), "float32_bytes": int(meter.float32),
             "ratio_vs_fp32": meter.ratio_vs_fp32, "ratio_vs_fp16": meter.ratio_vs_fp16, **extra}
        self.log["summary"] = s
        say(f"SUMMARY compression={s['compression']} test_acc={acc:.4f} wall={wall:.1f}s "
              f"bytes/step={meter.bytes_per_step:.0f} ratio_vs_fp32={meter.ratio_vs_fp32:.2f} "
              f"ratio_vs_fp16={meter.ratio_vs_fp16:.2f} protocol={s['protocol']} ranks={self.size}")
        self.write()
        return s

    def write(self) -> None:
        path = self.args.log_json
        if not (self.active and path):
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.log, f, indent=1, default=_json_default)
        os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


# ---- throughput mode -----------------------------------------------------------------------
def run_throughput(args: argparse.Namespace, step_fn: Callable[[], None], meter: ByteMeter,
                   rank: int, size: int, model_desc: str, compression_desc: str,
                   framework: str) -> dict | None:
    """Warm up, then time `num_iters` x `num_batches_per_iter` calls of `step_fn` (one
    optimizer step each), like Horovod's *_synthetic_benchmark.py. Rank 0 prints img/sec."""
    out_line = say if rank == 0 else (lambda msg: None)
    bs = args.synthetic_batch_size
    out_line(f"[{framework} synthetic] model: {model_desc}; batch size: {bs}/rank; ranks: {size}; "
        f"compression: {compression_desc}, protocol={args.protocol}")

    def steps(n: int) -> None:
        for _ in range(n):
            step_fn()
            meter.step()

    out_line("Running warmup...")
    timeit.timeit(lambda: steps(1), number=args.num_warmup_batches)
    out_line("Running benchmark...")
    rates = []
    for i in range(args.num_iters):
        t = timeit.timeit(lambda: steps(args.num_batches_per_iter), number=1)
        rate = bs * args.num_batches_per_iter / t
        out_line(f"Iter #{i}: {rate:.1f} img/sec per rank")
        rates.append(rate)
    mean, conf = float(np.mean(rates)), float(1.96 * np.std(rates))
    out_line(f"Img/sec per rank: {mean:.1f} +-{conf:.1f}")
    out_line(f"Total img/sec on {size} rank(s): {size * mean:.1f} +-{size * conf:.1f}")
    out_line(f"bytes/step per rank: {meter.bytes_per_step:.0f} "
        f"({meter.ratio_vs_fp32:.2f}x smaller than float32, {meter.ratio_vs_fp16:.2f}x vs float16)")
    out = {"img_sec_per_rank": mean, "img_sec_conf": conf, "img_sec_total": size * mean,
           "bytes_per_step": meter.bytes_per_step, "ratio_vs_fp32": meter.ratio_vs_fp32,
           "ratio_vs_fp16": meter.ratio_vs_fp16, "compression": args.compression,
           "protocol": args.protocol, "ranks": size, "model": model_desc}
    if rank == 0 and args.log_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.log_json)), exist_ok=True)
        with open(args.log_json, "w") as f:
            json.dump({"framework": framework, "synthetic": out,
                       "config": {**vars(args), "ranks": size}}, f, indent=1, default=_json_default)
    return out
