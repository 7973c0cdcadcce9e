#!/usr/bin/env bash
# End-to-end step time over a slow link, for none / fp16 / every scheme and protocol, in one run.
#
#   bash benchmarks/slow_link.sh [extra slow_link.py args, e.g. --configs none fp16 nuq/allreduce]
#
# What it does:
#   1. re-executes itself in a private network namespace (`unshare -n`, needs root or
#      CAP_SYS_ADMIN); nothing else on the machine sees the traffic, and nothing leaves lo;
#   2. brings up lo and, for each rate in $RATES, shapes it: `tc qdisc replace dev lo root tbf`;
#   3. for each N in $NPS runs benchmarks/slow_link.py under
#      `mpirun --mca btl self,tcp --mca btl_tcp_if_include lo` (no vader shared memory, no sm
#      collectives, no Horovod hierarchical ops: every byte between ranks crosses the shaped lo;
#      the table's "lo MB/step" column shows it);
#   4. prints a summary: which protocol wins per scheme, and NUQ vs float32 / float16.
# Results: $RESULTS.md (tables, one per rate and N) and $RESULTS.jsonl.
#
# Note: the shaped lo is ONE link shared by all ranks (all ranks' bytes go through one token
# bucket, like a hub), not one link per node: a ring allreduce of S bytes puts 2(N-1)S on it.
#
# Environment knobs (defaults in brackets):
#   RATES ["100mbit 1gbit"]  NPS ["2 4"]  RESULTS [benchmarks/results/slow_link] (.md/.jsonl)  OPS [mpi] (or gloo: Horovod's Gloo ops, launched by
#   `horovodrun --gloo --network-interface lo`; mpirun + HOROVOD_CPU_OPERATIONS=gloo segfaults)
#   QUEUE ["latency 50ms"]: tbf queue bound (e.g. "limit 16mb")
#   SLOW_ARGS [""] / FAST_ARGS ["--rounds 2 --max-steps 3"]: slow_link.py args for rates in
#   kbit/mbit / for faster rates (short steps are at the mercy of CPU noise: best of 2 rounds)
#   HOROVOD_CYCLE_TIME [1] ms, HOROVOD_FUSION_THRESHOLD [67108864] bytes (64 MiB: all float32
#   gradients of the 10.5M-parameter model, 42 MB, fit in one fused buffer)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's horovod_nuq, not an installed one

# shellcheck source=benchmarks/shaped_link.sh
source benchmarks/shaped_link.sh
if [[ -z "${SLOW_LINK_INSIDE:-}" ]]; then
    shaped_link_enter "${BASH_SOURCE[0]}" "$@"
    exit 0
fi

# ---- inside the private network namespace --------------------------------------------------
shaped_link_setup

RATES=${RATES:-"100mbit 1gbit"}
NPS=${NPS:-"2 4"}
RESULTS=${RESULTS:-benchmarks/results/slow_link}  # writes $RESULTS.md and $RESULTS.jsonl (overwritten)
mkdir -p "$(dirname "$RESULTS")"
MD=$RESULTS.md
JSONL=$RESULTS.jsonl
: > "$JSONL"
{
    echo "# slow_link benchmark ($(date '+%Y-%m-%d %H:%M'), $(getconf _NPROCESSORS_ONLN) cores, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$([[ -n "$(git status --porcelain -- horovod_nuq 2>/dev/null)" ]] && echo ' + uncommitted horovod_nuq changes'))"
    echo
    echo "Command: \`RATES=\"$RATES\" NPS=\"$NPS\" OPS=$OPS bash benchmarks/slow_link.sh $*\`."
    echo "Private netns, lo shaped with tc tbf (one token bucket shared by all ranks' traffic);"
    echo "OPS=$OPS (mpi: mpirun --mca btl self,tcp, no shared memory; gloo: horovodrun --gloo), HOROVOD_CPU_OPERATIONS=$HOROVOD_CPU_OPERATIONS,"
    echo "HOROVOD_CYCLE_TIME=${HOROVOD_CYCLE_TIME} ms, HOROVOD_FUSION_THRESHOLD=${HOROVOD_FUSION_THRESHOLD},"
    echo "OMP_NUM_THREADS=$OMP_NUM_THREADS (ranks share $(getconf _NPROCESSORS_ONLN) cores). Speed-ups are step-time ratios within one table."
    echo
} > "$MD"

rate_args() {  # fast links: steps are short and CPU noise matters, so 2 interleaved rounds, keep the best
    case "$1" in
        *kbit|*mbit) echo "${SLOW_ARGS:-}" ;;
        *) echo "${FAST_ARGS:---rounds 2 --max-steps 3}" ;;
    esac
}

for rate in $RATES; do
    shape_lo "$rate"
    for np in $NPS; do
        echo "== rate $rate, N = $np"
        before=$(lo_qdisc_sent)
        mpi_launch "$np"
        # shellcheck disable=SC2046
        "${LAUNCH[@]}" python benchmarks/slow_link.py --rate "$rate" --transport "$TRANSPORT" --md "$MD" --jsonl "$JSONL" \
            $(rate_args "$rate") "$@"
        after=$(lo_qdisc_sent)
        echo "   (qdisc on lo passed $(( (${after:-0} - ${before:-0}) / 1000000 )) MB during this mpirun;" \
             "since shaping began: $(lo_qdisc_dropped) packets dropped)"
    done
done
tc qdisc del dev lo root 2>/dev/null || true

python benchmarks/slow_link.py --summarize "$JSONL" | tee -a "$MD"
