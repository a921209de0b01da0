"""Reliability end to end: killed ranks, torn checkpoints, full disks, NaNs, a changed world
size and a short soak. Every test here fails when its guarantee breaks."""
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import paddle
import pytest

from conftest import ROOT, last_json, run_train, start_launcher, tiny_overrides, worker_pids
from ppdpn.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                              load_checkpoint, save_checkpoint, verify_checkpoint)

DEMO = ["-c", "configs/demo.yaml", "-o"]


def _final(out_dir):
    return load_checkpoint(latest_checkpoint(out_dir, log=lambda m: None))


def _digests(ckpt_dir):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(ckpt_dir).iterdir()
            if p.is_file()}


def _highest_step(log_text, steps_per_epoch):
    found = re.findall(r"^epoch (\d+)/\d+ step (\d+)/\d+ ", log_text, re.M)
    return max((int(e) - 1) * steps_per_epoch + int(s) for e, s in found)


# ---------------------------------------------------------------- 1. killed rank

def test_kill9_of_one_rank_exits_fast_and_the_rerun_matches_an_uninterrupted_run(tiny_data, tmp_path):
    """kill -9 of rank 1 right after the step-10 checkpoint: the launcher exits non-zero
    within seconds; the same command resumes, redoes at most save_steps steps and ends
    with the weights of a run never interrupted (deterministic CPU)."""
    n, epochs = 5, 6  # 4 steps per epoch on 2 ranks
    extra = {"Global.epochs": epochs, "Global.save_steps": n, "Global.print_interval": 1,
             "Global.visualdl": False}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(DEMO + tiny_overrides(tiny_data, straight, **extra), nproc=2, log_dir=straight / "launch")

    args = DEMO + tiny_overrides(tiny_data, killed, **extra)
    launcher = start_launcher(args, killed / "launch")
    pids = worker_pids(launcher.pid)
    record = killed / "checkpoints" / "ckpt-00000010.json"  # written after the data
    deadline = time.time() + 120
    while not record.is_file() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if launcher.poll() is not None:
        logs = "\n".join(p.read_text()[-2000:] for p in sorted((killed / "launch").glob("workerlog.*")))
        raise AssertionError(f"the run ended before the kill:\n{launcher.communicate()[0][-3000:]}\n{logs}")
    t_kill = time.time()
    os.kill(pids[1], signal.SIGKILL)
    text = launcher.communicate(timeout=120)[0]
    exit_s = time.time() - t_kill
    print(f"kill -9 of rank 1 -> launcher exit {launcher.returncode} after {exit_s:.2f} s")
    worker_logs = "\n".join(p.read_text()[-1500:] for p in sorted((killed / "launch").glob("workerlog.*")))
    context = f"launcher:\n{text[-2000:]}\nworker logs:\n{worker_logs}"
    assert launcher.returncode != 0, context
    assert exit_s < 15, f"{exit_s:.1f} s\n{context}"
    reached = _highest_step((killed / "launch" / "workerlog.0").read_text(), 4)

    proc = run_train(args, nproc=2, log_dir=killed / "launch2")
    resumed = int(re.search(r"\[run\] starting at global step (\d+)", proc.stdout).group(1))
    print(f"reached step {reached}, resumed at {resumed}: {reached - resumed} redone (save_steps {n})")
    assert resumed >= 10 and 0 <= reached - resumed <= n, f"{proc.stdout[-2000:]}\n{context}"
    a, b = _final(straight), _final(killed)
    assert a["global_step"] == b["global_step"] == epochs * 4
    for k, v in a["model"].items():
        np.testing.assert_array_equal(v, b["model"][k], err_msg=k)


# ---------------------------------------------------------------- 2-4. one short run, damaged

@pytest.fixture(scope="module")
def six_steps(tiny_data, tmp_path_factory):
    """One process, 6 of 16 steps, a checkpoint every 2 steps: ckpt-2, -4, -6."""
    out = tmp_path_factory.mktemp("six_steps")
    run_train(DEMO + tiny_overrides(tiny_data, out, **{
        "Global.max_steps": 6, "Global.save_steps": 2, "Global.keep_last": 5,
        "Global.visualdl": False}))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        "ckpt-00000002.pdckpt", "ckpt-00000004.pdckpt", "ckpt-00000006.pdckpt"]
    return out


