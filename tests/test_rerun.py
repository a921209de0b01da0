"""A finished run run again is a no-op that says so; totals count what will run."""
from conftest import run_train, tiny_overrides


def test_rerunning_a_finished_max_steps_run_trains_nothing(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = ["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, out, **{"Global.max_steps": 3})
    run_train(args)
    log = (out / "train.log").read_text()
    assert "starting at global step 0 of 3," in log  # not epochs x steps per epoch
    assert "[eval] epoch 1 step 3/8 (global step 3)" in log  # not "[eval] epoch 0"
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = run_train(args)
    assert "already finished: global step 3 of 3" in (out / "train.log").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert "step 4" not in proc.stdout


def test_an_epoch_resumed_midway_reports_the_loss_of_all_its_steps(tiny_data, tmp_path):
    """metrics.jsonl's train_loss of an epoch stopped at step 5 and resumed equals the
    uninterrupted run's (deterministic CPU run: the same eight losses)."""
    import json

    def record(out):
        return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]

    common = {"Global.epochs": 1, "Global.print_interval": 1}
    whole = tmp_path / "whole"
    run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, whole, **common))
    cut = tmp_path / "cut"
    run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(
        tiny_data, cut, **common, **{"Global.max_steps": 5}))
    run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, cut, **common))
    a, b = record(whole), record(cut)
    assert a["global_step"] == b["global_step"] == 8
    assert abs(a["train_loss"] - b["train_loss"]) < 1e-6, (a["train_loss"], b["train_loss"])


def test_a_warmup_as_long_as_the_run_is_said(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(
        tiny_data, out, **{"Global.epochs": 1, "Optimizer.lr.warmup_epoch": 1}))
    assert "lasts the whole run of 8 steps" in (out / "train.log").read_text()


def test_device_gpu_without_a_gpu_is_a_config_error(tiny_data, tmp_path):
    proc = run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(
        tiny_data, tmp_path / "run", **{"Global.device": "gpu"}), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "config error:" in proc.stderr and "Global.device=gpu" in proc.stderr
