#!/usr/bin/env bash
# The package as users get it: build the sdist and the wheel (the wheel from the sdist), check
# their contents, install the wheel (not editable) into a fresh venv under /tmp, and from
# outside the repository run
#   1. a 2-rank training under mpirun with the fused kernels compiled from the wheel's C source
#      (asserted: kernels.load() is a library, the engine a FusedEngine), whose final weights
#      must equal, bit for bit, those of the same run from this checkout (the editable form);
#   2. the same with the C source deleted: exactly one warning per rank, the generic engine,
#      and training still converges.
# The fresh venv reuses the project venv's torch / Horovod through a .pth file (a venv cannot
# inherit another venv's site-packages), added after the wheel is installed so pip never sees
# the project's editable horovod_nuq. Takes ~40 s. Usage: bash scripts/test_wheel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
source scripts/env.sh
unset PYTHONPATH
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hnuq-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
fail() { echo "test_wheel: FAIL: $*" >&2; exit 1; }

echo "== build sdist + wheel"
if python -c 'import build' 2>/dev/null; then
    # sdist first, then the wheel built from the unpacked sdist (proves the sdist is complete)
    python -m build --no-isolation --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1 \
        || { tail -n 30 "$WORK/build.log"; fail "python -m build"; }
else
    echo "(python -m build not installed: pip wheel, no sdist)"
    python -m pip wheel -q --no-deps --no-build-isolation . -w "$WORK/dist" > "$WORK/build.log" 2>&1 \
        || { tail -n 30 "$WORK/build.log"; fail "pip wheel"; }
fi
rm -rf build horovod_nuq.egg-info  # setuptools' scratch in the repository
wheel="$(compgen -G "$WORK/dist/horovod_nuq-*-py3-none-any.whl" | head -n1)" || true
[[ -n "$wheel" ]] || fail "no py3-none-any wheel in $(ls "$WORK/dist")"
python - "$WORK/dist" <<'PY'
import pathlib, sys, tarfile, zipfile
dist = pathlib.Path(sys.argv[1])
whl = next(dist.glob("*.whl"))
names = zipfile.ZipFile(whl).namelist()
need = ["horovod_nuq/csrc/nuq_kernels.c", "horovod_nuq/install_horovod.py", "horovod_nuq/_version.py",
        "horovod_nuq/torch/optimizer.py"]
missing = [n for n in need if n not in names]
missing += [] if any(n.endswith(".dist-info/licenses/LICENSE") for n in names) else ["LICENSE"]
stray = [n for n in names if n.startswith(("tests/", "scripts/", "examples/", "benchmarks/"))]
print(f"{whl.name}: {whl.stat().st_size / 1024:.0f} KiB, {len(names)} files")
for sd in dist.glob("*.tar.gz"):
    members = [m.split("/", 1)[1] for m in tarfile.open(sd).getnames() if "/" in m]
    missing += [f"sdist:{n}" for n in ("LICENSE", "CHANGELOG.md", "horovod_nuq/csrc/nuq_kernels.c",
                                       "pyproject.toml") if n not in members]
    print(f"{sd.name}: {sd.stat().st_size / 1024:.0f} KiB, {len(members)} files")
if missing or stray:
    sys.exit(f"wheel/sdist contents: missing {missing}, unexpected {stray}")
PY

echo "== fresh venv + wheel (not editable)"
python -m venv --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
python -m pip --disable-pip-version-check --python "$VPY" install -q --no-deps --no-index "$wheel"
site="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# every site-packages directory the project python sees (its own, and any it reaches through .pth files)
python -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("site-packages")))' \
    > "$site/zz_project_frameworks.pth"

cat > "$WORK/smoke.py" <<'PY'
"""2-rank training through horovod_nuq.torch.DistributedOptimizer; argv: package prefix, fused|generic."""
import hashlib
import sys
import warnings

warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import horovod.torch as hvd
    import torch
    import torch.nn.functional as F

    import horovod_nuq
    import horovod_nuq.torch as nuq
    from horovod_nuq import engines, kernels
    from horovod_nuq.backends import backend_for

    prefix, mode = sys.argv[1], sys.argv[2]
    assert horovod_nuq.__file__.startswith(prefix), f"horovod_nuq from {horovod_nuq.__file__}, not {prefix}"
    hvd.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    comp = nuq.NUQCompressor(bits=4, seed=hvd.rank(), protocol="allgather")
    opt = nuq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.2),
                                   named_parameters=model.named_parameters(), compression=comp)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    g = torch.Generator().manual_seed(1 + hvd.rank())
    x = torch.randn(512, 32, generator=g)
    y = x[:, :4].argmax(1)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    big = torch.randn(1 << 22)  # the issue's example: 16 MB through the allgather codec
    comp.compress_for_allgather(big)
    engine = comp.codec.engine(backend_for(big), big)
ours = [w for w in caught if "horovod_nuq" in str(w.message)]
if mode == "fused":
    assert kernels.load() is not None and isinstance(engine, engines.FusedEngine), type(engine)
    assert not ours, [str(w.message) for w in ours]
else:
    assert kernels.load() is None and type(engine) is engines.GenericEngine, type(engine)
    assert len(ours) == 1 and "fused CPU kernels unavailable" in str(ours[0].message), ours
assert losses[-1] < 0.7 * losses[0], losses
weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]
print(f"rank {hvd.rank()}: {mode} ({type(engine).__name__}) from {horovod_nuq.__file__}, "
      f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, weights {weights}"
      + (f"; warning: {ours[0].message}" if ours else ""), flush=True)
PY

cd "$WORK"  # outside the repository: nothing of it on sys.path unless PYTHONPATH says so
smoke() {  # smoke <log> <env...> -- <args>: 2 ranks, output kept for the comparison
    local log="$1"; shift
    env "$@" timeout 300 mpirun -np 2 "${PY_SMOKE}" smoke.py "${SMOKE_ARGS[@]}" 2>&1 | tee "$WORK/$log"
}
weights() { grep -o 'rank 0: .*weights [0-9a-f]*' "$WORK/$1" | grep -o '[0-9a-f]*$'; }

echo "== 2-rank training from this checkout (editable form), fused kernels"
PY_SMOKE=python SMOKE_ARGS=("$REPO/horovod_nuq/" fused)
smoke editable.log PYTHONPATH="$REPO" || fail "editable smoke training"

echo "== 2-rank training from the wheel, fused kernels (compiled from the wheel's source)"
PY_SMOKE="$VPY" SMOKE_ARGS=("$WORK/venv/" fused)
smoke wheel.log HOROVOD_NUQ_CACHE="$WORK/cache" || fail "fused smoke training"
[[ -n "$(weights wheel.log)" && "$(weights wheel.log)" == "$(weights editable.log)" ]] \
    || fail "the wheel's training differs from the checkout's: $(weights wheel.log) vs $(weights editable.log)"
echo "same weights from the wheel and the checkout: $(weights wheel.log)"

echo "== 2-rank training from the wheel, C source removed"
rm "$site/horovod_nuq/csrc/nuq_kernels.c"
SMOKE_ARGS=("$WORK/venv/" generic)
smoke generic.log HOROVOD_NUQ_CACHE="$WORK/cache2" || fail "generic-fallback smoke training"
echo "test_wheel: OK"
