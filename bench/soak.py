"""Soak: train on CPU for a while, killing or signalling the job at random, restarting it.

    python bench/soak.py [--minutes 30] [--nproc 2] [--epochs 8] [--save-steps 3]
                         [--fault-after 0.5 4] [--seed 0] [--workdir DIR]

Makes a tiny demo data set (python -m data.make_demo: 4 classes, 64 train / 24 val
images) in a temp dir and trains the demo recipe shrunk to seconds per epoch
(DenseNetTiny, 32 px, batch 8 per process) through paddle.distributed.launch. A random
--fault-after seconds after each job starts training, one fault hits it:
  kill9            SIGKILL to one random rank (a node dying, the OOM killer)
  sigusr1          SIGUSR1 to one random rank (Slurm's --signal before the time limit)
  sigterm_ranks    SIGTERM to every rank (scancel, preemption)
  sigterm_launcher SIGTERM to the launcher (which then stops its workers)
and the same command is run again, resuming from the output dir. A run that finishes
(exit 0) is checked: its latest checkpoint loads through the verified loader into the
model, holds global step epochs * steps_per_epoch, matches metrics.jsonl, and no
half-written files are left; then the next run starts, until --minutes are up (the run
in progress then finishes without faults, so the soak may overrun by one run).

Steps redone per fault = the highest step the job reached - the step the next job
resumed at; after a kill it is at most --save-steps, after a signal it is 0 (the stop
is checkpointed) unless the signal came before the handler was installed.
The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable as `python bench/soak.py` from a checkout
sys.path.insert(1, str(ROOT / "tests"))  # launcher_workers: a test helper (psutil)

FAULTS = ("kill9", "sigusr1", "sigterm_ranks", "sigterm_launcher")
PROGRESS_RE = re.compile(r"^epoch (\d+)/\d+ step (\d+)/(\d+) ", re.M)
START_RE = re.compile(r"\[run\] starting at global step (\d+) of (\d+)")
EXIT_TIMEOUT_S = 120  # a job not gone this long after a fault counts as a hang


def tiny_overrides(data_dir: Path, out_dir: Path, epochs: int, save_steps: int) -> list:
    o = {"Global.output_dir": out_dir, "DataLoader.image_root": data_dir,
         "Arch.name": "DenseNetTiny", "Arch.class_num": 4, "DataLoader.image_size": 32,
         "DataLoader.resize_short": 36, "DataLoader.batch_size": 8, "Global.epochs": epochs,
         "Global.save_steps": save_steps, "Global.print_interval": 1,
         "Global.deterministic": True, "Global.visualdl": False,
         "Optimizer.lr.warmup_epoch": 0, "Optimizer.lr.learning_rate": 0.05}
    return [f"{k}={v}" for k, v in o.items()]


def alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_log(log_dir: Path) -> str:
    path = log_dir / "workerlog.0"
    return path.read_text(errors="replace") if path.is_file() else ""


def job_progress(text: str):
    """(start step, total steps, highest step reached) from rank 0's log."""
    start = START_RE.search(text)
    s, total = (int(start.group(1)), int(start.group(2))) if start else (None, None)
    reached = [(int(e) - 1) * int(n) + int(k) for e, k, n in PROGRESS_RE.findall(text)]
    return s, total, max(reached + ([s] if s is not None else []), default=None)


def inject(kind: str, launcher, pids: dict, rng: random.Random) -> str:
    """Send the fault; returns what was hit."""
    if kind == "sigterm_launcher":
        launcher.send_signal(signal.SIGTERM)
        return "launcher"
    if kind == "sigterm_ranks":
        for pid in pids.values():
            _signal(pid, signal.SIGTERM)
        return "all ranks"
    rank = rng.choice(sorted(pids))
    _signal(pids[rank], signal.SIGKILL if kind == "kill9" else signal.SIGUSR1)
    return f"rank {rank}"


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def run_job(cmd, env, log_dir: Path, nproc: int, fault_at, kind, rng) -> dict:
    """One launch; a fault `fault_at` s after training starts (None: no fault)."""
    from launcher import launcher_workers
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    job = {"fault": None, "rc": None}
    pids, t_train = {}, None
    t_fault = None
    while launcher.poll() is None:
        time.sleep(0.05)
        pids = pids if len(pids) == nproc else launcher_workers(launcher.pid) or pids
        if t_train is None and PROGRESS_RE.search(read_log(log_dir)):
            t_train = time.time()
        if (fault_at is not None and t_fault is None and t_train is not None and pids
                and time.time() - t_train >= fault_at):
            job["fault"], job["target"] = kind, inject(kind, launcher, pids, rng)
            t_fault = time.time()
        if t_fault is not None and time.time() - t_fault > EXIT_TIMEOUT_S:
            job["hang"] = True
            os.killpg(launcher.pid, signal.SIGKILL)
    job["rc"] = launcher.wait()
    if t_fault is not None:
        job["exit_s"] = round(time.time() - t_fault, 2)
    deadline = time.time() + 10
    while any(alive(p) for p in pids.values()) and time.time() < deadline:
        time.sleep(0.1)
    orphans = [p for p in pids.values() if alive(p)]
    for p in orphans:
        _signal(p, signal.SIGKILL)
    if orphans:
        job["orphans"] = len(orphans)
    job["start"], job["total"], job["reached"] = job_progress(read_log(log_dir))
    return job


