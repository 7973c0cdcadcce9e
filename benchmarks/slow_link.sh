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

if [[ -z "${SLOW_LINK_INSIDE:-}" ]]; then
    missing=()
    for tool in unshare ip tc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    if ((${#missing[@]})); then
        echo "slow_link.sh: missing ${missing[*]}; installing iproute2 / util-linux" >&2
        apt-get install -y iproute2 util-linux >/dev/null
    fi
    outer_ns=$(readlink /proc/self/ns/net)
    if ! unshare -n true 2>/tmp/slow_link_unshare.err; then
        echo "slow_link.sh: 'unshare -n' failed: $(cat /tmp/slow_link_unshare.err)" >&2
        exit 1
    fi
    start=$(date +%s)
    SLOW_LINK_INSIDE=1 SLOW_LINK_OUTER_NS="$outer_ns" unshare -n bash "${BASH_SOURCE[0]}" "$@"
    echo "total wall time: $(( $(date +%s) - start )) s"
    exit 0
fi

# ---- inside the private network namespace --------------------------------------------------
SLOW_LINK_NETNS=$(readlink /proc/self/ns/net)
if [[ "$SLOW_LINK_NETNS" == "${SLOW_LINK_OUTER_NS:-}" ]]; then
    echo "slow_link.sh: not in a new network namespace; refusing to run" >&2
    exit 1
fi
export SLOW_LINK_NETNS
ip link set lo up
if [[ -n "$(ip -o link show | awk -F': ' '$2 != "lo"')" ]]; then
    echo "slow_link.sh: unexpected interfaces in the namespace:" >&2; ip -o link show >&2; exit 1
fi

# shellcheck disable=SC1091
source scripts/env.sh
# TCP only, on lo only (env.sh's default includes vader = shared memory, which bypasses lo)
export OMPI_MCA_btl=self,tcp
export OMPI_MCA_btl_tcp_if_include=lo
export OMPI_MCA_oob_tcp_if_include=lo
export OMPI_MCA_coll="^sm,hcoll"
export HOROVOD_GLOO_IFACE=lo
OPS=${OPS:-mpi}
if [[ "$OPS" == mpi ]]; then
    export HOROVOD_CONTROLLER=mpi HOROVOD_CPU_OPERATIONS=mpi
elif [[ "$OPS" == gloo ]]; then  # Gloo needs its own launcher (rendezvous); mpirun + gloo ops segfaults
    export HOROVOD_CONTROLLER=gloo HOROVOD_CPU_OPERATIONS=gloo
else
    echo "slow_link.sh: OPS must be mpi or gloo, got $OPS" >&2; exit 1
fi
export HOROVOD_HIERARCHICAL_ALLREDUCE=0 HOROVOD_HIERARCHICAL_ALLGATHER=0 HOROVOD_AUTOTUNE=0
export HOROVOD_CYCLE_TIME="${HOROVOD_CYCLE_TIME:-1}"
export HOROVOD_FUSION_THRESHOLD="${HOROVOD_FUSION_THRESHOLD:-67108864}"

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

tbf_args() {  # burst must exceed lo's 64 KiB GSO packets; QUEUE bounds the queue (drops beyond)
    case "$1" in
        100mbit) echo "rate 100mbit burst 256kb ${QUEUE:-latency 50ms}" ;;
        *) echo "rate $1 burst 1mb ${QUEUE:-latency 50ms}" ;;
    esac
}

rate_args() {  # fast links: steps are short and CPU noise matters, so 2 interleaved rounds, keep the best
    case "$1" in
        *kbit|*mbit) echo "${SLOW_ARGS:-}" ;;
        *) echo "${FAST_ARGS:---rounds 2 --max-steps 3}" ;;
    esac
}

for rate in $RATES; do
    if [[ "$rate" == unshaped ]]; then
        tc qdisc del dev lo root 2>/dev/null || true
    else
        # shellcheck disable=SC2046
        tc qdisc replace dev lo root tbf $(tbf_args "$rate")
    fi
    echo "== lo: $(tc qdisc show dev lo)"
    for np in $NPS; do
        echo "== rate $rate, N = $np"
        before=$(tc -s qdisc show dev lo | awk '/Sent/ {print $2}')
        if [[ "$OPS" == mpi ]]; then
            launch=(mpirun -np "$np" --bind-to none
                    --mca pml ob1 --mca btl self,tcp --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo
                    -x SLOW_LINK_NETNS -x HOROVOD_CPU_OPERATIONS -x HOROVOD_CONTROLLER -x HOROVOD_CYCLE_TIME
                    -x HOROVOD_FUSION_THRESHOLD -x HOROVOD_HIERARCHICAL_ALLREDUCE -x HOROVOD_HIERARCHICAL_ALLGATHER
                    -x HOROVOD_AUTOTUNE -x HOROVOD_GLOO_IFACE -x OMP_NUM_THREADS -x PYTHONUNBUFFERED)
            transport="Horovod MPI ops, Open MPI btl self,tcp on lo"
        else
            launch=(horovodrun --gloo -np "$np" -H "localhost:$np" --network-interface lo)
            transport="Horovod Gloo ops (horovodrun --gloo) on lo"
        fi
        # shellcheck disable=SC2046
        "${launch[@]}" python benchmarks/slow_link.py --rate "$rate" --transport "$transport" --md "$MD" --jsonl "$JSONL" \
            $(rate_args "$rate") "$@"
        after=$(tc -s qdisc show dev lo | awk '/Sent/ {print $2}')
        echo "   (qdisc on lo passed $(( (${after:-0} - ${before:-0}) / 1000000 )) MB during this mpirun;" \
             "since shaping began: $(tc -s qdisc show dev lo | awk '/Sent/ {sub(/,$/, "", $7); print $7}') packets dropped)"
    done
done
tc qdisc del dev lo root 2>/dev/null || true

python benchmarks/slow_link.py --summarize "$JSONL" | tee -a "$MD"
