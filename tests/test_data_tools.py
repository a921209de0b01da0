"""The data set tools: validation, ImageNet list building, the demo data set."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from data import build_lists, make_demo, validate
from ppdpn.data.lists import read_list

REPO = Path(__file__).resolve().parent.parent


def _jpeg(path, seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (3, 3, 3)).astype(np.uint8), size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), img)


def test_validate_names_every_planted_bad_file(tmp_path, capsys):
    names = [f"img/{i}.jpg" for i in range(10)]
    for i, n in enumerate(names):
        _jpeg(tmp_path / n, seed=i)
    (tmp_path / "img/1.jpg").write_bytes(b"")
    (tmp_path / "img/2.jpg").write_text("<html>not found</html>" * 5)
    data = (tmp_path / "img/3.jpg").read_bytes()
    (tmp_path / "img/3.jpg").write_bytes(data[:len(data) // 2])
    sos = data.find(b"\xff\xda")  # corrupt scan header: only a full decode finds it
    (tmp_path / "img/4.jpg").write_bytes(data[:sos + 4] + b"\x77" * 16 + data[sos + 20:])
    os.remove(tmp_path / "img/5.jpg")
    lines = [f"{n} {i % 3}" for i, n in enumerate(names)]
    lines[6] = "img/6.jpg 7"  # label out of range for 3 classes
    lines.append("img/0.jpg 0")  # duplicate
    lines.append("img/7.jpg")  # malformed: no label
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    clean = tmp_path / "clean.txt"
    rc = validate.main(["--root", str(tmp_path), "--list", "list.txt", "--num-classes", "3",
                        "--workers", "2", "--decode", "--write-clean", str(clean)])
    out = capsys.readouterr().out
    assert rc == 1
    expect = {"1.jpg": "empty", "2.jpg": "not a JPEG", "3.jpg": "truncated",
              "4.jpg": "decode failed", "5.jpg": "missing", "6.jpg": "out of range",
              "0.jpg": "duplicate of line 1"}
    bad = [ln for ln in out.splitlines() if ln.startswith("BAD ")]
    for name, why in expect.items():
        assert any(f"img/{name}" in ln and why in ln for ln in bad), (name, out)
    assert any("malformed" in ln or "expected 'path label'" in ln for ln in bad)
    assert len(bad) == len(expect) + 1
    kept = read_list(str(clean), str(tmp_path)).rel_paths
    assert kept == ["img/0.jpg", "img/7.jpg", "img/8.jpg", "img/9.jpg"]


def _fake_imagenet(root, val_layout):
    synsets = ["n02000002", "n01000001", "n03000003"]  # sorted order: 01, 02, 03
    for s in synsets:
        for i in range(2):
            _jpeg(root / "train" / s / f"{s}_{i}.JPEG", seed=i)
    truth = {f"ILSVRC2012_val_{k:08d}": synsets[k % 3] for k in range(1, 7)}
    for stem, s in truth.items():
        sub = root / "val" / s if val_layout == "folders" else root / "val"
        _jpeg(sub / f"{stem}.JPEG")
    if val_layout == "csv":
        rows = [f"{stem},{s} 1 2 3 4 {s} 5 6 7 8" for stem, s in truth.items()]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))
    if val_layout == "ground_truth":
        # devkit IDs follow the devkit's own class order, not sorted WNIDs
        id_order = ["n03000003", "n01000001", "n02000002"]
        gt = [id_order.index(truth[f"ILSVRC2012_val_{k:08d}"]) + 1 for k in range(1, 7)]
        (root / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, gt)))
        from scipy.io import savemat
        syn = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
        for i, w in enumerate(id_order + ["n09999999"]):
            syn[i] = (i + 1 if i < 3 else 1001, w)  # IDs > 1000 are inner nodes
        savemat(str(root / "meta.mat"), {"synsets": syn})
    return truth


@pytest.mark.parametrize("val_layout", ["folders", "csv", "ground_truth"])
def test_build_lists_from_imagenet_layouts(tmp_path, val_layout):
    truth = _fake_imagenet(tmp_path, val_layout)
    assert build_lists.main(["--root", str(tmp_path)]) == 0
    train = read_list(str(tmp_path / "train_list.txt"), str(tmp_path))
    assert train.rel_paths[0] == "train/n01000001/n01000001_0.JPEG"
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    val = read_list(str(tmp_path / "val_list.txt"), str(tmp_path))
    classes = sorted(set(truth.values()))
    for rel, y in zip(val.rel_paths, val.labels):
        stem = os.path.splitext(os.path.basename(rel))[0]
        assert classes[y] == truth[stem], rel
    assert len(val) == 6 and (tmp_path / "labels.txt").read_text().startswith("0 n01000001")


def test_build_lists_refuses_devkit_ids_without_mapping(tmp_path, capsys):
    _fake_imagenet(tmp_path, "ground_truth")
    os.remove(tmp_path / "meta.mat")
    assert build_lists.main(["--root", str(tmp_path)]) == 2
    assert "meta.mat" in capsys.readouterr().err


def test_demo_is_deterministic_and_valid(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_demo.make_demo(str(a), seed=3, classes=4, train_per_class=3, val_per_class=2, workers=1)
    make_demo.make_demo(str(b), seed=3, classes=4, train_per_class=3, val_per_class=2, workers=2)
    make_demo.make_demo(str(c), seed=4, classes=4, train_per_class=3, val_per_class=2, workers=1)
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4 * 5 + 3
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train/00_horizontal_stripes/00_horizontal_stripes_00000.jpg").read_bytes() != \
        (c / "train/00_horizontal_stripes/00_horizontal_stripes_00000.jpg").read_bytes()
    assert validate.main(["--root", str(a), "--list", "train_list.txt", "--decode"]) == 0
    assert (a / "labels.txt").read_text().splitlines()[3] == "3 checkerboard"


def test_demo_classes_are_not_separable_by_mean_colour(tmp_path):
    out = tmp_path / "demo"
    make_demo.make_demo(str(out), seed=0, train_per_class=60, val_per_class=30, workers=2)

    def mean_colours(split):
        s = read_list(str(out / f"{split}_list.txt"), str(out))
        return np.array([cv2.imread(p).reshape(-1, 3).mean(0) for p in s.paths]), s.labels

    x, y = mean_colours("train")
    centres = np.stack([x[y == c].mean(0) for c in range(10)])
    xv, yv = mean_colours("val")
    pred = np.argmin(((xv[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == yv).mean()
    assert accuracy < 0.2, accuracy  # chance is 0.1; 300 val images: sd ~0.017


def test_tools_run_as_scripts(tmp_path):
    out = tmp_path / "d"
    r = subprocess.run([sys.executable, str(REPO / "data" / "make_demo.py"), "--out", str(out),
                        "--classes", "3", "--train-per-class", "2", "--val-per-class", "1",
                        "--workers", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len((out / "train_list.txt").read_text().splitlines()) == 6


def test_write_clean_on_a_class_folder_tree_names_files_under_root(tmp_path):
    """The cleaned list of a class-folder tree is read back relative to --root, as
    train.py reads DataLoader.train_list: every file it names exists."""
    for c in ("cat", "dog"):
        for i in range(3):
            _jpeg(tmp_path / "train" / c / f"{i}.jpg", seed=i)
    (tmp_path / "train" / "dog" / "1.jpg").write_bytes(b"")
    clean = tmp_path / "clean.txt"
    assert validate.main(["--root", str(tmp_path), "--list", "train", "--workers", "1",
                          "--write-clean", str(clean)]) == 1
    samples = read_list(str(clean), str(tmp_path))
    assert len(samples) == 5 and all(os.path.isfile(p) for p in samples.paths)
    assert sorted(samples.labels.tolist()) == [0, 0, 0, 1, 1]
