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
