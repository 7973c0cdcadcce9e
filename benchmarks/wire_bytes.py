"""Bytes per training step on the wire, per scheme and protocol, for a ~1M-parameter model.

Run under MPI (numbers depend on the number of ranks for the allreduce protocol):
    mpirun -np 2 python benchmarks/wire_bytes.py
Counts the payload bytes each compressor hands to Horovod during one real optimizer step
(the compressor's own WireStats), next to float32 and float16.
"""
from __future__ import annotations

import argparse

import horovod.torch as hvd
import torch

import horovod_nuq.torch as nuq

SCHEMES = nuq.COMPRESSORS
VARIANTS = {"hsq": [("hsq", {}), ("hsq scalar_bits=32", {"scalar_bits": 32})]}  # (label, options)


def model() -> torch.nn.Module:
    """An MLP of about 1.05M parameters in 6 tensors."""
    return torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 10))


def step_bytes(comp) -> int:
    torch.manual_seed(0)
    net = model()
    opt = nuq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.01),
                                   named_parameters=net.named_parameters(), compression=comp)
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    return comp.stats.steps[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=None, help="bits per coordinate (default: each scheme's)")
    args = ap.parse_args()
    hvd.init()
    params = sum(p.numel() for p in model().parameters())
    f32 = 4 * params
    rows = []
    for name, cls in SCHEMES.items():
        for protocol in ("allreduce", "allgather"):
            if (protocol == "allgather" and cls.shared_scale_only) or (protocol == "allreduce" and cls.gather_only):
                continue
            # HSQ: its default (6-bit scalars) and float32 scalars
            for label, options in VARIANTS.get(name, [(name, {} if cls.gather_only else {"bits": args.bits})]):
                comp = cls(protocol=protocol, **options)
                sent = step_bytes(comp)
                # HSQ has no per-coordinate code: its bits per coordinate of a large tensor
                bits = getattr(comp.scheme, "code_bits", None) or f"{8 * comp.payload_bytes(1 << 20) / (1 << 20):.3f}"
                rows.append((label, protocol, bits, sent, f32 / sent, f32 / 2 / sent))
    if hvd.rank() == 0:
        print(f"model: {params} parameters; ranks: {hvd.size()}; float32 {f32} B/step, float16 {f32 // 2} B/step")
        print("| scheme | protocol | bits | bytes/step sent by one rank | vs float32 | vs float16 |")
        print("|---|---|---|---|---|---|")
        for name, protocol, bits, sent, r32, r16 in rows:
            print(f"| {name} | {protocol} | {bits} | {sent} | {r32:.2f}x | {r16:.2f}x |")


if __name__ == "__main__":
    main()
