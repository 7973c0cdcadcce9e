#!/usr/bin/env python
"""Mutation check (not part of CI): do the tests catch small, realistic bugs?

Each mutant is a deliberate bug given as data: edits (file, exact old text, new text). For
each, the repository is copied (minus .git and .venv) to a temporary directory, the edits
are applied there, and a test command runs in the copy (the venv's python imports the
package from the working directory first; the script checks that it does). The result is
a markdown table: mutant, file, caught or not, the first failing tests.

    python scripts/mutation_check.py                 # all mutants, unit suite (-x)
    python scripts/mutation_check.py --all           # unit suite without -x: every failing test
    python scripts/mutation_check.py --full          # bash scripts/test.sh (MPI suites too)
    python scripts/mutation_check.py --mutant generic-sum-as-average --mutant ...
    python scripts/mutation_check.py --cmd "python -m pytest tests/unit/test_kernel_bits.py -q"
    python scripts/mutation_check.py --list

The exit status is 1 when some mutant survives.

An edit whose old text is not found exactly once stops the script before anything runs:
the code moved, so the pattern must be updated (never silently skipped). Run it from the
project venv (source scripts/env.sh).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNIT_CMD = [sys.executable, "-m", "pytest", "tests/unit", "-q", "-x", "-p", "no:cacheprovider"]
FULL_CMD = ["bash", "scripts/test.sh"]
C_SRC = "horovod_nuq/csrc/nuq_kernels.c"


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str
    edits: tuple  # ((path, old, new), ...)

    @property
    def files(self) -> str:
        return ", ".join(dict.fromkeys(e[0] for e in self.edits))


MUTANTS = [
    Mutant("generic-rounding-bias", "rounding probability biased by +0.01 (generic codec)", (
        ("horovod_nuq/codec.py", 'idx = j + xp.cast(u < p, "int64")',
         'idx = j + xp.cast(u < p + np.float32(0.01), "int64")'),)),
    Mutant("fused-rounding-bias", "rounding probability biased by +0.01 (C kernels: scalar and AVX2, "
           "uniform and non-uniform levels)", (
        (C_SRC, "int id = j[t] + (draw(salt, base + (uint32_t)(t0 + t)) * (l1 - l0) < a[t] - l0);",
         "int id = j[t] + ((draw(salt, base + (uint32_t)(t0 + t)) - 0.01f) * (l1 - l0) < a[t] - l0);"),
        (C_SRC, "int id = j + (draw(salt, base + (uint32_t)t) < xk - (float)j);",
         "int id = j + (draw(salt, base + (uint32_t)t) - 0.01f < xk - (float)j);"),
        (C_SRC, "up = _mm256_cmp_ps(draw8(ig, q->salt), _mm256_sub_ps(xk,",
         "up = _mm256_cmp_ps(_mm256_sub_ps(draw8(ig, q->salt), _mm256_set1_ps(0.01f)), _mm256_sub_ps(xk,"),
        (C_SRC, "up = _mm256_cmp_ps(_mm256_mul_ps(draw8(ig, q->salt), _mm256_sub_ps(l1, l0))",
         ("up = _mm256_cmp_ps(_mm256_mul_ps(_mm256_sub_ps(draw8(ig, q->salt), _mm256_set1_ps(0.01f)), "
          "_mm256_sub_ps(l1, l0))")),)),
    Mutant("nuq-wrong-level", "NUQ level l_2 = 3/2^(k-1) instead of 2/2^(k-1) (all engines)", (
        ("horovod_nuq/levels.py", "return Levels((0,) + tuple(1 << j for j in range(k)))",
         "return Levels((0,) + tuple((1 << j) + (j == 1 and k > 2) for j in range(k)))"),)),
    Mutant("fused-sum-as-average", "op Sum decoded as Average (FusedEngine.decode_sums)", (
        ("horovod_nuq/engines.py", "np.float32(sentinel / layout.ranks / self.tables.denominator)",
         "np.float32(1.0 / layout.ranks / self.tables.denominator)"),)),
    Mutant("generic-sum-as-average", "op Sum decoded as Average (GenericEngine.decode_sums)", (
        ("horovod_nuq/engines.py", 'total * xp.cast(sentinel / np.float64(layout.ranks), "float32")',
         'total * xp.cast(sentinel / sentinel / np.float64(layout.ranks), "float32")'),)),
    Mutant("generic-allgather-no-average", "allgather decode ignores the 1/n average (GenericEngine)", (
        ("horovod_nuq/engines.py",
         "q = codec.dequantize(xp, xp.reshape(idx, [nb, bs]), r * np.float32(scale), self.tables)",
         "q = codec.dequantize(xp, xp.reshape(idx, [nb, bs]), r, self.tables)"),)),
    Mutant("graph-fused-decode-doubled", "tf.function (graph-fused) summable decode doubled", (
        ("horovod_nuq/engines.py", "return self.xp.reshape(flat, [nb, bs])",
         "return self.xp.reshape(flat * 2, [nb, bs])"),)),
    # ---- further bugs ---------------------------------------------------------------------
    Mutant("c-pack-tail-bit-width", "C packing: the scalar tail groups of odd widths use bits-1 "
           "per code", (
        (C_SRC, "for (int t = 0; t < 8; t++) word |= (uint64_t)c[8 * g + t] << (bits * t);",
         "for (int t = 0; t < 8; t++) word |= (uint64_t)c[8 * g + t] << ((bits - 1) * t);"),)),
    Mutant("c-scalar-draw-differs", "C scalar draw() hashes with another constant than the AVX2 "
           "draw8() (still uniform)", (
        (C_SRC, "h ^= h >> 13; h *= 0xc2b2ae35u;", "h ^= h >> 13; h *= 0xc2b2ae37u;"),)),
    Mutant("c-shared-scratch", "C nuq_decode_sums: scratch buffers shared by the OpenMP threads", (
        (C_SRC, ("    #pragma omp parallel for schedule(static) reduction(| : bad) if (count > PAR_MIN)\n"
                 "    for (int64_t ch = 0; ch < blocks; ch++) {\n"
                 "        float s[BLOCK + 8];\n        uint64_t W[BLOCK];\n"),
         ("    static float s[BLOCK + 8];\n    static uint64_t W[BLOCK];\n"
          "    #pragma omp parallel for schedule(static) reduction(| : bad) if (count > PAR_MIN)\n"
          "    for (int64_t ch = 0; ch < blocks; ch++) {\n")),)),
    Mutant("sentinel-ignored", "generic unpack_sums ignores the sentinel (assumes op Average)", (
        ("horovod_nuq/wire.py", "scaled = words * (np.float64(layout.ranks) / sentinel)",
         "scaled = words * np.float64(layout.ranks)"),)),
    Mutant("scale-not-agreed", "allreduce protocol keeps the local scale instead of the Max over ranks", (
        ("horovod_nuq/transports.py", "r, ids = xp.split(agreed, [nb, 2])",
         "_, ids = xp.split(agreed, [nb, 2])"),)),
    Mutant("sentinel-op-ignored", "sentinel+gather decodes every reduction as Average (ignores c*n)", (
        ("horovod_nuq/transports.py", "    return decode(float(xp.to_numpy(scale).reshape(-1)[0]) / ranks())",
         "    return decode(None)"),)),
    Mutant("sentinel-pairing-unchecked", "the sentinel's tag variance (gather pairing) is not checked", (
        ("horovod_nuq/wire.py", "    xp.require(xp.max_all(xp.abs(mean2 - mean1 * mean1)) <= tol,",
         "    xp.require(xp.max_all(xp.abs(mean2 - mean1 * mean1)) <= 1e300,"),)),
    Mutant("ef-summable-own-value-off", "error feedback keeps the wrong own value on the summable "
           "path (scales off by 0.1%)", (
        ("horovod_nuq/transports.py", "keep(codec.decode_sums(payload, r, layout, ctx))",
         "keep(codec.decode_sums(payload, r * 1.001, layout, ctx))"),)),
    Mutant("ef-gamma-not-applied", "error feedback's gamma is kept in the residual but not applied "
           "to what is decoded", (
        ("horovod_nuq/compressor.py", "        return out if gamma == 1.0 else out * gamma",
         "        return out"),)),
    Mutant("ef-residual-not-added", "error feedback never adds the residual to the gradient", (
        ("horovod_nuq/memory.py", "        return grad + slot.xp.read_state(slot)",
         "        return grad + 0 * slot.xp.read_state(slot)"),)),
    Mutant("ef-gamma-one", "error feedback sends Q(x) unscaled (gamma = 1) whatever the variance bound", (
        ("horovod_nuq/memory.py", "        return 1.0 / (1.0 + omega) if omega is not None and omega >= 1 else 1.0",
         "        return 1.0"),)),
]


def check_patterns(mutants: list[Mutant], root: Path) -> None:
    """Every edit's old text must occur exactly once in the pristine tree."""
    problems = []
    for m in mutants:
        for path, old, _ in m.edits:
            f = root / path
            n = f.read_text().count(old) if f.exists() else -1
            if n != 1:
                where = "file missing" if n < 0 else f"found {n} times"
                problems.append(f"  {m.name}: {path}: {where}: {old[:80]!r}")
    if problems:
        sys.exit("mutation_check: stale mutant patterns (the code changed; update MUTANTS):\n"
                 + "\n".join(problems))


