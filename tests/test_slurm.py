"""The sbatch scripts on a real one-node Slurm cluster (tests/slurm_cluster.py).

Every job runs the real train.py on the demo data set: slurm/*.sbatch -> launch.sh ->
Paddle's launcher -> 2 CPU processes, as a user's job would. The timings in the
comments were measured on the 2-core CI machine.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import assert_completed, read, wait_for_checkpoint
from slurm_cluster import slurm  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 4            # the demo set below gives 3 steps per epoch with 2 processes
STEPS_PER_EPOCH = 3
JOB_TIMEOUT = 240     # a demo job takes ~20 s; a requeue waits ~15 s before restarting


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    subprocess.run([sys.executable, "-m", "data.make_demo", "--out", str(out),
                    "--train-per-class", "16", "--val-per-class", "4"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    return out


def job_env(out_dir: Path, **extra) -> dict:
    return {"PYTHON": sys.executable, "OUTPUT_DIR": str(out_dir), **extra}


def demo_args(data: Path, epochs: int = EPOCHS) -> list:
    return ["configs/demo.yaml", "-o", f"DataLoader.image_root={data}",
            f"Global.epochs={epochs}", "Global.print_interval=1"]


def eval_lines(text: str) -> list:
    """The eval JSON objects a job printed (one per line)."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"top1"' in line:
            found.append(json.loads(line))
    return found


def global_steps(out_dir: Path) -> list:
    lines = read(out_dir / "metrics.jsonl").splitlines()
    return [json.loads(line)["global_step"] for line in lines if line.strip()]


@pytest.fixture(scope="module")
def finished_run(slurm, demo_data, tmp_path_factory):
    """One uninterrupted single-node job: the reference for the other tests."""
    root = tmp_path_factory.mktemp("single")
    out, log = root / "out", root / "job.log"
    t0 = time.monotonic()
    job = slurm.submit(REPO / "slurm/train_single_node.sbatch", demo_args(demo_data),
                       env=job_env(out), log=log, cwd=REPO)
    info = slurm.wait_done(job, JOB_TIMEOUT)
    return {"out": out, "log": log, "info": info, "seconds": time.monotonic() - t0}


def test_single_node_job_trains_checkpoints_and_prints_eval(finished_run):
    out, log = finished_run["out"], finished_run["log"]
    assert_completed(finished_run["info"], log)
    assert global_steps(out) == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    from ppdpn.checkpoint import latest_checkpoint, load_checkpoint
    ckpt = load_checkpoint(latest_checkpoint(out))
    assert ckpt["global_step"] == EPOCHS * STEPS_PER_EPOCH
    metrics = eval_lines(read(log))
    assert metrics, f"no eval JSON in the job log\n{read(log)[-3000:]}"
    assert set(metrics[-1]) >= {"top1", "top5", "loss", "images"}
    assert metrics[-1]["images"] == 40
    assert "SLURM_RESTART_COUNT=0" in read(log)


@pytest.mark.parametrize("script, sbatch_args", [
    ("train_single_node.sbatch", []),
    ("train_multi_node.sbatch", ["--nodes=1"]),  # the test cluster has one node
])
def test_preempted_job_checkpoints_requeues_and_resumes(slurm, demo_data, finished_run,
                                                        tmp_path, script, sbatch_args):
    """SIGUSR1 to the batch shell, as --signal=B:USR1@N sends it before the time limit.

    The multi-node script runs on the one node here: its srun path (USR1 through srun to
    launch.sh) is what this checks; the rendezvous of several nodes is tested in
    test_launch.py.
    """
    out, log = tmp_path / "out", tmp_path / "job.log"
    job = slurm.submit(REPO / "slurm" / script, demo_args(demo_data), env=job_env(out),
                       sbatch_args=sbatch_args, log=log, cwd=REPO)
    wait_for_checkpoint(slurm, job, out)
    slurm.signal_batch(job, "USR1")
    requeued = slurm.wait_state(job, {"PENDING", "REQUEUED", "COMPLETED", "FAILED"}, 60)
    assert requeued["JobState"] in ("PENDING", "REQUEUED"), \
        f"not requeued: {requeued['JobState']} {requeued['ExitCode']}\n{read(log)[-4000:]}"
    info = slurm.wait_done(job, JOB_TIMEOUT)
    assert_completed(info, log)
    assert info["Restarts"] == "1"

    text = read(log) + read(out / "train.log")
    assert "SLURM_RESTART_COUNT=1" in text
    # train.py's lines "[run] stopped by SIGUSR1 at step N; checkpointed, exit 75" and
    # "[resume] <checkpoint>: ..., global step N".
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+)", text)
    assert stopped, f"no stop on SIGUSR1 in the log\n{text[-4000:]}"
    stop_step = int(stopped.group(1))
    assert 0 < stop_step < EPOCHS * STEPS_PER_EPOCH, "the signal came after the end"
    assert re.search(rf"\[resume\] .*global step {stop_step}\b", text), \
        f"did not resume at step {stop_step}\n{text[-4000:]}"
    # Same steps, epoch by epoch, as the uninterrupted job: nothing lost or repeated.
    assert global_steps(out) == global_steps(finished_run["out"])
    from ppdpn.checkpoint import latest_checkpoint, load_checkpoint
    assert load_checkpoint(latest_checkpoint(out))["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert eval_lines(read(log)), "the resumed run printed no eval JSON"


def test_scancel_leaves_a_loadable_checkpoint(slurm, demo_data, tmp_path):
    """scancel: SIGTERM to the job, SIGKILL after KillWait; no requeue, no orphans."""
    out, log = tmp_path / "out", tmp_path / "job.log"
    # The recipe and overrides as variables this time, as `CONFIG=... sbatch ...`.
    env = job_env(out, CONFIG="configs/demo.yaml",
                  OVERRIDES=f"DataLoader.image_root={demo_data} Global.epochs=50")
    job = slurm.submit(REPO / "slurm/train_single_node.sbatch", [], env=env, log=log, cwd=REPO)
    wait_for_checkpoint(slurm, job, out)
    slurm.cancel(job)
    info = slurm.wait_done(job, 60)
    assert info["JobState"] == "CANCELLED"
    assert info["Restarts"] == "0"

    deadline = time.monotonic() + 30
    while slurm.leftover_job_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not slurm.leftover_job_processes(), "training processes outlived the job"
    from ppdpn.checkpoint import latest_checkpoint, load_checkpoint
    path = latest_checkpoint(out)
    assert path is not None, f"no valid checkpoint left\n{read(log)[-3000:]}"
    ckpt = load_checkpoint(path)
    assert ckpt["global_step"] >= STEPS_PER_EPOCH
    assert ckpt["global_step"] < 50 * STEPS_PER_EPOCH


def test_eval_job_prints_metrics_of_a_checkpoint(slurm, demo_data, finished_run, tmp_path):
    log = tmp_path / "eval.log"
    run_dir = finished_run["out"]
    job = slurm.submit(REPO / "slurm/eval.sbatch",
                       ["configs/demo.yaml", run_dir, "-o", f"DataLoader.image_root={demo_data}"],
                       env=job_env(tmp_path / "eval_out"), log=log, cwd=REPO)
    info = slurm.wait_done(job, JOB_TIMEOUT)
    assert_completed(info, log)
    last = read(log).strip().splitlines()[-1]
    metrics = json.loads(last)
    assert set(metrics) >= {"top1", "top5", "loss", "images"}
    assert metrics["images"] == 40
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    assert f"ckpt-{EPOCHS * STEPS_PER_EPOCH:08d}.pdckpt" in read(log)
