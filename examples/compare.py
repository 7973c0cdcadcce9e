"""Train one digits example once per compression and compare accuracy, bytes and wall time.

    python examples/compare.py                              # pytorch, 2 ranks -> results/
    python examples/compare.py --framework tensorflow --epochs 10   # -> results/tensorflow/
    python examples/compare.py --framework keras3                   # Keras 3 -> results/keras3/
    python examples/compare.py --schemes none,fp16,nuq --protocol allgather --out /tmp/cmp

Each run is `mpirun -np N <this python> examples/<framework>_digits.py --compression C
--log-json ...` in the caller's environment (source scripts/env.sh first). Writes
compare.md (markdown table), compare.csv and three PNG plots (loss vs step, loss vs bytes
sent, test accuracy per epoch) into --out, plus each run's JSON log and console output
under --out/logs/.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common

SCRIPTS = {"pytorch": "pytorch_digits.py", "tensorflow": "tensorflow2_digits.py",
           "keras": "keras_digits.py", "keras3": "keras3_digits.py"}
BAR_POINTS = 1.0  # a scheme "meets the bar" within this many accuracy points of none, with fewer bytes


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--framework", choices=tuple(SCRIPTS), default="pytorch")
    p.add_argument("--np", type=int, default=2, help="ranks per run")
    p.add_argument("--epochs", type=int, default=None, help="default: the example's own default")
    p.add_argument("--schemes", default=",".join(common.COMPRESSIONS),
                   help="comma-separated compressions to run (none is the accuracy baseline)")
    p.add_argument("--protocol", choices=common.PROTOCOLS, default="auto",
                   help="protocol for the quantizers (none/fp16 always allreduce; globalqsgd "
                        "supports allreduce only and is then skipped)")
    p.add_argument("--bits", type=int, default=None, help="--bits for the quantizers (default: theirs)")
    p.add_argument("--bucket-size", type=int, default=None,
                   help="--bucket-size for the quantizers (default: theirs)")
    p.add_argument("--out", default=None,
                   help="output folder (default: results for pytorch, results/<framework> otherwise)")
    p.add_argument("--launcher", choices=("mpirun", "horovodrun"), default="mpirun")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--extra", default="", help="extra arguments for every run, e.g. '--lr 0.02'")
    p.add_argument("--reuse", action="store_true",
                   help="skip runs whose JSON log already exists in --out/logs (re-plot only)")
    args = p.parse_args()
    args.schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    bad = [s for s in args.schemes if s not in common.COMPRESSIONS]
    if bad:
        p.error(f"unknown compression(s) {bad}; choose from {', '.join(common.COMPRESSIONS)}")
    if args.protocol == "allgather" and args.framework == "keras":
        p.error("the keras example supports --protocol allreduce only")
    if args.out is None:
        args.out = "results" if args.framework == "pytorch" else os.path.join("results", args.framework)
    return args


def launch_cmd(args: argparse.Namespace, run_args: list[str]) -> list[str]:
    script = [sys.executable, os.path.join(HERE, SCRIPTS[args.framework]), *run_args]
    if args.launcher == "horovodrun":
        horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
        return [horovodrun, "-np", str(args.np), "-H", f"localhost:{args.np}", *script]
    return ["mpirun", "-np", str(args.np), *script]


def run_one(args: argparse.Namespace, compression: str, logdir: str) -> dict | None:
    protocol = args.protocol if compression in common.SCHEMES else "allreduce"
    tag = f"{args.framework}_{compression}_{protocol}"
    if compression in common.SCHEMES and args.bits is not None:
        tag += f"_b{args.bits}"
    if compression in common.SCHEMES and args.bucket_size is not None:
        tag += f"_bs{args.bucket_size}"
    log_json = os.path.join(logdir, f"{tag}.json")
    if args.reuse and os.path.exists(log_json):
        with open(log_json) as f:
            return json.load(f)
    run_args = ["--compression", compression, "--protocol", protocol, "--log-json", log_json]
    if args.epochs is not None:
        run_args += ["--epochs", str(args.epochs)]
    if compression in common.SCHEMES:
        for flag, value in (("--bits", args.bits), ("--bucket-size", args.bucket_size)):
            if value is not None:
                run_args += [flag, str(value)]
    run_args += shlex.split(args.extra)
    cmd = launch_cmd(args, run_args)
    print(f"\n=== {compression} ({protocol}) ===\n$ {shlex.join(cmd)}", flush=True)
    if os.path.exists(log_json):
        os.remove(log_json)
    t0 = time.perf_counter()
    # own session: on timeout the launcher and its ranks are stopped together
    env = os.environ.copy()
    if args.framework == "keras3":  # plain Keras 3: no tf_keras switch (env.sh exports it)
        env.pop("TF_USE_LEGACY_KERAS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=args.timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        rc = f"timeout after {args.timeout:g}s"
    elapsed = time.perf_counter() - t0
    with open(os.path.join(logdir, f"{tag}.out"), "w") as f:
        f.write(output)
    for line in output.splitlines():
        if "SUMMARY" in line or re.search(r"\bepoch \d+/\d+ loss", line):
            print("  " + line, flush=True)
    if rc != 0 or not os.path.exists(log_json):
        print(f"  FAILED (exit {rc}); last lines of output:\n" +
              "\n".join("    " + s for s in output.splitlines()[-15:]), flush=True)
        return None
    with open(log_json) as f:
        log = json.load(f)
    log["summary"]["process_wall_s"] = elapsed
    with open(log_json, "w") as f:
        json.dump(log, f, indent=1)
    return log


def fmt_bytes(n: float) -> str:
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def table_rows(logs: dict[str, dict]) -> list[dict]:
    base = logs.get("none")
    base_acc = base["summary"]["test_acc"] if base else None
    base_bytes = base["summary"]["bytes_per_step"] if base else None
    rows = []
    for name, log in logs.items():
        s = log["summary"]
        delta = (s["test_acc"] - base_acc) * 100 if base_acc is not None else float("nan")
        meets = ("" if name == "none" or base_acc is None else
                 "yes" if delta >= -BAR_POINTS and s["bytes_per_step"] < base_bytes else "NO")
        walls = [0.0] + [e["wall_s"] for e in log["epochs"]]
        epoch_s = sorted(b - a for a, b in zip(walls, walls[1:]))
        rows.append({"compression": name, "protocol": s["protocol"],
                     "compressor": log["config"].get("compressor", ""),
                     "test_acc": s["test_acc"] * 100, "delta_vs_none_pts": delta,
                     "bytes_per_step": s["bytes_per_step"], "ratio_vs_fp32": s["ratio_vs_fp32"],
                     "ratio_vs_fp16": s["ratio_vs_fp16"], "train_wall_s": s["wall_s"],
                     "process_wall_s": s.get("process_wall_s", float("nan")),
                     "median_epoch_s": epoch_s[len(epoch_s) // 2] if epoch_s else float("nan"),
                     "meets_bar": meets})
    return rows


def write_tables(args: argparse.Namespace, rows: list[dict], logs: dict[str, dict]) -> None:
    cfg = next(iter(logs.values()))["config"]
    setup = (f"{cfg['ranks']} ranks via {args.launcher}; {cfg['epochs']} epochs x "
             f"{cfg['steps_per_epoch']} steps; per-rank batch {cfg['batch_size']}; "
             f"lr {cfg['lr']} x ranks; seed {cfg['seed']}; model {cfg['params']} params; "
             f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    notes = ("bytes/step: what one rank hands to the gradient collectives per optimizer step "
             "(quantizers: their payload incl. the scale agreement; none/fp16: numel x 4 / x 2). "
             f"bar: test accuracy within {BAR_POINTS:g} point of none, with fewer bytes/step. "
             "wall s: train = rank 0's training loop incl. evaluation, process = the whole launch "
             "(imports, MPI start-up); median epoch s is the least disturbed by other load.")
    header = ("| compression | protocol | test acc (%) | delta vs none (pts) | bytes/step | "
              "ratio vs fp32 | ratio vs fp16 | wall s (train / process) | median epoch s | bar |")
    md = [f"# horovod_nuq digits comparison ({args.framework})", "", setup, "", notes, "",
          header, "|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in rows:
        md.append(f"| {r['compression']} | {r['protocol']} | {r['test_acc']:.2f} | "
                  f"{r['delta_vs_none_pts']:+.2f} | {fmt_bytes(r['bytes_per_step'])} | "
                  f"{r['ratio_vs_fp32']:.2f}x | {r['ratio_vs_fp16']:.2f}x | "
                  f"{r['train_wall_s']:.1f} / {r['process_wall_s']:.1f} | {r['median_epoch_s']:.2f} | "
                  f"{r['meets_bar']} |")
    table = md[-(len(rows) + 2):]
    md += ["", "Compressors:", ""] + [f"- {r['compression']}: `{r['compressor']}`" for r in rows]
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(args.out, "compare.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n" + "\n".join(table))


def plot(args: argparse.Namespace, logs: dict[str, dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v: list[float], k: int) -> list[float]:
        out, acc = [], 0.0
        for i, x in enumerate(v):
            acc += x
            if i >= k:
                acc -= v[i - k]
            out.append(acc / min(i + 1, k))
        return out

    k = max(1, min(10, next(iter(logs.values()))["config"]["steps_per_epoch"] // 2))
    title = f"{args.framework}, {next(iter(logs.values()))['config']['ranks']} ranks"
    paths = []
    specs = [("loss_vs_step.png", "step", f"training loss (moving avg of {k} steps)"),
             ("loss_vs_bytes.png", "bytes sent per rank (cumulative)", "training loss (moving avg)"),
             ("acc_vs_epoch.png", "epoch", "test accuracy (%)")]
    for fname, xlabel, ylabel in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for name, log in logs.items():
            style = {"linestyle": "--"} if name in ("none", "fp16") else {}
            if fname == "acc_vs_epoch.png":
                ax.plot([e["epoch"] for e in log["epochs"]], [100 * e["test_acc"] for e in log["epochs"]],
                        marker="o", markersize=3, label=name, **style)
            else:
                loss = smooth([s["loss"] for s in log["steps"]], k)
                x = ([s["step"] for s in log["steps"]] if fname == "loss_vs_step.png"
                     else [s["bytes"] for s in log["steps"]])
                ax.plot(x, loss, label=name, linewidth=1.2, **style)
        if fname != "acc_vs_epoch.png":
            ax.set_yscale("log")
        if fname == "loss_vs_bytes.png":
            ax.set_xscale("log")
        if fname == "acc_vs_epoch.png":
            lo = min(100 * e["test_acc"] for log in logs.values() for e in log["epochs"])
            ax.set_ylim(max(0, math.floor(lo) - 1), 100)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"digits: {ylabel.split(' (')[0]} vs {xlabel.split(' (')[0]} ({title})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(args.out, fname)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    args = parse_args()
    logdir = os.path.join(args.out, "logs")
    os.makedirs(logdir, exist_ok=True)
    logs, failed = {}, []
    for name in args.schemes:
        if name == "globalqsgd" and args.protocol == "allgather":
            print("\n=== globalqsgd: skipped (shares one scale across ranks: allreduce protocol only)")
            continue
        if name == "hsq" and (args.protocol == "allreduce" or args.bits is not None or args.bucket_size is not None):
            print("\n=== hsq: skipped (allgather only; --bits/--bucket-size do not apply)")
            continue
        log = run_one(args, name, logdir)
        if log is None:
            failed.append(name)
        else:
            logs[name] = log
    if not logs:
        sys.exit("no run succeeded")
    rows = table_rows(logs)
    write_tables(args, rows, logs)
    paths = plot(args, logs)
    print(f"\nwrote {os.path.join(args.out, 'compare.md')}, compare.csv, " + ", ".join(
        os.path.basename(p) for p in paths) + f" in {args.out}")
    if failed:
        print(f"FAILED runs: {', '.join(failed)} (see {logdir}/*.out)")
        sys.exit(1)


if __name__ == "__main__":
    main()
