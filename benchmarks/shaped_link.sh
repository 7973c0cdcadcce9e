# shellcheck shell=bash
# Shared by the slow-link benchmarks (slow_link.sh, rank_methods.sh); source it, do not run it.
# A private network namespace whose loopback is shaped with tc tbf, and an mpirun that sends
# every byte between ranks over that loopback (TCP only: no shared memory, no sm collectives).
#
#   shaped_link_enter "$script" "$@"   # outside: re-execute $script in a new namespace (unshare -n)
#   shaped_link_setup                  # inside: lo up, checks, MPI / Horovod environment
#   shape_lo RATE                      # tc tbf on lo at RATE (e.g. 100mbit), or "unshaped"
#   mpi_launch NP                      # sets LAUNCH=(mpirun ... ) and TRANSPORT (a label)
#   lo_qdisc_sent                      # bytes the qdisc on lo has passed so far
#
# Knobs: OPS [mpi] (or gloo: horovodrun --gloo; mpirun + Gloo ops segfaults), QUEUE
# ["latency 50ms"] (tbf queue bound), HOROVOD_CYCLE_TIME [1] ms, HOROVOD_FUSION_THRESHOLD
# [67108864] bytes.
# Note: the shaped lo is ONE link shared by all ranks (one token bucket, like a hub), not one
# link per node: a ring allreduce of S bytes puts 2(N-1)S on it.

shaped_link_enter() {  # re-execute "$1" with the remaining arguments in a private namespace
    local script=$1; shift
    local missing=() tool
    for tool in unshare ip tc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    if ((${#missing[@]})); then
        echo "shaped_link: missing ${missing[*]}; installing iproute2 / util-linux" >&2
        apt-get install -y iproute2 util-linux >/dev/null
    fi
    local outer_ns err
    outer_ns=$(readlink /proc/self/ns/net)
    err=$(mktemp)
    if ! unshare -n true 2>"$err"; then
        echo "shaped_link: 'unshare -n' failed (needs root or CAP_SYS_ADMIN): $(cat "$err")" >&2
        rm -f "$err"; exit 1
    fi
    rm -f "$err"
    local start; start=$(date +%s)
    SLOW_LINK_INSIDE=1 SLOW_LINK_OUTER_NS="$outer_ns" unshare -n bash "$script" "$@"
    echo "total wall time: $(( $(date +%s) - start )) s"
}

shaped_link_setup() {  # inside the namespace: refuse to run anywhere else, export the environment
    SLOW_LINK_NETNS=$(readlink /proc/self/ns/net)
    if [[ "$SLOW_LINK_NETNS" == "${SLOW_LINK_OUTER_NS:-}" ]]; then
        echo "shaped_link: not in a new network namespace; refusing to run" >&2
        exit 1
    fi
    export SLOW_LINK_NETNS
    ip link set lo up
    if [[ -n "$(ip -o link show | awk -F': ' '$2 != "lo"')" ]]; then
        echo "shaped_link: unexpected interfaces in the namespace:" >&2; ip -o link show >&2; exit 1
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
    elif [[ "$OPS" == gloo ]]; then
        export HOROVOD_CONTROLLER=gloo HOROVOD_CPU_OPERATIONS=gloo
    else
        echo "shaped_link: OPS must be mpi or gloo, got $OPS" >&2; exit 1
    fi
    export HOROVOD_HIERARCHICAL_ALLREDUCE=0 HOROVOD_HIERARCHICAL_ALLGATHER=0 HOROVOD_AUTOTUNE=0
    export HOROVOD_CYCLE_TIME="${HOROVOD_CYCLE_TIME:-1}"
    export HOROVOD_FUSION_THRESHOLD="${HOROVOD_FUSION_THRESHOLD:-67108864}"
}

tbf_args() {  # burst must exceed lo's 64 KiB GSO packets; QUEUE bounds the queue (drops beyond)
    case "$1" in
        100mbit) echo "rate 100mbit burst 256kb ${QUEUE:-latency 50ms}" ;;
        *) echo "rate $1 burst 1mb ${QUEUE:-latency 50ms}" ;;
    esac
}

shape_lo() {  # shape lo at rate $1, or remove the shaping for "unshaped"
    if [[ "$1" == unshaped ]]; then
        tc qdisc del dev lo root 2>/dev/null || true
    else
        # shellcheck disable=SC2046
        tc qdisc replace dev lo root tbf $(tbf_args "$1")
    fi
    echo "== lo: $(tc qdisc show dev lo)"
}

lo_qdisc_sent() {
    tc -s qdisc show dev lo | awk '/Sent/ {print $2}'
}

lo_qdisc_dropped() {
    tc -s qdisc show dev lo | awk '/Sent/ {sub(/,$/, "", $7); print $7}'
}

mpi_launch() {  # LAUNCH: the launcher for $1 ranks; TRANSPORT: a label for the tables
    local np=$1
    if [[ "$OPS" == mpi ]]; then
        LAUNCH=(mpirun -np "$np" --bind-to none
                --mca pml ob1 --mca btl self,tcp --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo
                -x SLOW_LINK_NETNS -x HOROVOD_CPU_OPERATIONS -x HOROVOD_CONTROLLER -x HOROVOD_CYCLE_TIME
                -x HOROVOD_FUSION_THRESHOLD -x HOROVOD_HIERARCHICAL_ALLREDUCE -x HOROVOD_HIERARCHICAL_ALLGATHER
                -x HOROVOD_AUTOTUNE -x HOROVOD_GLOO_IFACE -x OMP_NUM_THREADS -x PYTHONUNBUFFERED)
        TRANSPORT="Horovod MPI ops, Open MPI btl self,tcp on lo"
    else
        LAUNCH=(horovodrun --gloo -np "$np" -H "localhost:$np" --network-interface lo)
        TRANSPORT="Horovod Gloo ops (horovodrun --gloo) on lo"
    fi
}
