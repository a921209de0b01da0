"""Preemption: remember a SIGUSR1/SIGTERM, stop every rank at the same step, checkpoint
it and exit EXIT_REQUEUE so Slurm (slurm/*.sbatch) requeues the job."""
from __future__ import annotations

import signal

# EX_TEMPFAIL from sysexits.h: "try again later", what the sbatch scripts requeue on.
EXIT_REQUEUE = 75


class StopSignal:
    """Remembers that SIGUSR1/SIGTERM arrived; the loop stops after the current step."""

    def __init__(self, *signums):
        self.flag = False
        self.name = ""
        self._old = {s: signal.signal(s, self._handle) for s in signums}

    def _handle(self, signum, frame):
        self.flag = True
        self.name = signal.Signals(signum).name

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def checkpoint_for_requeue(stopper: StopSignal, saver, state, log) -> int:
    """All ranks stopped at the same step (a signal reached one of them): rank 0 saves
    that step, then every rank exits EXIT_REQUEUE."""
    who = stopper.name or "a signal to another rank"
    # Paddle's own launcher SIGTERMs the other ranks as soon as one exits 75: ignore that
    # (SIG_IGN survives interpreter shutdown). saver.save returns on every rank only once
    # rank 0 has written the checkpoint, so the ranks exit together after it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    saver.save(state, reason=who)
    log.info(f"[run] stopped by {who} at step {state.global_step}; "
             f"checkpointed, exit {EXIT_REQUEUE} (requeue)")
    return EXIT_REQUEUE
