#!/usr/bin/env bash
# Train on this node: one process per GPU (NPROC CPU processes when there is none), under
# `python -m ppdpn.launch` (Paddle's launcher, which owns the per-process environment,
# logs and teardown; see "The launcher" below).
#
#   ./launch.sh configs/dpn68.yaml [-o Section.key=value ...] [more train.py arguments]
#
# Environment, all optional:
#   PYTHON       interpreter (default python3: the active virtual environment's)
#   NPROC        processes on this node (default: every visible GPU; 2 on a CPU-only node)
#   NNODES       nodes in the job (default 1). With NNODES > 1 every node runs this script
#                with the same MASTER_ADDR:MASTER_PORT and its own NODE_RANK:
#   NODE_RANK    0..NNODES-1; node 0 hosts the rendezvous
#   MASTER_ADDR  address of node 0, reachable from every node
#   MASTER_PORT  a free TCP port on node 0 (default 6170)
#   NODE_ADDR    this node's own IPv4 address, passed to the launcher as --host (default:
#                the address this node reaches MASTER_ADDR from). Paddle's launcher takes
#                its own address from its host name otherwise, and a name that resolves
#                to 127.0.1.1 (Debian's /etc/hosts) hangs the job.
#   GLOO_SOCKET_IFNAME  the interface gloo (CPU collectives) binds to (default: the one
#                holding NODE_ADDR; gloo too would otherwise follow the host name)
#   RENDEZVOUS_TIMEOUT  seconds the nodes may take to meet at MASTER_ADDR:MASTER_PORT;
#                after that each fails (exit 2) naming the address (default 300)
#   LOG_DIR      launcher logs, workerlog.N per process (default <Global.output_dir>/log,
#                plus /node<NODE_RANK> on multi-node runs: the launcher names logs by local
#                rank only, so nodes sharing a file system would overwrite each other's)
#   LAUNCH_LOG_LEVEL  the launcher's own log level (default WARNING; INFO shows its
#                configuration dump and status lines: pod failed, exit code, ...)
#   DRY_RUN=1    check everything and print the launcher command instead of running it
#
# GPUs come from CUDA_VISIBLE_DEVICES when it is set (Slurm sets it for --gres=gpu:N),
# else from `nvidia-smi -L`; NPROC below their number uses the first NPROC of them.
#
# The launcher: ppdpn/launch.py, Paddle's with a stop path that waits for the checkpoint.
# SIGINT (Ctrl-C), SIGTERM and SIGUSR1 make every training process checkpoint and exit 75
# ("requeue me"); a second SIGINT or SIGTERM stops at once. The launcher's exit code is
# this script's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"

die() { echo "launch.sh: $*" >&2; exit 2; }

