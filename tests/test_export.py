"""Deployment: export to Paddle Inference + ONNX, predict, and the eval transform.

Parity is checked on random weights: the tiny DPN and DenseNet through export_model, and
DPN68 and DenseNet121 through the CLI from PaddleClas-layout .pdparams files. Everything runs at batch 2 on an export with a dynamic batch dimension.
"""
import json
import shutil

import cv2
import numpy as np
import paddle
import pytest

from ppdpn import export, predict
from ppdpn.models import create_model
from ppdpn.models.weights import to_paddleclas_state_dict
from ppdpn.preprocess import (IMAGENET_MEAN, IMAGENET_STD, center_crop, decode_image,
                              eval_transform, resized_size)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TOL = 1e-4  # the bar for logits; fp32 backends differ by ~1e-6 in practice


def random_model(name, seed=0, **kwargs):
    paddle.seed(seed)
    model = create_model(name, **kwargs)
    model.eval()
    return model


def dygraph(model, x):
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


def assert_backends_match(model, model_dir, x):
    ref = dygraph(model, x)
    for backend in ("paddle", "onnx"):
        out = predict.create_runner(model_dir, backend, "cpu")(x)
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() < TOL, backend
        assert (out.argmax(1) == ref.argmax(1)).all(), backend


def write_images(folder, sizes=((500, 375), (300, 400), (256, 256))):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i, (w, h) in enumerate(sizes):
        paths.append(folder / f"img{i}.png")  # PNG: lossless, so the test knows the pixels
        cv2.imwrite(str(paths[-1]), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return paths


@pytest.fixture(scope="module", params=["DPNTiny", "DenseNetTiny"])
def exported(request, tmp_path_factory):
    model = random_model(request.param)
    out = tmp_path_factory.mktemp(request.param)
    summary = export.export_model(model, out, name=request.param)
    return model, out, summary


# ---------------------------------------------------------------- parity

def test_backends_match_dygraph(exported):
    model, out, summary = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(summary["files"])
    x = np.random.default_rng(2).standard_normal((2, 3, 224, 224), dtype=np.float32)
    assert_backends_match(model, out, x)
    assert_backends_match(model, out, x[:1])  # the batch dimension is dynamic


@pytest.mark.parametrize("name", ["DPN68", "DenseNet121"])
def test_export_from_paddleclas_pdparams_via_cli(name, tmp_path, capsys):
    source = random_model(name, seed=3, num_classes=10)
    weights = tmp_path / f"{name}_pretrained.pdparams"
    paddle.save(to_paddleclas_state_dict(source, name), str(weights))
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{i} class_{i}\n" for i in range(10)))
    out = tmp_path / "export"
    rc = export.main(["-c", str(ROOT / f"configs/{name.lower()}.yaml"), "-o", f"Global.pretrained_model={weights}",
                      "-o", "Arch.class_num=10", "--out", str(out), "--labels", str(labels)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert max(summary["max_abs_diff"].values()) < TOL
    meta = json.loads((out / "preprocess.json").read_text())
    assert meta["labels"][3] == "class_3" and meta["class_num"] == 10
    assert meta["preprocess"]["resize_short"] == 256 and meta["preprocess"]["crop_size"] == 224
    # The export holds the .pdparams' weights: it reproduces the model they came from.
    x = np.random.default_rng(4).standard_normal((2, 3, 224, 224), dtype=np.float32)
    assert_backends_match(source, out, x)


@pytest.mark.parametrize("contents, words", [
    ("classes", ["Arch.class_num=1000"]),  # 10-class weights, recipe says 1000
    ("text", ["weights.pdparams"]),
])
def test_export_refuses_weights_it_cannot_load_whole(contents, words, tmp_path, capsys):
    weights = tmp_path / "weights.pdparams"
    if contents == "classes":
        paddle.save(random_model("DenseNetTiny", num_classes=10).state_dict(), str(weights))
    else:
        weights.write_text("not a pickle")
    rc = export.main(["-o", "Arch.name=DenseNetTiny", "-o", f"Global.pretrained_model={weights}",
                      "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_softmax_export_outputs_probabilities(tmp_path):
    model = random_model("DenseNetTiny", seed=5)
    export.export_model(model, tmp_path, name="DenseNetTiny", softmax=True)
    assert json.loads((tmp_path / "preprocess.json").read_text())["output"] == "probabilities"
    x = np.random.default_rng(6).standard_normal((2, 3, 224, 224), dtype=np.float32)
    expected = predict.softmax(dygraph(model, x))
    for backend in ("paddle", "onnx"):
        probs = predict.create_runner(tmp_path, backend, "cpu")(x)
        np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_labels_must_match_class_count(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n\n")
    assert export.read_labels(labels, 2) == ["cat", "dog"]
    with pytest.raises(export.ExportError, match="labels.txt has 2 names.*class_num=1000"):
        export.read_labels(labels, 1000)
    # "index name" lines (data/make_demo.py, data/build_lists.py) lose their index.
    labels.write_text("0 n01440764 tench, Tinca tinca\n1 star\n")
    assert export.read_labels(labels, 2) == ["n01440764 tench, Tinca tinca", "star"]
    labels.write_text("7 wonders\n1 star\n")  # not numbered 0, 1, ...: names as written
    assert export.read_labels(labels, 2) == ["7 wonders", "1 star"]


# ---------------------------------------------------------------- predict

@pytest.mark.parametrize("backend", ["paddle", "onnx"])
def test_predict_folder_reports_bad_image_and_predicts_the_rest(exported, backend, tmp_path, capsys):
    model, out, _ = exported
    images = write_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "bad.jpg").write_text("not an image")
    rc = predict.main(["--model", str(out), str(tmp_path / "imgs"), "--backend", backend,
                       "--topk", "3", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "bad.jpg" in captured.err and "not an image" in captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert [p["path"] for p in result["predictions"]] == [str(p) for p in images]
    assert [e["path"] for e in result["errors"]] == [str(tmp_path / "imgs" / "bad.jpg")]
    # Same numbers as the eval transform + dygraph model + softmax.
    batch = np.stack([eval_transform(decode_image(p)) for p in images])
    probs = predict.softmax(dygraph(model, batch))
    for pred, p in zip(result["predictions"], probs):
        assert len(pred["topk"]) == 3
        assert pred["topk"][0]["class_id"] == int(p.argmax())
        assert pred["topk"][0]["prob"] == pytest.approx(p.max(), abs=1e-5)


def test_predict_exits_nonzero_when_nothing_is_predicted(exported, tmp_path, capsys):
    _, out, _ = exported
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    rc = predict.main(["--model", str(out), str(bad), str(tmp_path / "missing.jpg")])
    captured = capsys.readouterr()
    assert rc == 1
    assert "notes.txt" in captured.err and "missing.jpg: no such file" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["predictions"] == []


@pytest.mark.parametrize("backend, removed", [("paddle", "inference.pdiparams"),
                                              ("paddle", "preprocess.json"),
                                              ("onnx", "model.onnx")])
def test_model_folder_missing_a_file_is_a_clear_error(exported, backend, removed, tmp_path, capsys):
    _, out, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / removed).unlink()
    images = write_images(tmp_path / "imgs", sizes=((64, 64),))
    rc = predict.main(["--model", str(broken), str(images[0]), "--backend", backend])
    err = capsys.readouterr().err
    assert rc == 2
    assert removed in err and str(broken) in err


def test_corrupt_model_file_is_a_clear_error(exported, tmp_path, capsys):
    _, out, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    params = broken / "inference.pdiparams"
    params.write_bytes(params.read_bytes()[:1000])  # an interrupted copy
    images = write_images(tmp_path / "imgs", sizes=((64, 64),))
    assert predict.main(["--model", str(broken), str(images[0])]) == 2
    assert str(params) in capsys.readouterr().err


# ---------------------------------------------------------------- eval transform

@pytest.mark.parametrize("w, h, short, expected", [
    (500, 375, 256, (341, 256)), (375, 500, 256, (256, 341)), (256, 256, 256, (256, 256)),
    (300, 200, 256, (384, 256)),
    (3, 2, 3, (4, 3)),  # 4.5 -> 4: Python's round() (half to even), as PaddleClas rounds
])
def test_resized_size_rounds_like_paddleclas(w, h, short, expected):
    assert resized_size(w, h, short) == expected


def test_eval_transform_crops_centre_and_normalises_rgb():
    img = np.zeros((375, 500, 3), np.uint8)
    img[..., 0] = 255  # pure red in RGB order
    x = eval_transform(img)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    expected = (np.array([1.0, 0.0, 0.0]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x[:, 100, 100], expected, rtol=1e-6)
    index = np.arange(341 * 256).reshape(256, 341)
    crop = center_crop(index, 224)
    assert crop[0, 0] == index[(256 - 224) // 2, (341 - 224) // 2]


def test_decode_image_is_rgb_and_names_bad_files(tmp_path):
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "blue.png"), bgr)
    assert decode_image(tmp_path / "blue.png")[0, 0].tolist() == [0, 0, 255]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="bad.jpg"):
        decode_image(tmp_path / "bad.jpg")