def _copy(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def test_torn_checkpoints_are_named_and_resume_takes_the_last_good_one(six_steps, tiny_data, tmp_path):
    """Power loss mid-write, simulated: the newest checkpoint partly overwritten (same
    size), the one before truncated. The rerun names both and resumes from ckpt-2."""
    out = _copy(six_steps, tmp_path / "run")
    ck = out / "checkpoints"
    newest, middle = ck / "ckpt-00000006.pdckpt", ck / "ckpt-00000004.pdckpt"
    data = bytearray(newest.read_bytes())
    data[1000:1400] = os.urandom(400)
    newest.write_bytes(bytes(data))
    middle.write_bytes(middle.read_bytes()[:5000])
    proc = run_train(DEMO + tiny_overrides(tiny_data, out, **{
        "Global.save_steps": 2, "Global.keep_last": 5, "Global.visualdl": False}))
    assert re.search(rf"skipping {re.escape(str(newest))}: sha256 differs", proc.stdout), proc.stdout
    assert re.search(rf"skipping {re.escape(str(middle))}: size 5000 != recorded", proc.stdout)
    assert f"[resume] {ck / 'ckpt-00000002.pdckpt'}" in proc.stdout
    assert "starting at global step 2 of 16" in proc.stdout
    final = _final(out)
    assert final["global_step"] == 16
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(ck))


@pytest.mark.parametrize("caught_by", ["loss", "weights", "eval"])
def test_nan_stops_with_the_step_and_no_bad_weights_are_saved(six_steps, tiny_data, tmp_path, caught_by):
    """LR 1e6 (1e10 for 'loss') from step 6 on: within a few steps the loss, the weights
    or the eval loss go non-finite. Exit 3 naming the step and a hint; every checkpoint
    on disk holds finite weights and the ones from before are byte for byte the same.
    'loss': the progress check sees a NaN loss; 'weights': a checkpoint every step, so
    the save-time check must catch weights that went NaN in the step just taken; 'eval':
    the epoch-end eval (step 8) gives a NaN loss from finite weights, which must not be
    saved as best."""
    out = _copy(six_steps, tmp_path / "run")
    before = _digests(out / "checkpoints")
    extra = {"Optimizer.lr.learning_rate": {"loss": 1e10}.get(caught_by, 1e6),
             "Global.keep_last": 20, "Global.visualdl": False,
             "Global.print_interval": {"loss": 1}.get(caught_by, 100),
             "Global.save_steps": {"weights": 1}.get(caught_by, 0),
             "Global.eval_interval": {"eval": 1}.get(caught_by, 10),
             # 'loss': no epoch-end save, whose weight check would otherwise get there first;
             # at 1e6 the BN running statistics overflow while the loss stays finite
             "Global.save_interval": {"loss": 10}.get(caught_by, 1)}
    proc = run_train(DEMO + tiny_overrides(tiny_data, out, **extra), check=False)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    pattern = {"loss": r"non-finite loss at step (\d+)", "weights": r"weights are non-finite after step (\d+)",
               "eval": r"eval loss is non-finite after step (\d+)"}[caught_by]
    m = re.search(r"\[error\] " + pattern + r"; lower Optimizer\.lr\.learning_rate", proc.stdout)
    assert m, proc.stdout[-3000:]
    bad_step = int(m.group(1))
    after = _digests(out / "checkpoints")
    assert {k: v for k, v in after.items() if k in before and k.startswith("ckpt-")} == {
        k: v for k, v in before.items() if k.startswith("ckpt-")}
    if caught_by == "eval":
        assert after["best.pdckpt"] == before["best.pdckpt"]
    for path in list_checkpoints(out / "checkpoints"):
        ckpt = load_checkpoint(path)
        assert ckpt["global_step"] < bad_step
        for k, v in ckpt["model"].items():
            assert np.isfinite(v).all(), (path.name, k)


