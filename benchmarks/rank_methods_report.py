"""Table and plots of a rank_methods sweep, from the JSON lines benchmarks/rank_methods.py wrote.

    python benchmarks/rank_methods_report.py benchmarks/results/rank_methods.jsonl \
        --md benchmarks/results/rank_methods.md --plots benchmarks/results/rank_methods

One table per (rate, N), methods sorted by final validation loss; "time to target" is the
training wall-clock (evaluation excluded) at the first evaluation whose validation loss is at
or below the target: float32's validation loss at --target-frac of its steps, or --target. One
figure per (rate, N): validation loss against steps, against bytes and against wall-clock.
"""
from __future__ import annotations

import argparse
import json
import math


def load(path: str) -> list[dict]:
    """The records, keeping the newest per (method, ranks, rate) (APPEND=1 sweeps add rows)."""
    newest: dict = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                newest[(r["method"], r["ranks"], r["rate"])] = r
    return list(newest.values())


def cells(records: list[dict]) -> list[tuple[str, int]]:
    """The (rate, N) pairs, slowest link first, then by N."""
    keys = {(r["rate"], r["ranks"], r.get("rate_bps") or math.inf) for r in records}
    return [(rate, n) for rate, n, _ in sorted(keys, key=lambda k: (k[2], k[1]))]


def target_for(rows: list[dict], frac: float, fixed: float | None) -> float | None:
    """The loss target of one table: `fixed`, else float32's validation loss at the first
    evaluation at or after `frac` of its steps (so that methods near float32 reach it before
    the end, and time to target shows what their speed buys)."""
    if fixed is not None:
        return fixed
    base = next((r for r in rows if r["method"] == "none" and r["status"] == "ok"), None)
    if base is None:
        return None
    v = base["val"]
    return next(loss for step, loss in zip(v["step"], v["loss"]) if step >= frac * base["steps"])


def reach(rec: dict, target: float | None) -> tuple[float | None, int | None, float | None]:
    """(wall-clock s, step, payload bytes) at the first evaluation at or below `target`."""
    if target is None:
        return None, None, None
    v = rec["val"]
    for i, loss in enumerate(v["loss"]):
        if loss <= target:
            return v["wall_s"][i], v["step"][i], v["bytes"][i]
    return None, None, None


