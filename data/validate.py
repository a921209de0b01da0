"""Validate a data set: every bad file reported by path and reason.

    python -m data.validate --root DIR --list train_list.txt [--num-classes 1000]
                            [--workers 8] [--decode] [--write-clean clean_list.txt]
                            [--write-manifest [--manifest-dir DIR]]

Finds malformed list lines, missing, empty, non-image and truncated files (header and
end-marker checks, the same the loaders run before the first step), labels out of
range and duplicate lines; `--decode` also decodes every image fully (Pillow), which
finds corrupt image data that the header check cannot see. `--list` may name a
class-folder tree instead of a list file. Exit status 1 when anything is bad.
`--write-manifest` also writes the manifest of checked files that training reads
instead of checking every file at start (ppdpn/data/manifest.py; where the loader looks
for it with the same DataLoader.manifest_dir), so no rank of the first run has to scan.
Speed: the header check costs ~30 us per cached file per worker; the full decode a
few ms per ImageNet image per worker.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make `ppdpn` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppdpn.data import manifest  # noqa: E402
from ppdpn.data.check import find_bad_labels, inspect_files  # noqa: E402
from ppdpn.data.lists import (Samples, read_list, resolve_split, scan_image_folder,  # noqa: E402
                              write_list)

# Files per task sent to a worker: large enough to amortise the pickling.
CHUNK = 512


def _decode_chunk(items: Sequence[Tuple[str, int, int]]) -> List[Tuple[int, str]]:
    """Fully decode each (path, w, h); (position, reason) of those that fail."""
    from PIL import Image
    bad = []
    for k, (path, w, h) in enumerate(items):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # Pillow warns on some corrupt files
                with Image.open(path) as im:
                    im.load()
                    size = im.size
            if size != (w, h):
                bad.append((k, f"decoded size {size[0]}x{size[1]} != header {w}x{h}"))
        except Exception as e:  # any decoder complaint makes the file bad
            bad.append((k, f"decode failed ({type(e).__name__}: {e})"))
    return bad


def decode_all(paths: Sequence[str], sizes: np.ndarray, workers: int) -> List[Tuple[int, str]]:
    """Full decode of `paths` in `workers` processes."""
    items = [(p, int(w), int(h)) for p, (w, h) in zip(paths, sizes)]
    chunks = [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]
    if workers <= 1:
        results = map(_decode_chunk, chunks)
        return [(c * CHUNK + k, why) for c, bad in enumerate(results) for k, why in bad]
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        results = list(pool.map(_decode_chunk, chunks))
    return [(c * CHUNK + k, why) for c, bad in enumerate(results) for k, why in bad]


def check_split(samples: Samples, workers: int = 1) -> manifest.FileTable:
    """The loaders' file check (what the manifest keeps), parallel from 2 chunks on."""
    sizes, nbytes, bad = inspect_files(samples.paths, workers=workers, min_parallel=2 * CHUNK)
    return manifest.FileTable(sizes, nbytes, dict(bad), samples.paths.duplicates(), True)


def validate(samples: Samples, num_classes: Optional[int] = None, workers: int = 1,
             decode: bool = False, table: Optional[manifest.FileTable] = None
             ) -> List[Tuple[int, str]]:
    """Every problem of a split as (sample position, reason), sorted by position."""
    table = table or check_split(samples, workers)
    problems = dict(table.bad)
    for i, why in find_bad_labels(samples.labels, num_classes) + table.duplicates():
        problems.setdefault(i, why)
    if decode:
        ok = [i for i in range(len(samples)) if i not in problems]
        for k, why in decode_all([samples.paths[i] for i in ok], table.sizes[ok], workers):
            problems[ok[k]] = why
    return sorted(problems.items())


def load(root: str, list_name: str, malformed: List[str]) -> Samples:
    target = resolve_split(root, list_name)
    if os.path.isdir(target):
        return scan_image_folder(target)[0]
    return read_list(target, root, malformed=malformed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="image root (paths in the list are relative to it)")
    p.add_argument("--list", required=True,
                   help="list file, class-folder tree or shard index (*.index.npz), relative to --root")
    p.add_argument("--num-classes", type=int, default=None, help="labels must be below this")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--decode", action="store_true", help="also decode every image fully")
    p.add_argument("--write-clean", metavar="PATH", help="write a list without the bad lines")
    p.add_argument("--write-manifest", action="store_true",
                   help="also write the manifest of checked files the loaders read")
    p.add_argument("--manifest-dir", default="", help="as DataLoader.manifest_dir ('': "
                   "next to the list file or class-folder tree)")
    a = p.parse_args(argv)
    if resolve_split(a.root, a.list).endswith(".index.npz"):  # packed shards: data/pack.py
        if a.write_clean:
            p.error("--write-clean takes a list or a folder tree; repack with --drop-bad instead")
        from data.validate_shards import validate_shards
        return validate_shards(resolve_split(a.root, a.list), a.num_classes, a.workers, a.decode)
    start = time.time()
    malformed: List[str] = []
    samples = load(a.root, a.list, malformed)
    table = check_split(samples, a.workers)
    problems = validate(samples, a.num_classes, a.workers, a.decode, table)
    for line in malformed:
        print(f"BAD LINE {line}")
    for i, why in problems:
        print(f"BAD {samples.paths[i]}: {why}")
    if a.write_clean:
        bad = {i for i, _ in problems}
        keep = [i for i in range(len(samples)) if i not in bad]
        if os.path.isdir(resolve_split(a.root, a.list)):  # a class-folder tree: its paths
            rel = [os.path.relpath(path, a.root) for path in samples.paths]  # to --root
        else:  # a list file: its lines as written
            rel = samples.rel_paths or samples.paths
        write_list(a.write_clean, [rel[i] for i in keep], samples.labels[keep])
        print(f"wrote {len(keep)} good lines to {a.write_clean}")
    if a.write_manifest and malformed:  # the loaders refuse such a list before any manifest
        print("no manifest written: fix the malformed lines first")
    elif a.write_manifest:
        path = manifest.manifest_path(samples, a.manifest_dir)
        manifest.write_manifest(path, manifest.manifest_key(samples), table)
        print(f"wrote the manifest of {len(samples)} files ({len(table.bad)} bad) to {path}")
    print(f"checked {len(samples)} files of {samples.source} in {time.time() - start:.1f} s"
          f"{' with full decode' if a.decode else ''}: {len(problems)} bad files, "
          f"{len(malformed)} malformed lines")
    return 1 if problems or malformed else 0


if __name__ == "__main__":
    sys.exit(main())
