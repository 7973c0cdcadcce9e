"""Local SGD (growing intervals) and CSER next to synchronous SGD on sklearn's digits (PyTorch).

    mpirun -np 2 python examples/pytorch_local_digits.py --method sgd
    mpirun -np 2 python examples/pytorch_local_digits.py --method localsgd --rounds 20
    mpirun -np 2 python examples/pytorch_local_digits.py --method localsgd --rounds 1   # one-shot
    mpirun -np 2 python examples/pytorch_local_digits.py --method cser --compression nuq --bits 2

--compression says what travels: gradients (sgd), model differences (localsgd), updates and
residuals (cser: C1 = --compression, C2 = none, H = --period or the byte-ratio default).
Rank 0 prints the training loss and test accuracy of the ranks' averaged model at the end.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import horovod.torch as hvd
from pytorch_digits import digits_model

import horovod_nuq.torch as nuq


def wrap(args, model, opt, compression, total_steps):
    """The optimizer for --method."""
    named = model.named_parameters()
    if args.method == "sgd":
        return hvd.DistributedOptimizer(opt, named_parameters=named, compression=compression)
    if args.method == "localsgd":
        return nuq.LocalSGD(opt, named, compression=compression, total_steps=total_steps,
                            rounds=args.rounds)
    return nuq.CSER(opt, named, compression=compression, period=args.period)


def averaged_scores(model, Xtr, ytr, Xte, yte) -> tuple[float, float]:
    """Loss on all training data and test accuracy of the ranks' averaged model."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(hvd.allreduce(p.detach(), op=hvd.Average, name=f"final.{i}"))
        loss = hvd.allreduce(F.cross_entropy(model(Xtr), ytr), op=hvd.Average, name="final.loss")
        correct = hvd.allreduce((model(Xte).argmax(1) == yte).sum().double(), op=hvd.Sum, name="final.ok")
        total = hvd.allreduce(torch.tensor(float(len(yte))), op=hvd.Sum, name="final.n")
    return float(loss), float(correct / total)


def main() -> None:
    parser = common.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("sgd", "localsgd", "cser"), default="localsgd")
    parser.add_argument("--rounds", type=int, default=None,
                        help="Local SGD averaging rounds R (default: the number of ranks; 1: one-shot)")
    parser.add_argument("--period", type=int, default=None, help="CSER reset period H")
    args = common.parse_args(parser)
    hvd.init()
    torch.manual_seed(args.seed)
    rank, size = hvd.rank(), hvd.size()
    *arrays, n_steps = common.rank_data(rank, size, args.batch_size)
    Xtr, ytr, Xte, yte = (torch.from_numpy(a) for a in arrays)
    model = digits_model()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    compression = common.make_compression(args, hvd)
    opt = wrap(args, model, torch.optim.SGD(model.parameters(), lr=args.lr * size, momentum=0.9),
               compression, args.epochs * n_steps)
    for epoch in range(1, args.epochs + 1):
        for idx in common.epoch_batches(len(Xtr), args.batch_size, args.seed, epoch, rank):
            idx = torch.from_numpy(idx)
            opt.zero_grad()
            F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
    loss, acc = averaged_scores(model, Xtr, ytr, Xte, yte)
    if rank == 0:
        extra = {"localsgd": lambda: f" rounds={opt.rounds_done}", "cser": lambda: f" period={opt.period}",
                 "sgd": lambda: ""}[args.method]()
        sent = f" sent={compression.stats.total_bytes}B" if hasattr(compression, "stats") else ""
        print(f"RESULT method={args.method} compression={args.compression} ranks={size} "
              f"steps={args.epochs * n_steps}{extra} train_loss={loss:.4f} test_acc={acc:.4f}{sent}")


if __name__ == "__main__":
    main()