def _mount_tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real small file system (tmpfs) when mount is allowed, else None: then a file
    size limit (RLIMIT_FSIZE, writes fail with EFBIG) stands in for the full disk."""
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "16m")
    yield disk if mounted else None
    if mounted:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_full_disk_names_the_path_keeps_the_checkpoints_and_stops_or_continues(
        six_steps, tiny_data, tmp_path, small_disk, policy):
    out = _copy(six_steps, (small_disk or tmp_path) / "run")
    before = _digests(out / "checkpoints")
    preexec = None
    if small_disk is not None:  # fill it up, leaving room for log lines only
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        with open(small_disk / "ballast", "wb") as f:
            f.write(b"\0" * (free - 256 * 1024))
    else:
        def preexec():
            resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))
    args = DEMO + tiny_overrides(tiny_data, out, **{
        "Global.on_save_error": policy, "Global.keep_last": 5, "Global.visualdl": False})
    proc = subprocess.run([sys.executable, "train.py"] + args, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, preexec_fn=preexec)
    text = proc.stdout + proc.stderr
    reason = "No space left on device" if small_disk is not None else "File too large"
    target = re.escape(str(out / "checkpoints" / "ckpt-00000008.pdckpt"))
    assert re.search(rf"cannot write {target}: {reason}", text), text[-3000:]
    if policy == "stop":
        assert proc.returncode == 4, text[-3000:]
    else:
        assert proc.returncode == 0, text[-3000:]
        assert "save failed, continuing (Global.on_save_error=continue)" in text
        assert last_json(proc.stdout)["images"] == 24  # trained and evaluated to the end
        assert "weights identical on all 1 ranks: True" in text
    after = _digests(out / "checkpoints")
    assert after == before, "earlier checkpoints (and nothing else) on disk"
    assert latest_checkpoint(out, log=lambda m: None).name == "ckpt-00000006.pdckpt"


# ---------------------------------------------------------------- 4b. AMP skips, real scaler

@pytest.fixture
def amp_state():
    """auto_cast leaves Paddle's global AMP dtype at float16 (the scaler reads it later);
    put it back so no other test in this process sees it."""
    from paddle.amp.auto_cast import amp_global_state
    yield
    amp_global_state().amp_dtype = "float32"


def _forced_cpu_scaler():
    """A real paddle.amp.GradScaler on CPU. Paddle disables it there only by checking the
    place at construction; the unscale/inf-check/update kernels all run on CPU."""
    import paddle.amp.grad_scaler as gs

    class _GpuPlace:
        def is_gpu_place(self):
            return True

    class _Tracer:
        _expected_place = _GpuPlace()

    with mock.patch.object(gs, "_dygraph_tracer", lambda: _Tracer()):
        scaler = paddle.amp.GradScaler(init_loss_scaling=1024.0)
    assert scaler._enable
    return scaler


class _Batches:
    """A loader whose batch k carries an inf pixel when k is in `bad`."""

    def __init__(self, bad, steps):
        self.bad, self.steps_per_epoch = set(bad), steps

    def epoch(self, epoch, start_step=0):
        rng = np.random.default_rng(0)
        for k in range(start_step, self.steps_per_epoch):
            x = rng.standard_normal((4, 6)).astype("float32")
            if k in self.bad:
                x[0, 0] = np.inf
            yield paddle.to_tensor(x), paddle.to_tensor(np.arange(4) % 3), paddle.ones([4])


def _train(bad, steps, scaler, max_skipped=3, print_interval=100):
    from ppdpn.config import GlobalConfig
    from ppdpn.engine import Amp, Hooks, TrainState, train_one_epoch
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Linear(6, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 3))
    opt = paddle.optimizer.Momentum(0.1, parameters=net.parameters())
    lr = paddle.optimizer.lr.StepDecay(0.1, step_size=100)
    amp = Amp(scaler is not None, "O1", "float16", scaler, True)
    weights, lines, state = [], [], TrainState()

    def augment(images, labels, rng):
        return images, paddle.nn.functional.one_hot(labels, 3)

    hooks = Hooks(progress=lambda state, count, values: lines.append((state.global_step, count, values)),
                  overflow=lambda state, n: lines.append((state.global_step, None, {"skipped_steps": n})),
                  after_step=lambda s: weights.append(net[0].weight.numpy().copy()))
    run = GlobalConfig(seed=0, print_interval=print_interval, max_skipped_steps=max_skipped)
    outcome = train_one_epoch(net, _Batches(bad, steps), opt, lr, amp, state, run, augment, hooks)
    return outcome, weights, lines, state


def test_amp_skips_overflow_steps_and_stops_after_max_skipped_in_a_row(amp_state):
    from ppdpn.engine import NonFiniteLossError
    # Steps 2, 4, 5: skipped, never 3 in a row -> the epoch ends; the skips are logged.
    scaler = _forced_cpu_scaler()
    outcome, weights, lines, state = _train({1, 3, 4}, 6, scaler)
    assert outcome == "epoch_end"
    np.testing.assert_array_equal(weights[0], weights[1])  # step 2 skipped: no update
    assert not np.array_equal(weights[1], weights[2])
    assert [v["skipped_steps"] for _, c, v in lines if c is None] == [3]
    assert scaler._scale.item() == 1024.0 / 2 ** 3  # halved at each overflow
    assert state.skipped_in_a_row == 0
    # Steps 2, then 4, 5, 6 in a row: stop at step 6 (a count not reset by the good step 3
    # would stop at step 5; one that counts whole windows would say 4).
    with pytest.raises(NonFiniteLossError, match=r"skipped 3 steps in a row \(overflow\) by step 6"):
        _train({1, 3, 4, 5}, 8, _forced_cpu_scaler())
    # The run of skips carries over print windows (2 steps each here).
    with pytest.raises(NonFiniteLossError, match="by step 5"):
        _train({2, 3, 4}, 8, _forced_cpu_scaler(), print_interval=2)


def test_fp32_nan_names_the_first_bad_step():
    from ppdpn.engine import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3; lower"):
        _train({2}, 6, None)


# ---------------------------------------------------------------- 5. world size

def test_world_size_2_to_1_and_back_keeps_the_global_step_and_lr(tiny_data, tmp_path):
    """64 images, batch 8 per process: 2 ranks take 4 steps per epoch (global batch 16),
    1 rank takes 8. 2 ranks stop after 3 steps (48 samples) -> 1 rank resumes at step 6;
    it stops at 11 (epoch 2, 24 samples) -> 2 ranks resume at step 5 and finish at 8."""
    from ppdpn.config import load_config
    from ppdpn.optim import build_schedule

    out = tmp_path / "run"

    def overrides(**extra):
        return DEMO + tiny_overrides(tiny_data, out, **{"Global.visualdl": False, **extra})

    def lr_at(step, world):
        cfg = load_config(ROOT / "configs/demo.yaml", tiny_overrides(tiny_data, out))
        return build_schedule(cfg.Optimizer.lr, 2, 8 // world, 8 * world).lr_at(step)

    run_train(overrides(**{"Global.max_steps": 3}), nproc=2, log_dir=out / "l1")
    saved = _final(out)
    assert (saved["global_step"], saved["global_batch"], saved["steps_per_epoch"]) == (3, 16, 4)

    proc = run_train(overrides(**{"Global.max_steps": 11}))
    assert "global batch 16 (2 processes, 4 steps/epoch) -> 8 (1 processes, 8 steps/epoch): " \
           "step 3 of epoch 1 -> 6, global step 3 -> 6" in proc.stdout, proc.stdout
    # "of 11": the run's total counts Global.max_steps (issue 21), not epochs x steps
    lr = float(re.search(r"starting at global step 6 of 11, LR (\S+)", proc.stdout).group(1))
    assert lr == pytest.approx(lr_at(6, 1), rel=1e-7)
    saved = _final(out)
    assert (saved["global_step"], saved["epoch"], saved["step_in_epoch"]) == (11, 1, 3)
    assert saved["optimizer"]["LR_Scheduler"]["last_lr"] == pytest.approx(lr_at(11, 1), rel=1e-7)

    proc = run_train(overrides(), nproc=2, log_dir=out / "l2")
    log = (out / "l2" / "workerlog.0").read_text()
    assert "step 3 of epoch 2 -> 1, global step 11 -> 5" in log, log[-3000:]
    lr = float(re.search(r"starting at global step 5 of 8, LR (\S+)", log).group(1))
    assert lr == pytest.approx(lr_at(5, 2), rel=1e-7)
    final = _final(out)  # the 1-process ckpt-11 must not pass for the newest
    assert (final["global_step"], final["world_size"]) == (8, 2)
    assert (out / "checkpoints" / "superseded" / "ckpt-00000011.pdckpt").is_file()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["global_step"] == 8 and rows[-1]["lr"] == pytest.approx(lr_at(8, 2), abs=1e-12)


def test_reposition_rounds_down_by_samples_and_the_documented_data_order_holds():
    from ppdpn.data.plan import ShardPlan
    from ppdpn.resume import reposition

    assert reposition(3, 16, 4, 8, 8) == 6       # 48 samples done
    assert reposition(3, 8, 8, 16, 4) == 1       # 24 samples: 8 of them are redone
    assert reposition(4, 16, 4, 8, 8) == 8       # a finished epoch stays finished
    assert reposition(5, 24, 6, 32, 5) == 3      # 120 samples -> 3 of 32
    assert reposition(7, 10, None, 4, 9) == 9    # clamped to the new epoch
    # resume.reposition's docstring, checked: N=64, b=8, 2 ranks for 3 steps, then 1.
    n, seed, epoch = 64, 0, 1
    two = [ShardPlan(n, 2, r, 8, True, seed).batches(epoch)[0] for r in (0, 1)]
    one = ShardPlan(n, 1, 0, 8, True, seed).batches(epoch)[0]
    order = two[0].reshape(-1).tolist() + two[1].reshape(-1).tolist()
    before = [int(i) for b in two for i in b[:3].reshape(-1)]
    after = [int(i) for i in one[reposition(3, 16, 4, 8, 8):].reshape(-1)]
    assert set(before) == set(order[0:24]) | set(order[32:56])
    assert after == order[48:64]
    assert set(before) & set(after) == set(order[48:56])
    assert set(range(n)) - set(before) - set(after) == set(order[24:32])


def test_prune_keeps_the_new_checkpoint_and_moves_renumbered_ones_aside(tmp_path):
    """After a resume that renumbers steps (1 -> 2 processes) or falls back past torn
    files, higher-numbered checkpoints must neither push the new one out nor be taken
    for the newest; torn ones do not count towards keep_last; dead temp files go."""
    def state(step):
        return {"model": {"w": np.full(3, step, np.float32)}, "global_step": step}

    for step in (8, 16):
        save_checkpoint(state(step), tmp_path, keep_last=2, log=lambda m: None)
    (tmp_path / ".ckpt-00000099.pdckpt.tmp-999999").write_bytes(b"half")
    old = save_checkpoint(state(2), tmp_path, keep_last=2, log=lambda m: None)
    save_checkpoint(state(3), tmp_path, keep_last=3, log=lambda m: None)
    torn = tmp_path / "ckpt-00000004.pdckpt"
    save_checkpoint(state(4), tmp_path, keep_last=3, log=lambda m: None)
    torn.write_bytes(torn.read_bytes()[:10])
    logged = []
    save_checkpoint(state(5), tmp_path, keep_last=3, log=logged.append)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000002.pdckpt", "ckpt-00000003.pdckpt", "ckpt-00000005.pdckpt"]
    assert verify_checkpoint(old) is None
    assert sorted(p.name for p in (tmp_path / "superseded").glob("*.pdckpt")) == [
        "ckpt-00000008.pdckpt", "ckpt-00000016.pdckpt"]
    assert latest_checkpoint(tmp_path).name == "ckpt-00000005.pdckpt"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(torn)


# ---------------------------------------------------------------- 7. soak, short

def test_soak_short(tmp_path):
    """bench/soak.py for ~1.5 minutes: random kill -9 / SIGUSR1 / SIGTERM, restarts; the
    finished run's checkpoint loads and holds epochs * steps_per_epoch steps."""
    proc = subprocess.run([sys.executable, "bench/soak.py", "--minutes", "1.2", "--epochs", "10",
                           "--workdir", str(tmp_path / "soak"), "--seed", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    result = last_json(proc.stdout)
    print(json.dumps({k: v for k, v in result.items() if k != "final_checks"}))
    assert proc.returncode == 0 and result["ok"], result
    assert result["restarts"] >= 2
    assert result["max_redone_after_kill"] <= result["save_steps"]
    for check in result["final_checks"]:
        assert check["loads"] and check["global_step"] == check["expected_step"] == 10 * 4
