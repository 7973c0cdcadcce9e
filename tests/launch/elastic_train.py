"""Elastic Horovod training with a horovod_nuq compressor while the world changes size.

Run by tests/launch/test_elastic.py under `horovodrun --gloo --host-discovery-script ...`.
The discovery script prints `localhost:<k>` with k read from `--hosts-file`; rank 0 rewrites
that file after every `--phase-steps` steps (k taken from `--schedule`), waits until the
driver announces the change and commits, which makes every rank reset onto the new world.

Rank 0 prints one JSON line per step (`STEP {...}`); every rank prints `CHECK <name> ok|FAIL
...` lines for what it verifies, and exits 1 at the end if any check failed:
- bytes: the bytes the compressor handed to Horovod in the step equal its byte model for the
  current world size (payload layout and, for protocol "auto", the protocol follow the size);
- values: a stock hvd.allreduce(compression=...) over the new world decodes to an unbiased
  estimate of the ranks' average (least-squares factor 1 within noise), identical on every
  rank (each time the ranks enter the training function, i.e. in every new world);
- streams: with the same input and seed on every rank, the ranks' rounding errors are
  uncorrelated (likewise, in every world of 2+ ranks);
With `--fail-step`, rank 0 also fails once in the middle of a step (a HorovodInternalError
after backward): the operations the compressor started are abandoned and the step is retried.
- slots: after every step no horovod_nuq operation is left in flight (named slots freed);
- weights: at the end, every rank holds bit-identical weights (allgather of a digest).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

import horovod.torch as hvd
import numpy as np
import torch
from horovod.common.exceptions import HorovodInternalError

import horovod_nuq as nuq
from horovod_nuq.torch.collectives import COLLECTIVES

SENTINEL_BYTES = 24  # the 3 float64 words Horovod reduces beside each compressed tensor

parser = argparse.ArgumentParser()
parser.add_argument("--hosts-file", required=True, help="file the discovery script reads the slot count from")
parser.add_argument("--schedule", default="3,1,2", help="slot counts rank 0 writes, one per phase end")
parser.add_argument("--phase-steps", type=int, default=3, help="training steps per world")
parser.add_argument("--compressor", default="nuq-auto", choices=["nuq-auto", "qsgd-allreduce"])
parser.add_argument("--fail-step", type=int, default=-1,
                    help="rank 0 raises HorovodInternalError once, mid-step (gradients in flight), at this step")
parser.add_argument("--discovery-wait", type=float, default=30.0,
                    help="seconds rank 0 waits for the driver to announce a host change")
args = parser.parse_args()
schedule = [int(k) for k in args.schedule.split(",") if k]

hvd.init()
torch.manual_seed(0)
if args.compressor == "nuq-auto":
    comp = nuq.NUQCompressor(seed=7)  # protocol "auto": allgather at 2-3 ranks, allreduce at 1
else:
    comp = nuq.QSGDCompressor(seed=7, protocol="allreduce")
# weight: 1200 elements (3 buckets of 512, the last one partial); bias: 4 elements
model = torch.nn.Linear(300, 4)
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                     named_parameters=model.named_parameters(), compression=comp)
TRUE_W = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) / 10
failures: list[str] = []
injected: list[int] = []  # the step at which rank 0 injected its failure (once per process)


def check(name: str, ok: bool, detail: str) -> None:
    print(f"CHECK {name} {'ok' if ok else 'FAIL'} rank={hvd.rank()} size={hvd.size()} {detail}", flush=True)
    if not ok:
        failures.append(f"{name}: {detail}")


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, 300, generator=g)
    return x, x @ TRUE_W.T + 0.01 * torch.randn(32, 4, generator=g)


def expected_bytes(size: int) -> int:
    """The compressor's byte model for one step over `size` ranks: every parameter's payload
    for the protocol it resolves to at that size, plus the sentinel Horovod reduces."""
    return sum(comp.payload_bytes(p.numel(), size) + SENTINEL_BYTES for p in model.parameters())


def check_values(tag: str) -> None:
    """A stock allreduce through the compressor over the current world: the decoded average
    is close to the exact one and identical on every rank."""
    size = hvd.size()
    x = torch.randn(3000, generator=torch.Generator().manual_seed(50 + hvd.rank()))
    exact = hvd.allreduce(x, op=hvd.Average, name=f"elastic.exact.{tag}")
    out = hvd.allreduce(x, op=hvd.Average, name=f"elastic.nuq.{tag}", compression=comp)
    # unbiased rounding: out = exact + noise. The least-squares factor k of out on exact is
    # 1 within rel_err / sqrt(numel) (~0.03 here), while a decode with the wrong layout, rank
    # count or scale is off by 1/3 or more (or garbage: huge rel_err)
    rel = float((out - exact).norm() / exact.norm())
    k = float(out.dot(exact) / exact.dot(exact))
    check("values", bool(torch.isfinite(out).all()) and abs(k - 1) < 0.15 and rel < 3,
          f"protocol={comp.protocol_for(size)} factor={k:.3f} rel_err={rel:.3f}")
    digests = hvd.allgather(torch.tensor([zlib.crc32(out.numpy().tobytes())], dtype=torch.int64),
                            name=f"elastic.valdigest.{tag}")
    check("values-agree", len(set(digests.tolist())) == 1, f"digests={digests.tolist()}")


def check_streams(tag: str) -> None:
    """Same seed and same input on every rank, yet uncorrelated rounding errors: streams are
    keyed by rank, for the workers that keep their compressor through a resize as for those
    that join with a fresh one."""
    size = hvd.size()
    d = 20000
    g = torch.randn(d, generator=torch.Generator().manual_seed(3))
    payload, ctx = comp.compress_for_allgather(g)
    parts = hvd.allgather(payload, name=f"elastic.streams.{tag}").view(size, -1)
    errs = [comp.decompress_gathered(p, ctx, average=False).numpy() - g.numpy() for p in parts]
    worst = max(abs(np.corrcoef(errs[i], errs[j])[0, 1]) for i in range(size) for j in range(i))
    check("streams", worst < 6 / np.sqrt(d), f"max |corr| between ranks = {worst:.4f}")


def weight_digest() -> int:
    return zlib.crc32(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))


@hvd.elastic.run
def train(state: hvd.elastic.TorchState) -> None:
    try:
        _train(state)
    except HorovodInternalError as e:  # elastic Horovod restores the last commit and resets
        print(f"RESET rank={hvd.rank()} size={hvd.size()} after a failed collective: {e}", flush=True)
        raise


def _train(state: hvd.elastic.TorchState) -> None:
    state.rendezvous += 1  # not committed: counts this process's entries (restored on error)
    size, rank = hvd.size(), hvd.rank()
    tag = f"{state.batch}.{size}"
    check_values(tag)  # every (re)entry: a new world, or the same one after an error
    if size > 1:
        check_streams(tag)
    comp.stats.mark_step()  # the bytes of the checks, or of a step an error interrupted
    total = args.phase_steps * (len(schedule) + 1)
    while state.batch < total:
        x, y = batch(state.batch, rank)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if state.batch == args.fail_step and rank == 0 and not injected:
            # the other ranks' collectives fail once rank 0 shuts down; everyone restores the
            # last commit and retries this step in a new Horovod session, and every operation
            # the compressor started in this one (its backward hooks ran) is abandoned
            injected.append(state.batch)
            raise HorovodInternalError(f"injected mid-step failure at step {state.batch}")
        optimizer.step()
        sent = comp.stats.mark_step()
        busy = {f"{kind}.{numel}": sorted(slots) for (kind, numel), slots in COLLECTIVES.in_flight.items()
                if slots}
        if busy or comp._deferred._waiting:  # every operation of the step was waited for
            check("slots", False, f"step {state.batch}: still in flight after step(): {busy}, "
                                  f"{len(comp._deferred._waiting)} deferred")
        want = expected_bytes(size)
        if sent != want:
            check("bytes", False, f"step {state.batch}: sent {sent} bytes, the model for "
                                  f"{size} ranks ({comp.protocol_for(size)}) says {want}")
        state.bytes_checked += 1
        if rank == 0:
            print("STEP " + json.dumps({"step": state.batch, "size": size, "loss": round(loss.item(), 5),
                                        "protocol": comp.protocol_for(size), "sent": sent,
                                        "expected": want}), flush=True)
        state.batch += 1
        if state.batch % args.phase_steps == 0 and state.phase < len(schedule) and state.batch < total:
            slots = schedule[state.phase]
            state.phase += 1
            if rank == 0:
                change_hosts(state, slots)
        state.commit()  # raises HostsUpdatedInterrupt on every rank once the driver saw a change


def change_hosts(state: hvd.elastic.TorchState, slots: int) -> None:
    """Rank 0: let the discovery script report `slots` slots, then wait for the driver's
    notification so that the next commit resets every rank (as Horovod's own elastic tests)."""
    print(f"HOSTS localhost:{slots} after step {state.batch - 1}", flush=True)
    tmp = args.hosts_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{slots}\n")
    os.replace(tmp, args.hosts_file)
    state._last_updated_timestamp = 0  # a notification in the same second still counts
    start = time.monotonic()
    while state._host_messages.empty():
        if time.monotonic() - start > args.discovery_wait:
            raise TimeoutError(f"no host update from the driver {args.discovery_wait}s after "
                               f"writing localhost:{slots}")
        time.sleep(0.05)


state = hvd.elastic.TorchState(model=model, optimizer=optimizer, epoch=0, batch=0, phase=0,
                               rendezvous=0, bytes_checked=0)
train(state)

size = hvd.size()
digests = hvd.allgather(torch.tensor([weight_digest()], dtype=torch.int64), name="elastic.weights")
check("weights", len(set(digests.tolist())) == 1, f"weight digests={digests.tolist()}")
check("finished", state.batch == args.phase_steps * (len(schedule) + 1) and state.bytes_checked > 0,
      f"batch={state.batch} bytes_checked={state.bytes_checked} rendezvous={state.rendezvous}")
if failures:
    print(f"rank {hvd.rank()}: {len(failures)} check(s) failed: {failures}", file=sys.stderr, flush=True)
    sys.exit(1)
