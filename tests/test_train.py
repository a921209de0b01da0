"""train.py end to end on CPU: exact resume, eval-only, 2 ranks, VisualDL, bad config."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, last_json, run_train, start_launcher, tiny_overrides, worker_pids
from ppdpn.checkpoint import latest_checkpoint, load_checkpoint


def _final(out_dir):
    return load_checkpoint(latest_checkpoint(out_dir))


def test_resume_mid_epoch_is_bit_identical(tiny_data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, straight))
    # Interrupted after 11 of 16 steps (mid-epoch 2), then resumed by the same command.
    run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, split, **{"Global.max_steps": 11}))
    assert _final(split)["global_step"] == 11 and _final(split)["step_in_epoch"] == 3
    proc = run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, split))
    assert "[resume]" in proc.stdout and "global step 11" in proc.stdout
    a, b = _final(straight), _final(split)
    assert a["global_step"] == b["global_step"] == 16
    for k, v in a["model"].items():
        np.testing.assert_array_equal(v, b["model"][k], err_msg=k)
    opt_a = {k: v for k, v in a["optimizer"].items() if isinstance(v, np.ndarray)}
    assert opt_a, "optimizer state holds the momentum buffers"
    for k, v in opt_a.items():
        np.testing.assert_array_equal(v, b["optimizer"][k], err_msg=k)
    assert a["optimizer"]["LR_Scheduler"] == b["optimizer"]["LR_Scheduler"]
    # The printed eval of both runs is the same too.
    assert last_json(proc.stdout)["top1"] == json.loads(
        (straight / "metrics.jsonl").read_text().splitlines()[-1])["eval_top1"]


@pytest.fixture(scope="module")
def two_rank_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_rank")
    proc = run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, out),
                     nproc=2, log_dir=out / "launch")
    return out, proc


def test_two_processes_agree_and_eval_counts_every_image_once(two_rank_run, tiny_data):
    out, proc = two_rank_run
    log = (out / "train.log").read_text()
    assert "weights identical on all 2 ranks: True" in log
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_images"] == 24  # 4 classes x 6 val images, none twice
    assert rows[-1]["global_step"] == 8   # 64 images / (8 x 2 ranks) x 2 epochs
    # Hand computation: one process evaluates the same checkpoint over the whole split.
    single = run_train(["-c", "configs/demo.yaml", "--eval-only", "-o"] + tiny_overrides(
        tiny_data, out / "eval1", **{"Global.pretrained_model": out / "checkpoints" / "best.pdckpt",
                                     "DataLoader.batch_size": 5}))
    res = last_json(single.stdout)
    assert res["images"] == 24
    best = max(r["eval_top1"] for r in rows)
    assert res["top1"] == pytest.approx(best, abs=1e-9)


def test_eval_only_of_a_checkpoint_repeats_training_eval(two_rank_run, tiny_data):
    out, _ = two_rank_run
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    ckpt = latest_checkpoint(out)
    proc = run_train(["-c", "configs/demo.yaml", "--eval-only", "-o"] + tiny_overrides(
        tiny_data, out / "eval2", **{"Global.pretrained_model": ckpt}), nproc=2, log_dir=out / "eval_launch")
    res = last_json(proc.stdout) if "{" in proc.stdout else last_json(
        (out / "eval_launch" / "workerlog.0").read_text())
    assert res["images"] == 24
    assert res["top1"] == pytest.approx(rows[-1]["eval_top1"], abs=1e-9)
    assert res["loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-5)


def test_visualdl_logs_hold_the_tags_and_the_server_serves_them(two_rank_run):
    from visualdl import LogReader
    out, _ = two_rank_run
    vdl = out / "vdl"
    runs = [p for p in vdl.iterdir() if p.is_file()]
    reader = LogReader(file_path=str(runs[0]))
    tags = set(reader.get_tags()["scalar"])
    for tag in ("train/loss", "train/lr", "train/img_per_s",
                "eval/loss", "eval/top1", "eval/top5"):
        assert tag in tags, tags
    assert "train/loss_scale" not in tags  # fp32: no loss scaler, no scale
    assert "train/input/0" in reader.get_tags().get("image", [])
    assert "config" in reader.get_tags().get("text", [])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "visualdl"), "--logdir", str(vdl), "--host",
                               "127.0.0.1", "--port", str(port), "--language", "en",
                               "--disable-telemetry"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/app/api/scalar/list?run={vdl}&tag=eval/top1"
        body = None
        for _ in range(60):
            try:
                body = json.loads(urllib.request.urlopen(url, timeout=2).read())
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, "VisualDL server did not answer"
        values = [row[2] for row in body["data"]]
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_bad_config_value_exits_2_naming_the_key(tmp_path):
    proc = run_train(["-c", "configs/demo.yaml", "-o", "DataLoader.batch_size=0",
                      f"Global.output_dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert "DataLoader.batch_size" in proc.stderr and "demo.yaml" in proc.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_equal_two_processes(two_rank_run, tiny_data, tmp_path):
    """Two launchers (--nnodes 2, one CPU process each) form one job: same weights."""
    out2, _ = two_rank_run
    out = tmp_path / "nodes"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "paddle.distributed.launch", "--nnodes", "2", "--nproc_per_node", "1",
         "--master", f"127.0.0.1:{port}", "--rank", str(r), "--log_dir", str(out / f"launch{r}"),
         "train.py", "-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, out),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
    a, b = _final(out2), _final(out)
    assert a["global_step"] == b["global_step"] == 8
    for k, v in a["model"].items():
        np.testing.assert_array_equal(v, b["model"][k], err_msg=k)


def test_sigusr1_to_one_rank_checkpoints_and_requeues(tiny_data, tmp_path):
    """SIGUSR1 reaching rank 1 only: both ranks stop at the same step, rank 0 saves, exit
    75; rerunning resumes at that step and ends at the same total as an unstopped run."""
    import signal as sig
    out = tmp_path / "pre"
    args = ["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, out, **{"Global.epochs": 40})
    launcher = start_launcher(args, out / "launch")
    pids = worker_pids(launcher.pid)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)  # let it finish one epoch first
    t0 = time.time()
    os.kill(pids[1], sig.SIGUSR1)
    text = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 75, text[-3000:]
    assert time.time() - t0 < 30
    saved = _final(out)
    assert 0 < saved["global_step"] < 40 * 4
    assert saved["global_step"] % 2 == 0  # agreed at a progress flush (print_interval 2)
    assert f"stopped by a signal to another rank at step {saved['global_step']}" in text
    resumed = run_train(args, nproc=2, log_dir=out / "launch2")
    assert f"global step {saved['global_step']}" in resumed.stdout
    assert _final(out)["global_step"] == 40 * 4


def _train_epoch_with(tiny_data, tmp_path, batch_size, accum_steps):
    """One epoch of the engine on a model without BN (BN's batch statistics would
    differ between one batch of 8 and two of 4); the trained weights."""
    import paddle

    from ppdpn.config import load_config
    from ppdpn.data import build_loader
    from ppdpn.data.augment import BatchAugment
    from ppdpn.dist import DistContext
    from ppdpn.engine import Hooks, TrainState, build_amp, optimizer_steps, train_one_epoch
    from ppdpn.optim import ScheduleLR, build_optimizer, build_schedule

    cfg = load_config(ROOT / "configs/demo.yaml", tiny_overrides(tiny_data, tmp_path, **{
        "DataLoader.batch_size": batch_size, "Global.accum_steps": accum_steps,
        "DataLoader.mixup_alpha": 0.0, "DataLoader.cutmix_alpha": 0.0,
        "Optimizer.lr.warmup_epoch": 1}))
    loader = build_loader(cfg.DataLoader, "train", DistContext(), cfg.Global.seed, 4)
    steps = optimizer_steps(loader.steps_per_epoch, accum_steps)
    lr = ScheduleLR(build_schedule(cfg.Optimizer.lr, 1, steps, batch_size * accum_steps))
    paddle.seed(7)
    model = paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 3, stride=2), paddle.nn.ReLU(),
                                 paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(),
                                 paddle.nn.Linear(8, 4))
    optimizer = build_optimizer(model, cfg.Optimizer, lr, False)
    state, lrs = TrainState(), []
    run = replace(cfg.Global, seed=0, print_interval=100, max_skipped_steps=1)
    outcome = train_one_epoch(model, loader, optimizer, lr, build_amp(cfg.AMP, False), state, run,
                              BatchAugment.from_config(cfg), Hooks(after_step=lambda s: lrs.append(lr.get_lr())))
    assert outcome == "epoch_end"
    return state, lrs, {k: v.numpy() for k, v in model.state_dict().items()}


def test_accumulating_two_batches_of_4_trains_like_one_batch_of_8(tiny_data, tmp_path):
    """Global.accum_steps: 64 images in 8 steps of 8, or in 8 steps of 2 x 4 batches,
    give the same weights (SGD, momentum, weight decay, warmup) and the same LR per step."""
    big = _train_epoch_with(tiny_data, tmp_path / "a", 8, 1)
    acc = _train_epoch_with(tiny_data, tmp_path / "b", 4, 2)
    assert (big[0].global_step, acc[0].global_step, acc[0].step_in_epoch) == (8, 8, 8)
    assert big[1] == acc[1] and len(set(acc[1])) == 8
    for k, v in big[2].items():
        np.testing.assert_allclose(acc[2][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # Four batches of 4 per step is another recipe: the weights move differently.
    other = _train_epoch_with(tiny_data, tmp_path / "c", 4, 4)
    assert other[0].global_step == 4
    assert not np.allclose(other[2]["4.weight"], big[2]["4.weight"], rtol=1e-3)


def test_accumulation_resumes_bit_identical_and_two_ranks_agree(tiny_data, tmp_path):
    """Global.accum_steps=3 over 8 batches an epoch: steps of 3, 3 and 2 batches. A run
    stopped after step 4 (mid-epoch 2) and resumed ends with the weights of one never
    stopped. Two processes (gloo) accumulating 2 batches a step keep identical weights."""
    extra = {"Global.accum_steps": 3, "Global.print_interval": 1}
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, straight, **extra))
    assert '"global_batch": 24' in proc.stdout and '"steps_per_epoch": 3' in proc.stdout
    run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(
        tiny_data, split, **extra, **{"Global.max_steps": 4}))
    assert (_final(split)["global_step"], _final(split)["step_in_epoch"]) == (4, 1)
    run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, split, **extra))
    a, b = _final(straight), _final(split)
    assert a["global_step"] == b["global_step"] == 6
    for k, v in a["model"].items():
        np.testing.assert_array_equal(v, b["model"][k], err_msg=k)

    two = tmp_path / "two"
    run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(
        tiny_data, two, **{"Global.accum_steps": 2, "DataLoader.batch_size": 4}),
        nproc=2, log_dir=two / "launch")
    log = (two / "train.log").read_text()
    assert "weights identical on all 2 ranks: True" in log and '"global_batch": 16' in log
    assert _final(two)["global_step"] == 8  # 64 images / (4 x 2 ranks x 2) x 2 epochs
