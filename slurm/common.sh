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
