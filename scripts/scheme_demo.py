"""Quantize one gradient-like tensor per rank with every scheme and protocol; print a table.

    mpirun -np 2 python scripts/scheme_demo.py
Columns: bits per coordinate actually handed to Horovod by one rank, and the relative error
of the decoded average against the exact (float64) average of the ranks' tensors.
"""
from __future__ import annotations

import horovod.torch as hvd
import torch

import horovod_nuq.torch as nuq

# (label, factory, protocols): every compressor of the package, Elias-coded QSGD and HSQ included
SCHEMES = [(cls.__name__, cls, ("allreduce", "allgather")) for cls in
           (nuq.QSGDCompressor, nuq.QSGDInfCompressor, nuq.NUQCompressor, nuq.TNQCompressor)]
SCHEMES += [("GlobalQSGDCompressor", nuq.GlobalQSGDCompressor, ("allreduce",)),
            ("QSGD(levels=1, elias)", lambda **k: nuq.QSGDCompressor(levels=1, encoding="elias", **k),
             ("allgather",)),
            ("HSQCompressor", nuq.HSQCompressor, ("allgather",)),
            ("HSQ(scalar_bits=32)", lambda **k: nuq.HSQCompressor(scalar_bits=32, **k), ("allgather",))]


def reduce(comp, g: torch.Tensor) -> torch.Tensor:
    if comp.protocol == "allreduce":
        return hvd.allreduce(g, compression=comp)
    payload, ctx = comp.compress_for_allgather(g)
    return comp.decompress_gathered(hvd.allgather(payload), ctx)


def main() -> None:
    hvd.init()
    d = 1 << 20
    gen = torch.Generator().manual_seed(hvd.rank())
    g = torch.randn(d, generator=gen) * torch.rand(d, generator=gen) ** 4  # heavy-ish tails
    exact = hvd.allreduce(g.double(), op=hvd.Average)
    rows = []
    for label, make, protocols in SCHEMES:
        for protocol in protocols:
            comp = make(seed=0, protocol=protocol)
            out = reduce(comp, g)
            err = float((out.double() - exact).norm() / exact.norm())
            same = hvd.allgather(out.view(1, -1)).unique(dim=0).shape[0] == 1
            rows.append((label, protocol, 8 * comp.stats.total_bytes / d, err, same))
    if hvd.rank() == 0:
        print(f"{hvd.size()} ranks, {d} float32 coordinates each (float32 = 32 bits, float16 = 16 bits)")
        print(f"{'compressor':22s} {'protocol':10s} {'bits/coord':>10s} {'rel. error':>10s}  identical on all ranks")
        for name, protocol, bits, err, same in rows:
            print(f"{name:22s} {protocol:10s} {bits:10.2f} {err:10.4f}  {same}")


if __name__ == "__main__":
    main()
