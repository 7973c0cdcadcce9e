#!/usr/bin/env bash
# Run the whole test suite: lint, single-process unit tests, then the multi-rank tests under
# mpirun with 2 and 4 ranks (pytest in every rank, as Horovod's own test/parallel does).
# Exits non-zero on any failure. Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
REPORTS=$(mktemp -d)
trap 'rm -rf "$REPORTS"' EXIT
RANKS=${HOROVOD_NUQ_TEST_RANKS:-"2 4"}
status=0

echo "== ruff"
ruff check horovod_nuq tests examples scripts benchmarks || status=1

echo "== unit and launcher tests (single process)"
python -m pytest tests/unit tests/launch -q -p no:cacheprovider --junitxml="$REPORTS/unit.xml" "$@" || status=1

echo "== wheel: build, fresh venv, 2-rank smoke from outside the repo"; bash scripts/test_wheel.sh || status=1

# One mpirun per framework and size. Rank 0 prints; the other ranks log to files that are
# shown only when the run fails. `timeout` turns a hang into a failure.
for np in $RANKS; do
  for suite in test_torch_mpi test_local_mpi test_reliability_mpi test_tf_mpi test_keras3_mpi test_keras3_torch_mpi; do
    echo "== $suite with $np ranks"
    log="$REPORTS/$suite.$np"
    # the reliability suite runs the fused kernels with 2 OpenMP threads (env.sh sets 1);
    # Keras 3 runs without the tf_keras switch that env.sh exports for the other suites
    threads=$OMP_NUM_THREADS; [ "$suite" = test_reliability_mpi ] && threads=2
    unset_legacy=()
    case $suite in test_keras3*) unset_legacy=(-u TF_USE_LEGACY_KERAS) ;; esac
    if ! OMP_NUM_THREADS=$threads timeout 900 env "${unset_legacy[@]}" mpirun -np "$np" bash -c '
        r=${OMPI_COMM_WORLD_RANK:-0}
        args=(-m pytest "tests/parallel/'"$suite"'.py" -p no:cacheprovider -x --color=no)
        if [ "$r" = 0 ]; then exec python "${args[@]}" -q --junitxml="'"$log"'.xml" '"$*"'
        else exec python "${args[@]}" -q '"$*"' > "'"$log"'.rank$r.log" 2>&1; fi'; then
      status=1
      for f in "$log".rank*.log; do [ -f "$f" ] && { echo "--- $f"; tail -n 40 "$f"; }; done
    fi
  done
done

python - "$REPORTS" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
t = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for f in glob.glob(sys.argv[1] + "/*.xml"):
    for s in ET.parse(f).getroot().iter("testsuite"):
        for k in t:
            t[k] += int(s.get(k, 0))
failed = t["failures"] + t["errors"]
print(f"all suites: {t['tests'] - failed - t['skipped']} passed, {failed} failed, {t['skipped']} skipped")
PY
exit $status
