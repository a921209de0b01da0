"""--eval-only evaluates exactly the weights it is pointed at, or refuses (exit 2)."""
import json

import pytest

from conftest import last_json, run_train, tiny_overrides


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, out))
    return out


def _eval(tiny_data, out, check=True, **extra):
    return run_train(["-c", "configs/demo.yaml", "--eval-only", "-o"]
                     + tiny_overrides(tiny_data, out, **extra), check=check)


@pytest.mark.parametrize("weights", [{}, {"Global.pretrained_model": "X", "Global.checkpoints": "X"}])
def test_eval_only_refuses_to_score_without_weights_or_with_two(weights, tiny_data, tmp_path, trained):
    weights = {k: trained if v == "X" else v for k, v in weights.items()}
    proc = _eval(tiny_data, tmp_path / "e", check=False, **weights)
    assert proc.returncode == 2 and "{" not in proc.stdout
    assert "Global.pretrained_model" in proc.stderr and "Global.checkpoints" in proc.stderr


def test_eval_only_of_a_run_folder_evaluates_its_best_checkpoint(tiny_data, tmp_path, trained):
    out = tmp_path / "e"
    proc = _eval(tiny_data, out, **{"Global.checkpoints": trained})
    metrics = last_json(proc.stdout)
    assert metrics["weights"] == str(trained / "checkpoints" / "best.pdckpt")
    assert metrics["images"] == 24
    assert json.loads((out / "eval.json").read_text()) == metrics  # also in a file
    assert "[eval] {" in (out / "train.log").read_text()  # and in the log
    best = json.loads((trained / "checkpoints" / "best.json").read_text())
    assert metrics["top1"] == pytest.approx(best["metric"])  # the same weights as in training


def test_eval_only_refuses_a_classifier_that_does_not_fit(tiny_data, tmp_path, trained):
    proc = _eval(tiny_data, tmp_path / "e", check=False, **{
        "Global.pretrained_model": trained / "checkpoints" / "best.pdckpt", "Arch.class_num": 5})
    assert proc.returncode == 2 and "Arch.class_num=4" in proc.stderr
