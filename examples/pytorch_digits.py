"""Data-parallel MLP on sklearn's digits with Horovod + horovod_nuq gradient quantization (PyTorch).

    horovodrun -np 2 -H localhost:2 python examples/pytorch_digits.py --compression nuq
    mpirun -np 2 python examples/pytorch_digits.py --compression qsgd --protocol allgather
    mpirun -np 2 python examples/pytorch_digits.py --compression nuq --synthetic   # img/sec

Horovod's own hvd.DistributedOptimizer with the compressor line only (--optimizer horovod,
the default) or horovod_nuq.torch.DistributedOptimizer (--optimizer horovod_nuq, same
signature); either carries --protocol allgather (per-rank bit-packed codes), allreduce
(summable words) or auto (default: the cheaper of the two for this many ranks).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import horovod.torch as hvd


def digits_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def synthetic_model() -> nn.Module:
    # ~9.4M parameters: 3x32x32 input -> 2048 -> 1024 -> 1000 classes
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2048), nn.ReLU(),
                         nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 1000))


def distributed_optimizer(args, model: nn.Module, opt: torch.optim.Optimizer, compression):
    if args.optimizer == "horovod_nuq":
        import horovod_nuq.torch as nuq_torch

        return nuq_torch.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                              compression=compression, op=hvd.Average)
    return hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                    compression=compression, op=hvd.Average)


def grad_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy over the whole test set: each rank scores its shard, counts are summed."""
    model.eval()
    with torch.no_grad():
        correct = (model(X).argmax(1) == y).sum().double() if len(X) else torch.zeros((), dtype=torch.float64)
    model.train()
    counts = hvd.allreduce(torch.stack([correct, torch.tensor(float(len(X)), dtype=torch.float64)]),
                           op=hvd.Sum, name="eval_counts")
    return float(counts[0] / counts[1])


def train(args) -> None:
    rank, size = hvd.rank(), hvd.size()
    *arrays, n_steps = common.rank_data(rank, size, args.batch_size)
    Xtr, ytr, Xte, yte = (torch.from_numpy(a) for a in arrays)

    model = digits_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr * size, momentum=0.9)
    compression = common.make_compression(args, hvd)
    opt = distributed_optimizer(args, model, opt, compression)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)

    meter = common.ByteMeter(args.compression, compression, grad_numel(model))
    rep = common.Reporter(args, "pytorch", rank, size, common.describe_compression(args, compression),
                          grad_numel(model), n_steps)
    step = 0
    for epoch in range(1, args.epochs + 1):
        losses = []
        for idx in common.epoch_batches(len(Xtr), args.batch_size, args.seed, epoch, rank):
            idx = torch.from_numpy(idx)
            opt.zero_grad()
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            meter.step()
            step += 1
            avg = hvd.allreduce(loss.detach(), name="loss", op=hvd.Average).item()
            losses.append(avg)
            rep.step(step, epoch, avg, meter)
        acc = evaluate(model, Xte, yte)
        rep.epoch(epoch, float(np.mean(losses)), acc, meter)
    rep.summary(acc, meter, compressor=common.describe_compression(args, compression))


def synthetic(args) -> None:
    rank, size = hvd.rank(), hvd.size()
    model = synthetic_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * size)
    compression = common.make_compression(args, hvd)
    opt = distributed_optimizer(args, model, opt, compression)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    g = torch.Generator().manual_seed(args.seed + rank)
    data = torch.randn(args.synthetic_batch_size, 3, 32, 32, generator=g)
    target = torch.randint(0, 1000, (args.synthetic_batch_size,), generator=g)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(data), target).backward()
        opt.step()

    meter = common.ByteMeter(args.compression, compression, grad_numel(model))
    common.run_throughput(args, step, meter, rank, size,
                          f"MLP 3072-2048-1024-1000 ({grad_numel(model) / 1e6:.1f}M params)",
                          common.describe_compression(args, compression), "pytorch")


def main() -> None:
    args = common.parse_args(common.build_parser(__doc__.splitlines()[0]))
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    (synthetic if args.synthetic else train)(args)


if __name__ == "__main__":
    main()