def _fmt(x: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if x is None else format(x, spec)


def table(records: list[dict], rate: str, n: int, frac: float, fixed: float | None) -> str:
    """One markdown table: the methods that ran, best final validation loss first."""
    rows = [r for r in records if r["rate"] == rate and r["ranks"] == n]
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["final_val"])
    if not ok:
        return f"### {rate}, N = {n}\n\nno method ran.\n"
    target = target_for(rows, frac, fixed)
    base = next((r for r in ok if r["method"] == "none"), None)
    first = ok[0]
    cfg = first["config"]
    tgt = ("no target (no float32 run)" if target is None else
           f"{target:.3f} (" + ("fixed" if fixed is not None else f"float32's at {frac:.0%} of its steps") + ")")
    arch = (f"LSTM, embedding {cfg['dim']}, hidden {cfg['hidden']}, {cfg['layers']} layer(s)"
            if cfg.get("arch", "transformer") == "lstm" else
            f"transformer, dim {cfg['dim']}, {cfg['layers']} blocks, {cfg['heads']} heads")
    out = [f"### {rate}, N = {n} ({first['transport']}; {first['when']})\n",
           (f"{first['numel'] / 1e6:.3f}M parameters ({arch}, context "
           f"{cfg['context']}), batch {cfg['batch']} windows/rank, {cfg['steps']} steps of {'SGD' if cfg.get('base') == 'sgd' else 'Adam'} "
           f"(lr {cfg['lr']}), validation over {cfg['val_windows']} held-out windows every "
           f"{cfg['eval_every']} steps; loss target {tgt}. Machine load average "
           f"{min(r['load_start'] for r in ok):.1f}-{max(r['load_end'] for r in ok):.1f} (shared machine: "
           "step times are noisy).\n"),
           ("| rank | method | protocol | final val loss | vs fp32 | bytes/step/rank | MB total/rank "
           "| lo MB/step | s/step | vs fp32 time | time to target s | step | agree |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(ok, 1):
        t, step, _ = reach(r, target)
        b = r["bytes_per_step"]
        lo = r["lo_bytes_per_step"]
        dv = f"{r['final_val'] - base['final_val']:+.3f}" if base else "n/a"
        speed = f"{base['s_per_step'] / r['s_per_step']:.2f}x" if base else "n/a"
        out.append(f"| {i} | {r['method']} | {r['protocol']} | {r['final_val']:.4f} | {dv} "
                   f"| {_fmt(b and b / 1e6, '.3f')}{' MB' if b is not None else ''} "
                   f"| {_fmt(b and b * r['steps'] / 1e6, '.1f')} "
                   f"| {_fmt(lo and lo / 1e6, '.2f')} | {r['s_per_step']:.3f} | {speed} "
                   f"| {_fmt(t, '.1f', 'not reached')} | {_fmt(step, 'd', '-')} "
                   f"| {'yes' if r['models_agree'] else 'no'} |")
    skipped = [r for r in rows if r["status"] != "ok"]
    if skipped:
        out.append("\nNot run: " + "; ".join(f"{r['method']} ({r['reason']})" for r in skipped) + ".")
    return "\n".join(out) + "\n"


def spread(records: list[dict], replicates: list[list[dict]]) -> str:
    """Each replicated method's final validation loss minus float32's in the same sweep, per
    seed (another --seed: other initial weights, data order and rounding draws). The paired
    difference is what ranks methods; its spread over seeds is the noise it must clear."""
    runs = [records, *replicates]
    keys = sorted({(r["rate"], r["ranks"], r["method"]) for rep in replicates for r in rep if r["status"] == "ok"},
                  key=lambda k: (k[1], k[2]))

    def final(run: list[dict], rate: str, n: int, method: str) -> float | None:
        return next((r["final_val"] for r in run if (r["rate"], r["ranks"], r["method"]) == (rate, n, method)
                     and r["status"] == "ok"), None)

    out = ["### Seed spread: final validation loss, and minus float32's of the same seed (seeds: " +
           ", ".join(str(run[0]["config"]["seed"]) for run in runs if run) + ")\n",
           "| rate | N | method | final val loss per seed | vs fp32 per seed | mean vs fp32 | max - min |",
           "|---|---|---|---|---|---|---|"]
    for rate, n, method in keys:
        vals, deltas = [], []
        for run in runs:
            v, base = final(run, rate, n, method), final(run, rate, n, "none")
            if v is not None:
                vals.append(v)
                if base is not None:
                    deltas.append(v - base)
        dtext = (f"{' / '.join(f'{d:+.4f}' for d in deltas)} | {sum(deltas) / len(deltas):+.4f} "
                 f"| {max(deltas) - min(deltas):.4f}") if deltas else "n/a | n/a | n/a"
        out.append(f"| {rate} | {n} | {method} | {' / '.join(f'{v:.4f}' for v in vals)} | {dtext} |")
    return "\n".join(out) + "\n"


def plot(records: list[dict], rate: str, n: int, path: str) -> None:
    """Validation loss against steps, bytes on the link (or handed to Horovod) and wall-clock."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in records if r["rate"] == rate and r["ranks"] == n and r["status"] == "ok"),
                key=lambda r: r["final_val"])
    styles = {"baseline": "-", "scheme": "-", "error feedback": ":", "optimizer": "-."}
    use_lo = all(r["val"]["lo_bytes"][-1] is not None for r in ok)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), sharey=True)
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(ok):
        v = r["val"]
        style = "--" if r["method"].startswith(tuple(f"{s}2" for s in ("qsgd", "nuq", "tnq", "global"))) \
            and r["family"] == "scheme" else styles.get(r["family"], "-")
        kw = {"label": r["method"], "linestyle": style, "color": "black" if r["method"] == "none" else cmap(i % 20),
              "linewidth": 2.2 if r["family"] == "baseline" else 1.3}
        axes[0].plot(v["step"], v["loss"], **kw)
        xs = v["lo_bytes"] if use_lo else v["bytes"]
        if all(x is not None for x in xs):
            axes[1].plot([x / 1e6 for x in xs[1:]], v["loss"][1:], **kw)
        axes[2].plot(v["wall_s"][1:], v["loss"][1:], **kw)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("MB crossing the shaped link (all ranks)" if use_lo else "MB handed to Horovod (one rank)")
    axes[2].set_xlabel("training wall-clock s (rank 0, evaluation excluded)")
    axes[1].set_xscale("log")
    axes[2].set_xscale("log")
    axes[0].set_ylabel("validation loss (nats/byte)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    lo_loss = min(min(r["val"]["loss"]) for r in ok)
    early = sorted(r["val"]["loss"][1] for r in ok if len(r["val"]["loss"]) > 1)  # first evaluation
    if early:  # show the range where most methods are; outliers leave through the top
        axes[0].set_ylim(lo_loss - 0.05, early[len(early) // 2] + 0.3)
    axes[2].legend(fontsize=8, ncol=2, loc="upper right")
    fig.suptitle(f"char-level LSTM LM on the stdlib source, {rate}, N = {n}: methods by final validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl")
    ap.add_argument("--md", help="write the tables here (default: print them)")
    ap.add_argument("--plots", help="write PLOTS_<rate>_N<n>.png per table")
    ap.add_argument("--target-frac", type=float, default=0.75,
                    help="loss target = float32's validation loss at this fraction of its steps")
    ap.add_argument("--target", type=float, help="a fixed loss target instead")
    ap.add_argument("--replicates", nargs="*", default=[], metavar="JSONL",
                    help="sweeps of the same task with other --seed: adds a seed-spread table")
    ap.add_argument("--command", default="", help="the command that produced the records (for the header)")
    args = ap.parse_args(argv)
    records = load(args.jsonl)
    if not records:
        ap.error(f"{args.jsonl} holds no records; run benchmarks/rank_methods.sh first")
    parts = ["# Ranking the communication methods: char-level LM on the standard library's source\n"]
    if args.command:
        parts.append(f"Command: `{args.command}`.\n")
    corpus = records[0].get("corpus", {})
    parts.append(f"Data: {corpus.get('files')} stdlib files (sha256 {corpus.get('sha256_12')}), "
                 f"{corpus.get('train_bytes')} training / {corpus.get('val_bytes')} validation bytes "
                 "(split by file). bytes/step/rank: what one rank hands to Horovod (the compressor's "
                 "WireStats; numel x 4 / x 2 for none / fp16); lo MB/step: all ranks' bytes that crossed "
                 "the shaped loopback (/proc/net/dev in the private namespace), evaluation excluded. "
                 "agree: every rank holds the same weights at the end.\n")
    for rate, n in cells(records):
        parts.append(table(records, rate, n, args.target_frac, args.target))
        if args.plots:
            path = f"{args.plots}_{rate}_N{n}.png"
            plot(records, rate, n, path)
            parts.append(f"![{rate}, N = {n}]({path.rsplit('/', 1)[-1]})\n")
    if args.replicates:
        parts.append(spread(records, [load(p) for p in args.replicates]) +
                     f"\nReplicates read from {', '.join(args.replicates)} (same task, other --seed).\n")
    text = "\n".join(parts)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
