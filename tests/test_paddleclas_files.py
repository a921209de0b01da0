"""PaddleClas's files: continuing a run from its checkpoint prefix, predicting with its
export folder. The files are written here in PaddleClas's format (paddle.save of the
state_dict, of [optimizer.state_dict()], of {"metric", "epoch"}), never copied in."""
import json
import pickle

import numpy as np
import paddle
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppdpn.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ppdpn.config import load_config
from ppdpn.models import create_model
from ppdpn.models.weights import paddleclas_key_map
from ppdpn.paddleclas_files import is_checkpoint_prefix, load_checkpoint_prefix
from tests.conftest import run_train
from tests.test_paddleclas import paddleclas_recipe


def tiny_recipe(data_dir, out_dir, tmp_path, name="tiny_paddleclas.yaml"):
    """A PaddleClas-layout recipe for the tiny data set: DenseNetTiny, 32 px, batch 8."""
    doc = paddleclas_recipe("DPN68")
    g = doc["Global"]
    g.update(output_dir=str(out_dir), device="cpu", epochs=2, print_batch_step=2,
             deterministic=True, seed=0)  # the last two are ppdpn's own keys
    doc["Arch"] = {"name": "DenseNetTiny", "class_num": 4}
    doc["Optimizer"]["lr"]["learning_rate"] = 0.05
    for part, crop in (("Train", 1), ("Eval", 2)):
        dl = doc["DataLoader"][part]
        dl["dataset"].update(image_root=str(data_dir),
                             cls_label_path=str(data_dir / f"{part.lower().replace('eval', 'val')}_list.txt"))
        dl["sampler"]["batch_size"] = 8
        dl["loader"]["num_workers"] = 1
        ops = dl["dataset"]["transform_ops"]
        ops[crop]["RandCropImage" if part == "Train" else "CropImage"]["size"] = 32
    doc["DataLoader"]["Eval"]["dataset"]["transform_ops"][1]["ResizeImage"]["resize_short"] = 36
    doc["Infer"]["transforms"][1]["ResizeImage"]["resize_short"] = 36
    doc["Infer"]["transforms"][2]["CropImage"]["size"] = 32
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def write_paddleclas_checkpoint(ckpt: dict, prefix, arch="DenseNetTiny", classes=4,
                                velocity_suffix="_velocity_0"):
    """What PaddleClas's save_model writes for a Momentum run at the end of an epoch."""
    model = create_model(arch, num_classes=classes)
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in ckpt["model"].items()})
    key_map = paddleclas_key_map(model, arch)
    state = model.state_dict()
    paddle.save({key_map[k]: v for k, v in state.items()}, f"{prefix}.pdparams")
    names = {n: p.name for n, p in model.named_parameters()}
    opt = {}
    for key, value in ckpt["optimizer"].items():
        if key.endswith("_velocity_0"):
            param = names[key[:-len("_velocity_0")]]
            tensor = paddle.to_tensor(value)
            tensor.name = param + velocity_suffix
            opt[tensor.name] = tensor
    opt["LR_Scheduler"] = {"last_epoch": ckpt["global_step"], "last_lr": 0.04}
    paddle.save([opt], f"{prefix}.pdopt")
    paddle.save({"metric": ckpt["best_metric"], "epoch": ckpt["epoch"]}, f"{prefix}.pdstates")


def test_run_continued_from_paddleclas_files_ends_where_ours_does(tiny_data, tmp_path):
    straight = tmp_path / "straight"
    run_train(["-c", tiny_recipe(tiny_data, straight, tmp_path)])
    ckpts = list_checkpoints(straight / "checkpoints")
    first_epoch = load_checkpoint([p for p in ckpts if p.name == "ckpt-00000008.pdckpt"][0])
    assert (first_epoch["epoch"], first_epoch["step_in_epoch"]) == (1, 0)
    # PaddleClas's output/DenseNetTiny/latest.* holding the same state after epoch 1.
    pc_dir = tmp_path / "paddleclas_output" / "DenseNetTiny"
    pc_dir.mkdir(parents=True)
    write_paddleclas_checkpoint(first_epoch, pc_dir / "latest")
    assert is_checkpoint_prefix(pc_dir / "latest")

    continued = tmp_path / "continued"
    proc = run_train(["-c", tiny_recipe(tiny_data, continued, tmp_path, "again.yaml"),
                      "-o", f"Global.checkpoints={pc_dir / 'latest'}"])
    log = (continued / "train.log").read_text()
    assert "PaddleClas checkpoint" in log and "starting at global step 8 of 16" in log
    ours = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1])
    theirs = load_checkpoint(list_checkpoints(continued / "checkpoints")[-1])
    assert theirs["global_step"] == ours["global_step"] == 16
    for key, value in ours["model"].items():
        np.testing.assert_array_equal(theirs["model"][key], value, err_msg=key)
    for key, value in ours["optimizer"].items():
        if key.endswith("_velocity_0"):
            np.testing.assert_array_equal(theirs["optimizer"][key], value, err_msg=key)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(
        json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])["eval_top1"])
    # The same command again (a requeued job) goes on from its own checkpoint.
    run_train(["-c", tiny_recipe(tiny_data, continued, tmp_path, "again.yaml"),
               "-o", f"Global.checkpoints={pc_dir / 'latest'}"])
    log = (continued / "train.log").read_text()
    assert "continues the PaddleClas run" in log and "starting at global step 16 of 16" in log


