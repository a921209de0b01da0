"""Paddle's launcher as a training run needs it.

    python -m ppdpn.launch --nproc_per_node 2 train.py -c configs/demo.yaml

takes the flags of `python -m paddle.distributed.launch` (launch.sh and tools/demo.sh use
it) and runs that launcher with four changes:

* Stopping. Paddle's launcher answers SIGINT/SIGTERM by SIGTERMing its workers, SIGKILLs
  them 30 s later (10 s after a second signal: no flag changes either) and exits with
  the signal's number: 2 for Ctrl-C, which README calls "bad config". A preemption
  checkpoint of a large model on a network file system can take longer than that. Here
  the first SIGINT, SIGTERM or SIGUSR1 asks every rank to checkpoint (SIGUSR1, which
  train.py handles) and waits for them with no deadline of its own (Slurm's KillWait is
  the deadline); they exit 75 and so does this. A second SIGINT or SIGTERM, or a SIGUSR2
  (launch.sh's way of passing on a second signal), stops everything at once: exit 128 +
  the signal's number.
* Workers start with SIGUSR1 ignored (until train.py handles it), so a signal that
  arrives while they import cannot kill one.
* Output. Without --log_level, the launcher's configuration dump and status lines are off
  (--log_level INFO brings them back). A failure is one line naming the rank, its exit
  code and its log, plus the end of that log when rank 0's streamed output has not shown
  the same failure already; a planned stop (exit 75) is not reported as a failure.
* Environment. The launcher writes each worker's environment into its log folder
  (envlog.N, backup_env.N.json, <job>.<pod>.log), by default inside the run folder. Those
  files keep only the variables named in ENV_KEPT, so tokens and passwords in the
  environment do not travel with the checkpoints.

The changes replace a handful of the launcher's methods; `patch()` checks that each
still exists and fails naming the Paddle version if not.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from ppdpn.quiet import before_paddle_import
from ppdpn.requeue import EXIT_REQUEUE

# Prefixes of the variables the launcher's environment files keep: Paddle's and the
# communication libraries' own settings, which is what those files are read for.
ENV_KEPT = ("PADDLE_", "FLAGS_", "POD_", "CUDA_", "NCCL_", "GLOO_", "NVIDIA_", "GLOG_",
            "TRAINER", "DISTRIBUTED_", "MASTER_", "OMP_", "SLURM_JOB_ID", "SLURM_PROCID")
# Seconds a failed rank's log tail waits to learn whether rank 0 failed alike.
SAME_FAILURE_WAIT = 2.0

_controller = None  # the launcher's controller, once it exists
_stopping = ""  # the signal that started a planned stop
_pending = False  # a stop asked for before the workers started
_hard_signals: set = set()  # INT / TERM seen


def kept_env(env) -> dict:
    return {k: v for k, v in env.items() if k.startswith(ENV_KEPT)}


def say(msg: str) -> None:
    print(f"launch: {msg}", file=sys.stderr, flush=True)


def _live_worker_pids() -> list:
    """Pids of the training processes still running (each leads its process group)."""
    if _controller is None:
        return []
    # Container -> ProcessContext -> Popen
    procs = [getattr(c._proc, "_proc", None) for c in _controller.pod.containers]
    return [p.pid for p in procs if p is not None and p.poll() is None]


def _ask_workers_to_stop() -> int:
    pids = _live_worker_pids()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGUSR1)  # the process only: its DataLoader workers die of USR1
        except ProcessLookupError:
            pass
    return len(pids)


def _on_signal(signum, frame) -> None:
    """USR1: checkpoint and stop (again: nothing more). INT, TERM: the same the first
    time, at once the second. USR2: at once (launch.sh's second signal)."""
    global _stopping, _pending
    name = signal.Signals(signum).name
    if signum == signal.SIGUSR2 or (signum != signal.SIGUSR1 and _hard_signals):
        _stop_now(name)
    if signum != signal.SIGUSR1:
        _hard_signals.add(signum)
    if _stopping:
        return  # one stop, whichever signals asked for it
    _stopping = name
    n = _ask_workers_to_stop()
    if n:
        say(f"stop requested ({name}): every training process checkpoints and exits "
            f"{EXIT_REQUEUE} (Ctrl-C again stops at once)")
    elif _controller is not None and _controller.pod.containers:
        say(f"{name} before training started: nothing to save, exit {EXIT_REQUEUE}")
        os._exit(EXIT_REQUEUE)
    else:
        _pending = True  # answered once the workers exist (_deploy_pod)


def _stop_now(name: str) -> None:
    say(f"{name} again: stopping now, without waiting for the checkpoint")
    for pid in _live_worker_pids():
        try:
            os.killpg(pid, signal.SIGKILL)  # the worker and its DataLoader processes
        except (ProcessLookupError, PermissionError):
            pass
    os._exit(128 + signal.Signals[name])


def _child_setup() -> None:
    """In each worker between fork and exec: its own session, as the launcher does, and
    SIGUSR1 ignored (an ignored signal stays ignored across exec)."""
    os.setsid()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class _KeptEnvJson:
    """Stands in for `json` in the launcher's process module, which dumps a worker's whole
    environment into backup_env.N.json: the file gets only ENV_KEPT variables (workers
    read it for the long PADDLE_* values left out of their environment)."""

    @staticmethod
    def dump(obj, f, **kwargs):
        import json
        return json.dump(kept_env(obj), f, **kwargs)


def patch() -> None:
    """Replace the launcher's methods described in the module docstring."""
    import paddle
    from paddle.distributed.launch.controllers import controller as ctl
    from paddle.distributed.launch.job import container as cont
    from paddle.distributed.launch.utils import process_context as pc

    needed = [(ctl.ControllerBase, "__init__"), (ctl.ControllerBase, "signal_handler"),
              (ctl.ControllerBase, "deploy_pod"), (ctl.Controller, "_save_container_env"),
              (ctl.Controller, "save_pod_log"), (cont.Container, "tail"),
              (pc.ProcessContext, "__init__"), (pc, "json")]
    missing = [f"{getattr(o, '__name__', o)}.{a}" for o, a in needed if not hasattr(o, a)]
    if missing:
        sys.exit(f"ppdpn.launch: Paddle {paddle.__version__}'s launcher has no "
                 f"{', '.join(missing)}; run python -m paddle.distributed.launch instead")

    init = ctl.ControllerBase.__init__

    def controller_init(self, ctx):
        global _controller
        init(self, ctx)  # installs self.signal_handler for INT, TERM, ABRT
        _controller = self
        signal.signal(signal.SIGUSR1, _on_signal)

    deploy = ctl.ControllerBase.deploy_pod

    def deploy_pod(self):
        deploy(self)
        if _pending:
            time.sleep(1)  # a signal in their first instants finds USR1 ignored: harmless
            _ask_workers_to_stop()

    def save_container_env(self, container, is_init=False):
        name = f"envlog.init.{container.rank}" if is_init else f"envlog.{container.rank}"
        path = os.path.join(self.ctx.args.log_dir, name)
        os.makedirs(self.ctx.args.log_dir, exist_ok=True)
        with open(path, container.log_mode) as f:
            f.writelines(f"{k}={v}\n" for k, v in sorted(kept_env(container.env).items()))

    def save_pod_log(self, info):
        if self.ctx.args.log_dir:  # the original starts the file with all of os.environ
            os.makedirs(self.ctx.args.log_dir, exist_ok=True)
            with open(os.path.join(self.ctx.args.log_dir,
                                   f"{self.job.id}.{self.pod.name}.log"), "a") as f:
                f.write(f"{info}\n")

    tail = cont.Container.tail

    def container_tail(self, length=3000):
        """Called on the first failed rank, in place of the launcher's report."""
        code = self.exit_code
        if code == EXIT_REQUEUE:
            return  # a planned stop: rank 0's own line says so
        streamed = _controller.pod.containers[0] if _controller is not None else self
        if streamed is self:  # its lines were streamed as they came
            say(f"rank {self.rank} failed (exit {code}); its log: {self.errfile}")
            return
        deadline = time.time() + SAME_FAILURE_WAIT
        while streamed.exit_code is None and time.time() < deadline:
            time.sleep(0.1)
        if streamed.exit_code == code:  # rank 0 said why above
            say(f"rank {self.rank} failed (exit {code}), as rank 0 did; its log: {self.errfile}")
            return
        say(f"rank {self.rank} failed (exit {code}); the end of its log {self.errfile}:")
        tail(self, length)

    pc_init = pc.ProcessContext.__init__

    def process_init(self, *args, **kwargs):
        pc_init(self, *args, **kwargs)
        if self._preexec_fn is None and self._group:
            self._preexec_fn = _child_setup

    ctl.ControllerBase.__init__ = controller_init
    ctl.ControllerBase.signal_handler = lambda self, signum, frame: _on_signal(signum, frame)
    ctl.ControllerBase.deploy_pod = deploy_pod
    ctl.Controller._save_container_env = save_container_env
    ctl.Controller.save_pod_log = save_pod_log
    cont.Container.tail = container_tail
    pc.ProcessContext.__init__ = process_init
    pc.json = _KeptEnvJson


class _FailureReportFilter:
    """Drops the launcher's "Container failed" report (its whole command line, and for
    ranks that exited 75 a planned stop called a failure): container_tail, called next,
    says it in one line."""

    def filter(self, record) -> bool:
        return not record.getMessage().startswith("Container failed")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, _on_signal)  # INT, TERM: until the controller takes them over
    before_paddle_import()
    if not any(a == "--log_level" or a.startswith("--log_level=") for a in argv):
        argv = ["--log_level", "WARNING"] + argv
    import logging
    logging.getLogger("LAUNCH").addFilter(_FailureReportFilter())
    patch()
    from paddle.distributed.launch.main import launch
    sys.argv = ["paddle.distributed.launch"] + argv
    launch()


if __name__ == "__main__":
    main()
