#!/usr/bin/env bash
# Rank the communication methods on the char-level LM (benchmarks/rank_methods.py) over a shaped
# link: one command for the whole sweep, then the table and plots.
#
#   bash benchmarks/rank_methods.sh                    # 100 Mbit/s, N = 2 and 4, every method
#   METHODS="none fp16 nuq4" NPS=2 bash benchmarks/rank_methods.sh --steps 60
#   APPEND=1 METHODS="tnq4+ef nuq2+ef" bash benchmarks/rank_methods.sh   # add rows to a sweep
#
# Same link as benchmarks/slow_link.sh (benchmarks/shaped_link.sh): a private network namespace
# (needs root or CAP_SYS_ADMIN), lo shaped with tc tbf (one token bucket shared by all ranks),
# mpirun with btl self,tcp on lo, so every byte between ranks crosses the shaped link.
# Knobs (defaults in brackets): RATES ["100mbit"] ("unshaped" for none), NPS ["2 4"],
# METHODS [all of rank_methods_registry.METHODS], RESULTS [benchmarks/results/rank_methods]
# (writes .jsonl, .md and _<rate>_N<n>.png), APPEND [0] (1: keep the existing .jsonl; the report
# keeps the newest record per method, N and rate), REPLICATES [""] (.jsonl files of the same
# sweep with other --seed: the report adds a seed-spread table), OPS, QUEUE, HOROVOD_CYCLE_TIME,
# HOROVOD_FUSION_THRESHOLD (see shaped_link.sh). Extra arguments go to rank_methods.py.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# shellcheck source=benchmarks/shaped_link.sh
source benchmarks/shaped_link.sh
if [[ -z "${SLOW_LINK_INSIDE:-}" ]]; then
    shaped_link_enter "${BASH_SOURCE[0]}" "$@"
    exit 0
fi

# ---- inside the private network namespace --------------------------------------------------
shaped_link_setup
RATES=${RATES:-100mbit}
NPS=${NPS:-"2 4"}
RESULTS=${RESULTS:-benchmarks/results/rank_methods}
mkdir -p "$(dirname "$RESULTS")"
[[ "${APPEND:-0}" == 1 ]] || : > "$RESULTS.jsonl"
methods=()
# shellcheck disable=SC2206
[[ -n "${METHODS:-}" ]] && methods=(--methods $METHODS)

for rate in $RATES; do
    shape_lo "$rate"
    for np in $NPS; do
        echo "== rate $rate, N = $np"
        before=$(lo_qdisc_sent)
        mpi_launch "$np"
        "${LAUNCH[@]}" python benchmarks/rank_methods.py --rate "$rate" --transport "$TRANSPORT" \
            --out "$RESULTS" "${methods[@]}" "$@"
        after=$(lo_qdisc_sent)
        echo "   (qdisc on lo passed $(( (${after:-0} - ${before:-0}) / 1000000 )) MB during this mpirun;" \
             "since shaping began: $(lo_qdisc_dropped) packets dropped)"
    done
done
tc qdisc del dev lo root 2>/dev/null || true

replicates=()
# shellcheck disable=SC2206
[[ -n "${REPLICATES:-}" ]] && replicates=(--replicates $REPLICATES)
python benchmarks/rank_methods_report.py "$RESULTS.jsonl" --md "$RESULTS.md" --plots "$RESULTS" "${replicates[@]}" \
    --command "RATES=\"$RATES\" NPS=\"$NPS\"${METHODS:+ METHODS=\"$METHODS\"} bash benchmarks/rank_methods.sh $*"