# need_count NAME VALUE MIN: VALUE must be a whole number >= MIN.
need_count() {
    if ! [[ "$2" =~ ^[0-9]+$ ]] || (( 10#$2 < $3 )); then
        die "$1=$2 must be a whole number >= $3"
    fi
}

is_ipv4() { [[ "$1" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; }

# node_address: prints "ADDRESS INTERFACE" of this node: NODE_ADDR, else the source
# address of the route to MASTER_ADDR (a UDP connect chooses it and sends nothing), and
# the interface that holds it.
node_address() {
    "$PYTHON" - "$MASTER_ADDR" "${NODE_ADDR:-}" <<'EOF'
import socket
import sys

import psutil

master, addr = sys.argv[1], sys.argv[2]
if not addr:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))
            addr = s.getsockname()[0]
    except OSError as e:
        sys.exit(f"launch.sh: no route from this node to MASTER_ADDR={master} ({e})")
ifaces = [name for name, addrs in psutil.net_if_addrs().items()
          for a in addrs if a.family == socket.AF_INET and a.address == addr]
if not ifaces:
    sys.exit(f"launch.sh: NODE_ADDR={addr} is not an IPv4 address of this node")
print(addr, ifaces[0])
EOF
}

# rendezvous_answers: node 0's rendezvous server accepts a connection (3 s: a SYN and
# its first resend; a host that is down answers no sooner).
rendezvous_answers() {
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$MASTER_ADDR" "$MASTER_PORT" 2>/dev/null
}

# rendezvous_watchdog PID: Paddle's launcher waits for its peers forever, node 0 for the
# other nodes and nodes 1.. for node 0's server ("master not ready"), so a wrong or
# unreachable address, or a node that never starts, would hang the job. The launcher
# starts its training processes only once all NNODES nodes have met: if launcher PID has
# none after RENDEZVOUS_TIMEOUT s, this says why, stops it (TERM, then KILL), exits 2.
rendezvous_watchdog() {
    trap '' USR1
    local deadline=$((SECONDS + RENDEZVOUS_TIMEOUT))
    until pgrep -P "$1" >/dev/null; do
        kill -0 "$1" 2>/dev/null || exit 0  # it ended by itself
        if (( SECONDS >= deadline )); then
            trap '' TERM  # decided: launch.sh's own TERM below must not cut this short
            if (( NODE_RANK > 0 )) && ! rendezvous_answers; then
                echo "launch.sh: node $NODE_RANK ($NODE_ADDR) cannot reach the rendezvous on" \
                    "node 0 at $MASTER_ADDR:$MASTER_PORT after $RENDEZVOUS_TIMEOUT s" \
                    "(RENDEZVOUS_TIMEOUT): is node 0 up, and is MASTER_ADDR its address?" >&2
            else
                echo "launch.sh: node $NODE_RANK ($NODE_ADDR): not all $NNODES nodes met at" \
                    "$MASTER_ADDR:$MASTER_PORT within $RENDEZVOUS_TIMEOUT s (RENDEZVOUS_TIMEOUT):" \
                    "does every node run launch.sh with NNODES=$NNODES and this address?" >&2
            fi
            kill -TERM "$1" 2>/dev/null
            for _ in $(seq 10); do
                kill -0 "$1" 2>/dev/null || exit 2
                sleep 1
            done
            kill -KILL "$1" 2>/dev/null
            exit 2
        fi
        sleep 1
    done
    exit 0
}

count_gpus() {
    # Slurm writes NoDevFiles when the node has GPUs but the job asked for none.
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        case "$CUDA_VISIBLE_DEVICES" in
            "" | NoDevFiles | -1) echo 0 ;;
            *) tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . ;;
        esac
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

# ---------------------------------------------------------------- arguments
usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}
[[ $# -ge 1 ]] || die "usage: launch.sh CONFIG.yaml [-o Section.key=value ...] (--help: more)"
if [[ "$1" == -h || "$1" == --help ]]; then
    usage
    exit 0
fi
CONFIG="$1"
shift
[[ -f "$CONFIG" ]] || die "config file not found: $CONFIG (usage: launch.sh CONFIG.yaml [-o Section.key=value ...]; --help: more)"
TRAIN_ARGS=("$@")

# The -o values, to check them here; train.py takes `-o a=1 b=2` and `-o a=1 -o b=2`.
OVERRIDES=()
in_override=0
for arg in "$@"; do
    if [[ "$arg" == "-o" || "$arg" == "--override" ]]; then
        in_override=1
    elif [[ "$arg" == -* ]]; then
        in_override=0
    elif (( in_override )); then
        OVERRIDES+=("$arg")
    fi
done

# ---------------------------------------------------------------- topology
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_PORT="${MASTER_PORT:-6170}"
need_count NNODES "$NNODES" 1
need_count NODE_RANK "$NODE_RANK" 0
NNODES=$((10#$NNODES)) NODE_RANK=$((10#$NODE_RANK))
(( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
if (( NNODES > 1 )); then
    [[ -n "${MASTER_ADDR:-}" ]] || die "NNODES=$NNODES needs MASTER_ADDR (the address of node 0)"
    if ! [[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || (( 10#$MASTER_PORT < 1 || 10#$MASTER_PORT > 65535 ))
    then
        die "MASTER_PORT=$MASTER_PORT must be a TCP port (1-65535)"
    fi
    # Paddle's launcher compares --master with its own address as strings: names fail.
    is_ipv4 "$MASTER_ADDR" || die "MASTER_ADDR=$MASTER_ADDR must be node 0's IPv4 address, not a name"
    [[ -z "${NODE_ADDR:-}" ]] || is_ipv4 "$NODE_ADDR" || die "NODE_ADDR=$NODE_ADDR must be an IPv4 address"
    RENDEZVOUS_TIMEOUT="${RENDEZVOUS_TIMEOUT:-300}"
    need_count RENDEZVOUS_TIMEOUT "$RENDEZVOUS_TIMEOUT" 1
    if [[ -z "${NODE_ADDR:-}" || -z "${GLOO_SOCKET_IFNAME:-}" ]]; then
        found="$(node_address)" || exit 2
        read -r NODE_ADDR iface <<<"$found"
        GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$iface}"
    fi
    export GLOO_SOCKET_IFNAME
    if (( NODE_RANK == 0 )) && [[ "$MASTER_ADDR" != "$NODE_ADDR" && "$MASTER_ADDR" != 127.0.0.1 ]]
    then
        die "node 0 hosts the rendezvous, but MASTER_ADDR=$MASTER_ADDR is not its address" \
            "(NODE_ADDR=$NODE_ADDR): Paddle's launcher would wait for another node 0 forever"
    fi
fi

GPUS="$(count_gpus)"
if (( GPUS > 0 )); then
    NPROC="${NPROC:-$GPUS}"
else
    # The CPU launcher crashes on an empty CUDA_VISIBLE_DEVICES; with none set it picks gloo.
    unset CUDA_VISIBLE_DEVICES
    NPROC="${NPROC:-2}"
fi
need_count NPROC "$NPROC" 1
NPROC=$((10#$NPROC))
(( GPUS == 0 || NPROC <= GPUS )) || die "NPROC=$NPROC but only $GPUS GPU(s) are visible"

# ---------------------------------------------------------------- config
# Fail here, before any process starts, on a bad recipe or override; learn the output dir.
# PYTHONWARNINGS: Paddle's import warns about ccache, which is noise here.
checked="$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore "$PYTHON" -c '
import sys
try:
    from ppdpn.config import ConfigError, load_config
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ImportError as e:
    sys.exit(f"launch.sh: {sys.executable} cannot run ppdpn ({e}): "
             f"activate its virtual environment or set PYTHON")
except ConfigError as e:
    sys.exit(f"launch.sh: config error: {e}")
print(cfg.Global.output_dir)
' "$CONFIG" "${OVERRIDES[@]}")" || exit 2
OUTPUT_DIR="$(tail -n 1 <<<"$checked")"

if (( NNODES > 1 )); then
    LOG_DIR="${LOG_DIR:-$OUTPUT_DIR/log/node$NODE_RANK}"
else
    LOG_DIR="${LOG_DIR:-$OUTPUT_DIR/log}"
fi

CMD=("$PYTHON" -m ppdpn.launch --nproc_per_node "$NPROC" --log_dir "$LOG_DIR"
     --log_level "${LAUNCH_LOG_LEVEL:-WARNING}")
WHERE=""
if (( NNODES > 1 )); then
    # --host: the launcher's own address (its endpoints, and the rendezvous server when
    # it equals --master), instead of what its host name resolves to.
    CMD+=(--nnodes "$NNODES" --master "$MASTER_ADDR:$MASTER_PORT" --rank "$NODE_RANK"
          --host "$NODE_ADDR")
    WHERE=" at $NODE_ADDR ($GLOO_SOCKET_IFNAME), rendezvous on node 0 at $MASTER_ADDR:$MASTER_PORT,"
fi
CMD+=("$ROOT/train.py" -c "$CONFIG" "${TRAIN_ARGS[@]}")

echo "launch.sh: node $NODE_RANK/$NNODES$WHERE $NPROC process(es) ($GPUS GPU(s)), logs in $LOG_DIR" >&2
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi

# ---------------------------------------------------------------- run
# The launcher runs in the background so that this shell can take signals while it
# waits, and passes them on: the first as SIGUSR1 (checkpoint and stop: the launcher may
# have had the same Ctrl-C from the terminal or SIGTERM from Slurm, and a USR1 on top
# changes nothing), a later SIGINT or SIGTERM as SIGUSR2 (stop at once). It starts with
# both ignored until it handles them: srun and `scancel --signal=USR1` signal the whole
# process group, and a launcher killed by USR1 would orphan its workers. PYTHONPATH:
# ppdpn.launch from this checkout.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
(trap '' USR1 USR2; exec "${CMD[@]}") &
LAUNCHER=$!
WATCHDOG=""
if (( NNODES > 1 )); then
    rendezvous_watchdog "$LAUNCHER" &
    WATCHDOG=$!
fi
SIGNALS=0

# shellcheck disable=SC2317  # reached through the traps below
forward_stop() {
    SIGNALS=$((SIGNALS + 1))
    if (( SIGNALS > 1 )) && [[ "$1" != USR1 ]]; then
        kill -USR2 "$LAUNCHER" 2>/dev/null || true
    else
        kill -USR1 "$LAUNCHER" 2>/dev/null || true
    fi
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM
trap 'forward_stop INT' INT

# `wait` returns early (>128) when a trapped signal arrives; wait again until the launcher
# itself has exited, so that its exit code is the one passed on.
while :; do
    seen=$SIGNALS
    rc=0
    wait "$LAUNCHER" || rc=$?
    (( SIGNALS == seen )) && break
done
if [[ -n "$WATCHDOG" ]]; then
    kill "$WATCHDOG" 2>/dev/null || true  # still waiting: the launcher ended by itself
    watchdog_rc=0
    wait "$WATCHDOG" 2>/dev/null || watchdog_rc=$?
    (( watchdog_rc != 2 )) || exit 2  # the nodes never met: the watchdog stopped the launcher
fi
exit "$rc"
