"""Packed shards: pack, read back, both loaders on shards, validate, resume a pack."""
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data import pack, validate
from ppdpn.data import build_loader
from ppdpn.data.check import image_header
from ppdpn.data.lists import load_split, read_list
from ppdpn.data.shards import ShardIndex, ShardSamples
from ppdpn.dist import DistContext
from test_data_loaders import BACKENDS, N_ODD, cfg_for, collect, write_images

REPO = Path(__file__).resolve().parent.parent
SMALL = "8KiB"  # a few images per shard: the odd set makes a dozen shards


def run_pack(root, *args, out=None):
    argv = ["--root", str(root), "--list", "train_list.txt", "--shard-size", SMALL,
            "--threads", "2", *args]
    return pack.main(argv + (["--out", str(out)] if out else []))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The loaders' odd set (23 images, label = index), loose and packed (train + val)."""
    root = write_images(tmp_path_factory.mktemp("packed"), N_ODD)
    assert run_pack(root) == 0
    assert run_pack(root, "--list", "val_list.txt") == 0
    return root


def test_pack_reads_back_every_source_file(packed):
    loose = read_list(str(packed / "train_list.txt"), str(packed))
    shards = load_split(str(packed), "shards/train.index.npz")
    assert isinstance(shards, ShardSamples) and len(shards) == N_ODD
    assert len(shards.index.shards) > 5  # really spread over several files
    assert np.array_equal(shards.labels, loose.labels)
    for i in range(N_ODD):
        assert np.array_equal(shards.read(i), loose.read(i))
        assert tuple(shards.sizes[i]) == image_header(loose.name(i)) == shards.header(i)
        assert re.fullmatch(r"train-\d{6}\.tar:\d{9}\.jpg", shards.name(i))
    assert shards.paths[3] == shards.name(3)
    # the standard library reads the shards: webdataset names, image then label, adjacent
    seen = []
    for name in shards.index.shards:
        with tarfile.open(packed / "shards" / name) as tar:
            names = tar.getnames()
            assert all(re.fullmatch(r"\d{9}\.(jpg|cls)", m) for m in names)
            for img, cls in zip(names[::2], names[1::2]):
                key = img.split(".")[0]
                assert img == key + ".jpg" and cls == key + ".cls"
                i = int(key)
                assert tar.extractfile(img).read() == loose.read(i).tobytes()
                assert tar.extractfile(cls).read() == str(i).encode()
                seen.append(i)
    assert seen == list(range(N_ODD))  # list order


_INHERITED = None  # what a forked worker finds in its copy of the parent's memory


def test_reads_after_fork_open_their_own_files(packed):
    global _INHERITED
    shards = _INHERITED = load_split(str(packed), "shards/train.index.npz")
    first = shards.read(0)  # the parent holds an open shard now
    with mp.get_context("fork").Pool(2) as pool:
        got = pool.map(_read_in_child, range(N_ODD))
    for i, (data, inherited_fds, reopened) in enumerate(got):
        assert np.array_equal(data, shards.read(i)) and reopened
    assert got[0][1] >= 1  # the child saw the parent's fds, and did not use them
    assert np.array_equal(first, shards.read(0)) and shards._pid == os.getpid()


def _read_in_child(i):
    shards = _INHERITED
    inherited = len(shards._fds) if shards._pid != os.getpid() else 0
    data = shards.read(i)
    return data, inherited, shards._pid == os.getpid()


def shard_cfg(root, backend, **kw):
    return cfg_for(root, backend, train_list="shards/train.index.npz",
                   val_list="shards/val.index.npz", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_exactly_once_per_epoch_on_shards(packed, backend, world):
    cfg = shard_cfg(packed, backend)
    loaders = [build_loader(cfg, "train", DistContext(rank=r, world_size=world), seed=5)
               for r in range(world)]
    assert all(isinstance(ld.samples, ShardSamples) for ld in loaders)
    for epoch in range(2):
        seen = []
        for ld in loaders:
            batches = collect(ld, epoch)
            assert len(batches) == ld.steps_per_epoch
            for _, labels, valid in batches:
                seen += labels[valid == 1].tolist()
        assert sorted(seen) == list(range(N_ODD))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_loose_and_packed_give_identical_batches(packed, backend, split):
    loose = collect(build_loader(cfg_for(packed, backend), split, DistContext(), seed=7), 1)
    shards = collect(build_loader(shard_cfg(packed, backend), split, DistContext(), seed=7), 1)
    assert len(loose) == len(shards)
    for (a, la, va), (b, lb, vb) in zip(loose, shards):
        assert np.array_equal(la, lb) and np.array_equal(va, vb) and np.array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_on_shards_repeats_the_same_batches(packed, backend):
    cfg = shard_cfg(packed, backend)
    full = collect(build_loader(cfg, "train", DistContext(), seed=3), epoch=2)
    resumed = collect(build_loader(cfg, "train", DistContext(), seed=3), epoch=2, start=3)
    assert len(resumed) == len(full) - 3
    for (a, la, va), (b, lb, vb) in zip(full[3:], resumed):
        assert np.array_equal(la, lb) and np.array_equal(va, vb) and np.array_equal(a, b)