def copy_tree(src: Path, dest: Path) -> Path:
    """src (the repository, or the snapshot taken of it at start) minus .git, .venv and
    caches, with .venv linked back (scripts/env.sh, which test.sh sources, activates it)."""
    repo = dest / "repo"
    shutil.copytree(src, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "*.so", "*.pyc"))
    venv = ROOT / ".venv"
    if venv.exists():  # scripts/env.sh (test.sh) activates <repo>/.venv
        (repo / ".venv").symlink_to(venv.resolve())
    return repo


def apply(mutant: Mutant, repo: Path) -> None:
    for path, old, new in mutant.edits:
        f = repo / path
        text = f.read_text()
        if text.count(old) != 1:
            sys.exit(f"mutation_check: {mutant.name}: {path}: pattern not found exactly once")
        f.write_text(text.replace(old, new))


FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", re.MULTILINE)


def run(cmd: list[str], repo: Path, env: dict, timeout: float) -> tuple[bool | None, list[str], str]:
    """(caught, failing test ids, output tail); caught None: a timeout (counted as caught)."""
    try:
        p = subprocess.run(cmd, check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, FAILED.findall(out), out[-2000:]
    out = p.stdout + p.stderr
    return p.returncode != 0, list(dict.fromkeys(FAILED.findall(out))), out[-2000:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="run bash scripts/test.sh (unit + MPI suites)")
    ap.add_argument("--all", action="store_true", help="unit suite without -x: list every failing test")
    ap.add_argument("--mutant", action="append", default=[], help="run only this mutant (repeatable)")
    ap.add_argument("--cmd", help="test command to run instead (a shell line, run in the copy)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run (default 900; --full 3600)")
    ap.add_argument("--show", type=int, default=3, help="failing tests listed per mutant")
    args = ap.parse_args()

    names = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:30s} {m.files:40s} {m.bug}")
        return 0
    unknown = [n for n in args.mutant if n not in names]
    if unknown:
        sys.exit(f"mutation_check: unknown mutant(s) {unknown}; --list shows them")
    chosen = [names[n] for n in args.mutant] or MUTANTS
    check_patterns(chosen, ROOT)

    unit = [a for a in UNIT_CMD if a != "-x"] if args.all else UNIT_CMD
    cmd = ["bash", "-c", args.cmd] if args.cmd else (FULL_CMD if args.full else unit)
    timeout = args.timeout or (3600 if args.full else 900)
    with tempfile.TemporaryDirectory(prefix="nuq-mutants-") as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, HOROVOD_NUQ_CACHE=str(tmp / "cache"),  # mutated kernels build here
                   PYTHONDONTWRITEBYTECODE="1")
        print(f"command: {' '.join(cmd)}", file=sys.stderr)
        pristine = copy_tree(ROOT, tmp / "pristine")  # edits made during the run do not leak in
        if not args.no_baseline:
            repo = copy_tree(pristine, tmp / "baseline")
            where = subprocess.run([sys.executable, "-c", "import horovod_nuq; print(horovod_nuq.__file__)"],
                                   check=False, cwd=repo, env=env, capture_output=True,
                                   text=True).stdout.strip()
            if not where.startswith(str(repo)):
                sys.exit(f"mutation_check: the copy's python imports horovod_nuq from {where}, not the copy")
            t0 = time.time()
            caught, failing, tail = run(cmd, repo, env, timeout)
            if caught is not False:
                sys.exit(f"mutation_check: the unmutated tree fails ({failing or 'see output'}):\n{tail}")
            print(f"baseline passes ({time.time() - t0:.0f} s)", file=sys.stderr)
            shutil.rmtree(repo.parent)
        rows = []
        for i, m in enumerate(chosen):
            repo = copy_tree(pristine, tmp / f"m{i}")
            apply(m, repo)
            t0 = time.time()
            caught, failing, tail = run(cmd, repo, env, timeout)
            dt = time.time() - t0
            counts = re.findall(r"(\d+) failed", tail)
            verdict = "timeout (caught)" if caught is None else ("yes" if caught else "**NO**")
            if caught and not failing:
                last = [ln for ln in tail.strip().splitlines() if ln.strip()][-1:]
                failing = [f"(no FAILED line; exit non-zero: {last[0][:80] if last else ''})"]
            shown = ", ".join(f"`{t}`" for t in failing[: args.show])
            total = int(counts[-1]) if counts else len(failing)
            if total > min(len(failing), args.show):
                shown += f" ({total} failed in all)"
            rows.append((m.name, m.bug, m.files, verdict, shown))
            print(f"{m.name}: {verdict} ({dt:.0f} s)", file=sys.stderr)
            shutil.rmtree(repo.parent)

    print(f"\nCommand: `{args.cmd or ' '.join(cmd)}`\n")
    print("| mutant | bug | file | caught | first failing tests |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0 if all(r[3] != "**NO**" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