@pytest.fixture(scope="module")
def fake_state():
    """A DenseNetTiny checkpoint dict with non-zero momentum buffers."""
    model = create_model("DenseNetTiny", num_classes=4)
    rng = np.random.default_rng(0)
    return {"model": {k: v.numpy() for k, v in model.state_dict().items()},
            "optimizer": {f"{n}_velocity_0": rng.standard_normal(p.shape).astype("float32")
                          for n, p in model.named_parameters()},
            "epoch": 3, "global_step": 24, "best_metric": 0.5}


def _load(prefix, tmp_path, logs=None):
    cfg = load_config(tiny_recipe(tmp_path, tmp_path / "out", tmp_path))
    model = create_model("DenseNetTiny", num_classes=4)
    return load_checkpoint_prefix(prefix, cfg, model, steps_per_epoch=8, global_batch=8,
                                  log=(logs.append if logs is not None else print))


def test_paddleclas_checkpoint_converts_to_ours(fake_state, tmp_path):
    write_paddleclas_checkpoint(fake_state, tmp_path / "latest")
    paddle.save({"metric": 0.75, "epoch": 2}, str(tmp_path / "best_model.pdstates"))
    ckpt = _load(tmp_path / "latest", tmp_path)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (3, 0, 24)
    assert ckpt["best_metric"] == 0.75  # best_model.pdstates beside it holds the best
    for key, value in fake_state["optimizer"].items():
        np.testing.assert_array_equal(ckpt["optimizer"][key], value)
    for key, value in fake_state["model"].items():
        np.testing.assert_array_equal(ckpt["model"][key], value)


def test_pdema_holds_the_training_weights(fake_state, tmp_path):
    write_paddleclas_checkpoint(fake_state, tmp_path / "latest")
    # With EMA on, PaddleClas writes the average to .pdparams and the raw weights to .pdema.
    raw = tmp_path / "latest.pdparams"
    raw.rename(tmp_path / "latest.pdema")
    model = create_model("DenseNetTiny", num_classes=4)  # another init: the "average"
    paddle.save({paddleclas_key_map(model)[k]: v for k, v in model.state_dict().items()}, str(raw))
    logs = []
    ckpt = _load(tmp_path / "latest", tmp_path, logs)
    assert any("EMA average" in line for line in logs)
    for key, value in fake_state["model"].items():
        np.testing.assert_array_equal(ckpt["model"][key], value)


def test_another_optimizer_is_named(fake_state, tmp_path):
    write_paddleclas_checkpoint(fake_state, tmp_path / "latest", velocity_suffix="_moment1_0")
    with pytest.raises(CheckpointError, match=r"_moment1_0.*not Momentum's"):
        _load(tmp_path / "latest", tmp_path)


def test_missing_and_unsafe_files_are_named(fake_state, tmp_path):
    write_paddleclas_checkpoint(fake_state, tmp_path / "latest")
    (tmp_path / "latest.pdopt").unlink()
    with pytest.raises(CheckpointError, match=r"missing .*latest\.pdopt"):
        _load(tmp_path / "latest", tmp_path)
    write_paddleclas_checkpoint(fake_state, tmp_path / "latest")
    (tmp_path / "latest.pdstates").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match=r"refusing posix.system in .*latest\.pdstates"):
        _load(tmp_path / "latest", tmp_path)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("true",))


# ---------------------------------------------------------------- export folders

INFER_YML = """Global:
  inference_model_dir: ./models
PreProcess:
  transform_ops:
    - ResizeImage:
        resize_short: 36
    - CropImage:
        size: 32
    - NormalizeImage:
        scale: 0.00392157
        mean: [0.485, 0.456, 0.406]
        std: [0.229, 0.224, 0.225]
        order: ''
        channel_num: 3
    - ToCHWImage:
PostProcess:
  main_indicator: Topk
  Topk:
    topk: 5
    label_list: [circle, square, stripes, dots]
"""
EXPORT_SCRIPT = """import sys, paddle
from ppdpn.models import create_model
paddle.seed(5)
m = create_model("DenseNetTiny", num_classes=4)
m.eval()
spec = [paddle.static.InputSpec([None, 3, 32, 32], "float32")]  # no name, as PaddleClas
paddle.jit.save(paddle.jit.to_static(m, input_spec=spec), sys.argv[1] + "/inference")
paddle.save(m.state_dict(), sys.argv[1] + "/weights.pdparams")
"""


