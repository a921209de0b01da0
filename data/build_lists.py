"""Build PaddleClas list files from a standard ImageNet download.

    python -m data.build_lists --root /data/ILSVRC2012

Expects ROOT/train/nXXXXXXXX/*.JPEG. The validation images may be
  * in class folders ROOT/val/nXXXXXXXX/*.JPEG, or
  * flat in ROOT/val/ with the ground truth as LOC_val_solution.csv (Kaggle), or
  * flat with ILSVRC2012_validation_ground_truth.txt (devkit); its numbers are
    ILSVRC2012_IDs, not sorted-synset indices, so the devkit's data/meta.mat (read with
    scipy) or --id-synsets (one WNID per line, in ID order) maps them to synsets.
Labels are indices of the sorted train synsets (as PaddleClas and torchvision number
them). Writes ROOT/train_list.txt, ROOT/val_list.txt and ROOT/labels.txt ("index wnid
[names]", names from LOC_synset_mapping.txt when present).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `ppdpn` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppdpn.data.lists import IMAGE_EXTENSIONS, DataSetError, scan_image_folder, write_list  # noqa: E402

GROUND_TRUTH_TXT = "ILSVRC2012_validation_ground_truth.txt"
SOLUTION_CSV = "LOC_val_solution.csv"
SYNSET_NAMES = "LOC_synset_mapping.txt"
# The devkit numbers its 1000 leaf classes 1..1000; meta.mat also lists 860 inner nodes.
NUM_ILSVRC_CLASSES = 1000


def _find(root: Path, name: str, explicit: Optional[str]) -> Optional[Path]:
    if explicit:
        return Path(explicit)
    for cand in (root / name, root / "ILSVRC2012_devkit_t12" / "data" / name):
        if cand.is_file():
            return cand
    return None


def _images(folder: Path) -> List[str]:
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def val_from_csv(csv_path: Path) -> Dict[str, str]:
    """LOC_val_solution.csv: ImageId, 'wnid x y x y wnid ...' -> {image id: wnid}."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}


def id_to_wnid(meta: Optional[Path], id_synsets: Optional[Path]) -> List[str]:
    """WNIDs in ILSVRC2012_ID order (index 0 = ID 1)."""
    if id_synsets:
        wnids = id_synsets.read_text().split()
    elif meta:
        try:
            from scipy.io import loadmat
        except ImportError:
            raise DataSetError(f"reading {meta} needs scipy; or pass --id-synsets") from None
        syn = loadmat(str(meta), squeeze_me=True)["synsets"]
        pairs = sorted((int(i), str(w)) for i, w in zip(syn["ILSVRC2012_ID"], syn["WNID"]))
        wnids = [w for i, w in pairs if 1 <= i <= NUM_ILSVRC_CLASSES]
    else:
        raise DataSetError(f"{GROUND_TRUTH_TXT} holds ILSVRC2012_IDs: give the devkit's "
                           "meta.mat (--devkit-meta) or --id-synsets to map them to synsets")
    return wnids


def val_from_ground_truth(gt: Path, names: List[str], wnids: List[str]) -> Dict[str, str]:
    """Line k of the devkit ground truth is the ID of ILSVRC2012_val_{k:08d}."""
    ids = [int(v) for v in gt.read_text().split()]
    out = {}
    for name in names:
        stem = os.path.splitext(name)[0]
        k = int(stem.rsplit("_", 1)[-1])
        if not 1 <= k <= len(ids):
            raise DataSetError(f"{name}: no line {k} in {gt} ({len(ids)} lines)")
        out[stem] = wnids[ids[k - 1] - 1]
    return out


def build_val(root: Path, val_dir: str, classes: List[str], args) -> Tuple[List[str], List[int]]:
    """Relative paths and labels of the validation split, in whichever layout it has."""
    folder = root / val_dir
    index = {c: i for i, c in enumerate(classes)}
    subdirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if subdirs:
        samples, val_classes = scan_image_folder(str(folder))
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise DataSetError(f"{folder}: class folders not in train: {unknown[:5]}")
        rel = [os.path.join(val_dir, p) for p in samples.rel_paths]
        return rel, [index[val_classes[y]] for y in samples.labels]
    names = _images(folder)
    csv_path = _find(root, SOLUTION_CSV, args.val_csv)
    if csv_path:
        truth = val_from_csv(csv_path)
    else:
        gt = _find(root, GROUND_TRUTH_TXT, args.val_ground_truth)
        if gt is None:
            raise DataSetError(f"{folder} is flat but neither {SOLUTION_CSV} nor "
                               f"{GROUND_TRUTH_TXT} was found under {root}")
        meta = _find(root, "meta.mat", args.devkit_meta)
        ids = Path(args.id_synsets) if args.id_synsets else None
        truth = val_from_ground_truth(gt, names, id_to_wnid(meta, ids))
    rel, labels = [], []
    for name in names:
        wnid = truth.get(os.path.splitext(name)[0])
        if wnid is None or wnid not in index:
            raise DataSetError(f"{folder / name}: no ground truth or unknown class {wnid!r}")
        rel.append(f"{val_dir}/{name}")
        labels.append(index[wnid])
    return rel, labels


def write_labels(root: Path, classes: List[str], out: Path) -> None:
    names = {}
    mapping = root / SYNSET_NAMES
    if mapping.is_file():  # "n01440764 tench, Tinca tinca"
        for line in mapping.read_text(encoding="utf-8").splitlines():
            wnid, _, text = line.partition(" ")
            names[wnid] = text.strip()
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(f"{i} {c} {names.get(c, '')}".rstrip() + "\n" for i, c in enumerate(classes))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="ImageNet root holding train/ and val/")
    p.add_argument("--train", default="train")
    p.add_argument("--val", default="val")
    p.add_argument("--val-csv", help=f"{SOLUTION_CSV} (default: looked up under --root)")
    p.add_argument("--val-ground-truth", help=f"{GROUND_TRUTH_TXT} (default: looked up)")
    p.add_argument("--devkit-meta", help="devkit data/meta.mat (default: looked up)")
    p.add_argument("--id-synsets", help="WNIDs in ILSVRC2012_ID order, instead of meta.mat")
    p.add_argument("--out", help="where the lists go (default: --root)")
    a = p.parse_args(argv)
    root = Path(a.root)
    out = Path(a.out) if a.out else root
    try:
        train, classes = scan_image_folder(str(root / a.train))
        rel_train = [os.path.join(a.train, r) for r in train.rel_paths]
        write_list(str(out / "train_list.txt"), rel_train, train.labels)
        n_val = 0
        if (root / a.val).is_dir():
            rel_val, val_labels = build_val(root, a.val, classes, a)
            write_list(str(out / "val_list.txt"), rel_val, val_labels)
            n_val = len(rel_val)
        write_labels(root, classes, out / "labels.txt")
    except DataSetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(classes)} classes, {len(rel_train)} train and {n_val} val images; "
          f"lists in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