def check_finished_run(out: Path, total: int) -> dict:
    """The promise at the end: the latest checkpoint verifies, loads into the model,
    and says the run is complete."""
    import numpy as np
    from ppdpn.checkpoint import latest_checkpoint, load_checkpoint
    from ppdpn.models import create_model

    found = {"expected_step": total}
    path = latest_checkpoint(out, log=lambda m: None)
    ckpt = load_checkpoint(path)
    model = create_model("DenseNetTiny", num_classes=4)
    own = model.state_dict()
    fits = set(own) == set(ckpt["model"]) and all(
        list(own[k].shape) == list(v.shape) for k, v in ckpt["model"].items())
    if fits:
        import paddle
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in ckpt["model"].items()})
    finite = all(np.isfinite(v).all() for v in ckpt["model"].values())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if ".tmp" in p.name]
    found.update(checkpoint=path.name, global_step=ckpt["global_step"], loads=fits,
                 finite=bool(finite), metrics_step=rows[-1]["global_step"], tmp_left=leftovers)
    found["ok"] = (fits and finite and not leftovers
                   and ckpt["global_step"] == total == rows[-1]["global_step"])
    return found


def soak(args) -> dict:
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ppdpn_soak_"))
    data = work / "data"
    if not (data / "train_list.txt").is_file():
        subprocess.run([sys.executable, "-m", "data.make_demo", "--out", str(data), "--classes", "4",
                        "--train-per-class", "16", "--val-per-class", "6", "--seed", "3"],
                       cwd=ROOT, check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    t0 = time.time()
    deadline = t0 + args.minutes * 60
    runs, jobs = [], []
    while time.time() < deadline or not runs:
        out = work / f"run{len(runs)}"
        j = 0
        while True:  # jobs of this run until one finishes
            log_dir = out / f"launch{j}"
            cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
                   str(args.nproc), "--log_dir", str(log_dir), "train.py", "-c",
                   "configs/demo.yaml", "-o"] + tiny_overrides(data, out, args.epochs, args.save_steps)
            faulty = time.time() < deadline
            fault_at = rng.uniform(*args.fault_after) if faulty else None
            job = run_job(cmd, env, log_dir, args.nproc, fault_at, rng.choice(FAULTS), rng)
            job["run"], job["job"] = len(runs), j
            jobs.append(job)
            with open(work / "jobs.jsonl", "a") as f:  # the detail behind the summary
                f.write(json.dumps(job) + "\n")
            j += 1
            if job["rc"] == 0 or job.get("hang") or j > 200:
                break
        ok_run = jobs[-1]["rc"] == 0
        result = check_finished_run(out, jobs[-1]["total"]) if ok_run else {"ok": False}
        result["jobs"] = j
        runs.append(result)
        if not result["ok"]:
            break
    return summarize(runs, jobs, time.time() - t0, args, work)


def summarize(runs, jobs, elapsed, args, work) -> dict:
    redone, faults = [], {}
    for prev, nxt in zip(jobs, jobs[1:]):
        if prev["fault"] is None or prev["run"] != nxt["run"] or prev["reached"] is None:
            continue
        resumed = nxt["start"] or 0
        redone.append({"fault": prev["fault"], "redone": max(prev["reached"] - resumed, 0)})
    for job in jobs:
        if job["fault"]:
            faults[job["fault"]] = faults.get(job["fault"], 0) + 1
    exits = [j["exit_s"] for j in jobs if "exit_s" in j]
    kill_exits = [j["exit_s"] for j in jobs if j["fault"] == "kill9" and "exit_s" in j]
    after_kill = [r["redone"] for r in redone if r["fault"] in ("kill9", "sigterm_launcher")]
    after_stop = [r["redone"] for r in redone if r["fault"] in ("sigusr1", "sigterm_ranks")]
    problems = [f"hang after {j['fault']}" for j in jobs if j.get("hang")]
    problems += [f"{j['orphans']} orphan worker(s) after {j['fault']}" for j in jobs if j.get("orphans")]
    problems += [f"run {i} failed its final check: {r}" for i, r in enumerate(runs) if not r["ok"]]
    problems += [f"{n} steps redone after a kill, more than save_steps={args.save_steps}"
                 for n in after_kill if n > args.save_steps]
    return {
        "minutes": round(elapsed / 60, 2), "runs_completed": sum(r["ok"] for r in runs),
        "restarts": sum(1 for j in jobs if j["rc"] != 0), "jobs": len(jobs), "faults": faults,
        "steps_redone": sum(r["redone"] for r in redone),
        "max_redone_after_kill": max(after_kill, default=0),
        "max_redone_after_signal": max(after_stop, default=0),
        "save_steps": args.save_steps,
        "exit_after_fault_s": {"median": statistics.median(exits) if exits else None,
                               "max": max(exits, default=None)},
        "exit_after_kill9_s": {"median": statistics.median(kill_exits) if kill_exits else None,
                               "max": max(kill_exits, default=None)},
        "final_checks": runs, "problems": problems, "ok": not problems and bool(runs),
        "workdir": str(work),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--epochs", type=int, default=8, help="per run (4 steps/epoch on 2 ranks)")
    p.add_argument("--save-steps", type=int, default=3)
    p.add_argument("--fault-after", type=float, nargs=2, default=(0.5, 4.0), metavar=("MIN", "MAX"),
                   help="seconds after a job starts training until its fault")
    p.add_argument("--seed", type=int, default=0, help="of the fault schedule")
    p.add_argument("--workdir", help="keep everything here (default: a temp dir, removed)")
    args = p.parse_args(argv)
    result = soak(args)
    if not args.workdir and result["ok"]:
        shutil.rmtree(result["workdir"], ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
