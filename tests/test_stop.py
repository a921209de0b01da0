"""Stopping a run through launch.sh / ppdpn.launch: Ctrl-C, SIGTERM, twice, a checkpoint
slower than Paddle's launcher would wait for; and what the user reads meanwhile."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, tiny_overrides, worker_pids
from ppdpn.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

SLOW_SAVE = ROOT / "tests" / "slow_save"
SECRET = "tok-8f2e11c0-not-for-logs"
# What Paddle and its launcher print that a user need not read (issue 21, item 7).
NOISE = ("LAUNCH INFO", "ccache", "is not in group", "Modified FLAGS", "always track global mean",
         "topology.py", "distributed strategy", "Container failed", "ERROR LOG DETAIL")


def _env(slow_save_s: float = 0) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC")}
    env.update(PYTHON=sys.executable, NPROC="2", API_TOKEN=SECRET)
    if slow_save_s:
        env.update(SLOW_SAVE_S=str(slow_save_s),
                   PYTHONPATH=os.pathsep.join([str(SLOW_SAVE), env.get("PYTHONPATH", "")]))
    return env


def _args(tiny_data, out, **extra):
    return ["-o"] + tiny_overrides(tiny_data, out, **{"Global.epochs": 40, **extra})


def _wait_for_training(out: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while latest_checkpoint(out, log=lambda *a: None) is None:  # one epoch checkpointed
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)


def test_launch_sh_help_prints_its_usage():
    proc = subprocess.run(["bash", "launch.sh", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "./launch.sh configs/dpn68.yaml" in proc.stdout and "NPROC" in proc.stdout
    assert "second SIGINT or SIGTERM stops at once" in proc.stdout


def test_ctrl_c_waits_for_a_slow_checkpoint_and_exits_75(tiny_data, tmp_path):
    """Ctrl-C (SIGINT to launch.sh's process group, as a terminal sends it) while each
    checkpoint takes 35 s to write, longer than Paddle's launcher waits (30 s): the
    checkpoint is written whole, the command exits 75 saying so once, and no file in the
    run folder holds the environment's token."""
    out = tmp_path / "run"
    proc = subprocess.Popen(["bash", "launch.sh", "configs/demo.yaml", *_args(tiny_data, out)],
                            cwd=ROOT, env=_env(slow_save_s=35), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_training(out)
    before = {p.name for p in list_checkpoints(out / "checkpoints")}
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    text = proc.communicate(timeout=240)[0]
    took = time.time() - t0
    assert proc.returncode == 75, text[-3000:]
    assert took > 35, f"stopped in {took:.0f} s: the slow checkpoint was not waited for"
    new = [p for p in list_checkpoints(out / "checkpoints") if p.name not in before]
    assert len(new) == 1, new  # checkpointed once
    step = load_checkpoint(new[0])["global_step"]
    assert latest_checkpoint(out) == new[0]
    assert f"stopped by SIGUSR1 at step {step}; checkpointed, exit 75" in text
    assert len(re.findall(r"^launch: stop requested", text, re.M)) == 1, text
    assert not [n for n in NOISE if n in text], text
    leaked = [str(p) for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_sigterm_to_the_launcher_then_ctrl_c_stops_at_once(tiny_data, tmp_path):
    """SIGTERM to the launcher starts the checkpoint (no exit yet); a second signal while
    it is written (60 s here) stops everything at once, and resume takes the last
    complete checkpoint."""
    out = tmp_path / "run"
    env = _env(slow_save_s=60)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "ppdpn.launch", "--nproc_per_node", "2", "--log_dir",
         str(out / "log"), "train.py", "-c", "configs/demo.yaml", *_args(tiny_data, out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = worker_pids(launcher.pid)
    _wait_for_training(out)
    launcher.send_signal(signal.SIGTERM)
    time.sleep(5)
    assert launcher.poll() is None, "the first SIGTERM must wait for the checkpoint"
    t0 = time.time()
    launcher.send_signal(signal.SIGINT)
    text = launcher.communicate(timeout=60)[0]
    assert time.time() - t0 < 10
    assert launcher.returncode == 128 + signal.SIGINT, text[-3000:]
    assert "SIGINT again: stopping now" in text
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/status").read_text().find("zombie") >= 0
    assert list((out / "checkpoints").glob(".*.pdckpt.tmp-*")), "the stop's write was not cut"
    good = latest_checkpoint(out)  # the half-written one is never taken for a checkpoint
    assert good is not None and load_checkpoint(good)["global_step"] > 0


def test_a_short_run_prints_only_what_matters(tiny_data, tmp_path):
    """A 2-process run through launch.sh: our lines, no framework chatter, no loss
    scale in fp32, and a summary naming the best and the last evaluation."""
    out = tmp_path / "run"
    proc = subprocess.run(["bash", "launch.sh", "configs/demo.yaml",
                           *_args(tiny_data, out, **{"Global.epochs": 2})],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert not [n for n in NOISE if n in text], text
    lines = text.splitlines()
    assert len(lines) <= 16, text
    progress = [line for line in lines if " img/s " in line]
    assert progress and not [line for line in progress if " scale " in line]
    summary = [line for line in lines if line.startswith("[run] finished: ")]
    assert len(summary) == 1 and "in this run" in summary[0], text
    import json
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["eval_top1"])
    assert (f"top1 {best['eval_top1']:.4f} top5 {best['eval_top5']:.4f}" in summary[0]
            and f"after {best['epoch']} whole epoch(s), global step {best['global_step']}"
            in summary[0]), (summary, rows)


def test_a_failing_run_says_why_once(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(["bash", "launch.sh", "configs/demo.yaml",
                           *_args(tiny_data, out, **{"DataLoader.val_list": "nowhere.txt"})],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert text.count("list file not found") == 1, text
    assert re.search(r"^launch: rank [01] failed \(exit 2\)", text, re.M), text
    assert not [n for n in NOISE if n in text], text