def _export_like_paddleclas(out, pir=True):
    """PaddleClas's export: to_static + jit.save, PIR (.json) or legacy (.pdmodel)."""
    import os
    import subprocess
    import sys
    from tests.conftest import ROOT
    out.mkdir()
    env = {**os.environ, "FLAGS_enable_pir_api": "1" if pir else "0"}
    subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(out)], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=300)
    weights = paddle.load(str(out / "weights.pdparams"))
    (out / "weights.pdparams").unlink()
    return weights


def _predict(args, capsys):
    from ppdpn.predict import main
    code = main(args)
    out = capsys.readouterr()
    return code, out


@pytest.mark.parametrize("pir", [True, False], ids=["inference.json", "inference.pdmodel"])
def test_predict_runs_a_paddleclas_export_folder(pir, tiny_data, tmp_path, capsys):
    from ppdpn.preprocess import decode_image, eval_transform
    folder = tmp_path / "inference"
    weights = _export_like_paddleclas(folder, pir)
    (folder / "inference.yml").write_text(INFER_YML)
    image = sorted((tiny_data).rglob("*.jpg"))[0]
    code, out = _predict(["--model", str(folder), str(image), "--device", "cpu", "--topk", "2"], capsys)
    assert code == 0, out.err
    result = json.loads(out.out.strip().splitlines()[-1])["predictions"][0]["topk"]
    model = create_model("DenseNetTiny", num_classes=4)
    model.set_state_dict(weights)
    model.eval()
    x = paddle.to_tensor(eval_transform(decode_image(image), 36, 32)[None])
    probs = paddle.nn.functional.softmax(model(x)).numpy()[0]
    best = int(probs.argmax())
    assert probs.max() - probs.min() > 1e-3  # a model that tells the classes apart
    assert result[0]["class_id"] == best and result[0]["prob"] == pytest.approx(probs[best], abs=1e-5)
    assert result[0]["label"] == ["circle", "square", "stripes", "dots"][best]


def test_export_folder_without_preprocessing_is_refused_then_takes_the_recipe(tiny_data, tmp_path, capsys):
    folder = tmp_path / "inference"
    _export_like_paddleclas(folder)
    image = sorted((tiny_data).rglob("*.jpg"))[0]
    code, out = _predict(["--model", str(folder), str(image), "--device", "cpu"], capsys)
    assert code == 2 and "inference.yml" in out.err and "-c RECIPE.yaml" in out.err
    code, out = _predict(["--model", str(folder), str(image), "--device", "cpu", "--backend", "onnx"],
                         capsys)
    assert code == 2 and "--backend paddle" in out.err
    recipe = tiny_recipe(tiny_data, tmp_path / "out", tmp_path)
    code, out = _predict(["--model", str(folder), str(image), "--device", "cpu", "-c", recipe], capsys)
    assert code == 0, out.err
    assert len(json.loads(out.out.strip().splitlines()[-1])["predictions"]) == 1
    (folder / "inference.yml").write_text(INFER_YML.replace("ResizeImage:\n        resize_short: 36",
                                                            "ResizeImage:\n        size: 36"))
    code, out = _predict(["--model", str(folder), str(image), "--device", "cpu"], capsys)
    assert code == 2 and "inference.yml" in out.err and "resize_short" in out.err


def test_a_rerun_continues_from_its_own_checkpoint_not_paddleclas_files(fake_state, tmp_path):
    """A requeued job repeats -o Global.checkpoints=PREFIX: it must not go back in time."""
    from ppdpn.checkpoint import save_checkpoint
    from ppdpn.paddleclas_files import own_checkpoint_after
    write_paddleclas_checkpoint(fake_state, tmp_path / "latest")  # epoch 3
    cfg = load_config(tiny_recipe(tmp_path, tmp_path / "out", tmp_path))
    assert own_checkpoint_after(tmp_path / "latest", cfg) is None  # nothing of ours yet
    save_checkpoint({"model": {}, "global_step": 20, "epoch": 2}, tmp_path / "out" / "checkpoints")
    assert own_checkpoint_after(tmp_path / "latest", cfg) is None  # older than theirs
    newer = save_checkpoint({"model": {}, "global_step": 28, "epoch": 3},
                            tmp_path / "out" / "checkpoints")
    assert own_checkpoint_after(tmp_path / "latest", cfg) == newer
    off = load_config(tiny_recipe(tmp_path, tmp_path / "out", tmp_path),
                      ["Global.auto_resume=false"])
    assert own_checkpoint_after(tmp_path / "latest", off) is None


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.binary(max_size=300), which=st.sampled_from([".pdopt", ".pdstates", ".pdparams"]))
def test_garbage_paddleclas_files_are_named(fake_state, tmp_path_factory, data, which):
    """Hostile input: any bytes in one of the three files is a CheckpointError naming it."""
    folder = tmp_path_factory.mktemp("garbage")
    write_paddleclas_checkpoint(fake_state, folder / "latest")
    (folder / f"latest{which}").write_bytes(data)
    try:
        _load(folder / "latest", folder)
    except CheckpointError as e:
        assert f"latest{which}" in str(e) or which == ".pdparams"  # pdparams: keys are named
