# shellcheck shell=bash
# Shared by the sbatch scripts in this folder: sourced by them, never submitted itself.
#
# Arguments and environment the scripts take (all passed on by sbatch, --export=ALL):
#   $1 or CONFIG   the recipe, e.g. configs/dpn68.yaml (relative to the submit directory)
#   OUTPUT_DIR     becomes -o Global.output_dir=...; the run auto-resumes from it
#   OVERRIDES      space-separated Section.key=value words, each becomes -o ...
#   PYTHON         interpreter (default python3: the active virtual environment's)
#   the rest       train.py arguments after the config, e.g. -o Global.epochs=90;
#                  they come after OUTPUT_DIR and OVERRIDES, so they win over them

EXIT_REQUEUE=75  # train.py: "stopped by SIGUSR1/SIGTERM after checkpointing"

ppdpn_log() { echo "ppdpn[$(date +%H:%M:%S)]: $*" >&2; }

# ppdpn_parse_args "$@" -> sets CONFIG and the TRAIN_ARGS array.
ppdpn_parse_args() {
    if [[ $# -ge 1 && "$1" != -* ]]; then
        CONFIG="$1"
        shift
    fi
    if [[ -z "${CONFIG:-}" ]]; then
        ppdpn_log "no recipe: pass it as the first argument or as CONFIG=..."
        exit 2
    fi
    TRAIN_ARGS=()
    if [[ -n "${OUTPUT_DIR:-}" ]]; then
        TRAIN_ARGS+=(-o "Global.output_dir=$OUTPUT_DIR")
    fi
    local words word
    read -r -a words <<<"${OVERRIDES:-}"  # split on spaces, without glob expansion
    for word in "${words[@]}"; do
        TRAIN_ARGS+=(-o "$word")
    done
    TRAIN_ARGS+=("$@")
}

ppdpn_banner() {
    ppdpn_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) on $SLURM_JOB_NODELIST," \
        "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}, config $CONFIG ${TRAIN_ARGS[*]}"
}

# ppdpn_rendezvous: exports MASTER_ADDR, MASTER_PORT and NNODES for launch.sh on every
# node of the job. Node 0 (the first host of the allocation) holds the rendezvous.
# MASTER_ADDR is node 0's address as Slurm itself reaches it (its NodeAddr), not what
# its host name resolves to: with Debian's /etc/hosts a node's own name is 127.0.1.1,
# which no other node can reach. A NodeAddr that is a name is resolved, loopback skipped.
ppdpn_rendezvous() {
    local host addr
    host="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        addr="$(scontrol show node "$host" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)"
        if ! [[ "$addr" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
            addr="$(getent ahostsv4 "${addr:-$host}" | awk '$1 !~ /^127\./ {print $1; exit}')"
        fi
        if [[ -z "$addr" ]]; then
            ppdpn_log "no IPv4 address of node 0 ($host) other nodes can reach:" \
                "its NodeAddr and name resolve only to loopback; set MASTER_ADDR"
            exit 2
        fi
        MASTER_ADDR="$addr"
    fi
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"  # jobs sharing node 0 differ
    NNODES="$SLURM_JOB_NUM_NODES"
    export MASTER_ADDR MASTER_PORT NNODES
    ppdpn_log "rendezvous at $MASTER_ADDR:$MASTER_PORT ($host), $NNODES node(s):" \
        "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')"
}

# ppdpn_srun_launch ARGS...: launch.sh ARGS on every node of the job, one task each,
# with NODE_RANK = Slurm's node index (node 0 is the rendezvous host).
# --cpus-per-task: the launcher's processes and data loaders use the whole node.
# --kill-on-bad-exit=0: Paddle's launchers already stop their workers when a peer node
# fails, and a node that exits 75 must not kill the others while they save.
# exec: run in the background by ppdpn_run_requeueable, the signals it forwards must
# reach srun itself, not a subshell around it.
ppdpn_srun_launch() {
    # shellcheck disable=SC2016  # $SLURM_NODEID expands in each task, not here
    exec srun --nodes="$NNODES" --ntasks-per-node=1 \
        --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=0 \
        bash -c 'NODE_RANK="$SLURM_NODEID" exec "$@"' launch.sh "$REPO/launch.sh" "$@"
}

# ppdpn_run_requeueable CMD... : run CMD, pass the batch shell's signals on, requeue on 75.
#
# `--signal=B:USR1@N` signals only this batch shell, which would die of it. So CMD runs
# in the background and USR1 (the time limit is near) or TERM (scancel, shutdown) is
# forwarded to it as USR1: launch.sh and srun both pass that on to the training
# processes, which checkpoint and exit 75. On 75 after USR1 (or with no signal), the job
# requeues itself and exits 0; the next run resumes from the output dir. After TERM it
# does not: the job was cancelled, or Slurm's own preemption requeues it.
ppdpn_run_requeueable() {
    PPDPN_STOP_SIGNAL=""
    PPDPN_SIGNALS=0
    "$@" &
    PPDPN_CHILD=$!
    trap 'ppdpn_forward USR1' USR1
    trap 'ppdpn_forward TERM' TERM
    local rc seen
    # `wait` returns early (>128) when a trapped signal arrives: wait again until CMD
    # itself has exited, so that rc is its exit code.
    while :; do
        seen=$PPDPN_SIGNALS
        rc=0
        wait "$PPDPN_CHILD" || rc=$?
        (( PPDPN_SIGNALS == seen )) && break
    done
    trap - USR1 TERM
    ppdpn_log "training exited with $rc"
    if (( rc == EXIT_REQUEUE )) && [[ "$PPDPN_STOP_SIGNAL" != TERM ]]; then
        if scontrol requeue "$SLURM_JOB_ID"; then
            ppdpn_log "checkpointed; requeued job $SLURM_JOB_ID, it resumes when it starts again"
            exit 0
        fi
        ppdpn_log "checkpointed, but scontrol requeue failed: resubmit this script to resume"
    fi
    exit "$rc"
}

# shellcheck disable=SC2317  # reached through the traps set above
ppdpn_forward() {
    PPDPN_SIGNALS=$((PPDPN_SIGNALS + 1))
    [[ "$PPDPN_STOP_SIGNAL" == TERM ]] || PPDPN_STOP_SIGNAL="$1"
    ppdpn_log "SIG$1: asking training to checkpoint and stop"
    kill -USR1 "$PPDPN_CHILD" 2>/dev/null || true
}
