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
from ppdpn.data.check import BadFile, image_header
from ppdpn.data.lists import load_split, read_list
from ppdpn.data.shards import ShardIndex, ShardSamples, parse_tar_header, tar_header
from ppdpn.dist import DistContext
from test_data_loaders import (BACKENDS, N_ODD, _two_epochs_see_all_but,
                               assert_resume_repeats_the_batches, cfg_for, collect,
                               epoch_on_every_rank, write_images)

REPO = Path(__file__).resolve().parent.parent
SMALL = "8KiB"  # a few images per shard: the odd set makes a dozen shards


def run_pack(root, *args, out=None):
    """List order unless --order is given: loose and packed sample ids then agree."""
    order = [] if "--order" in args else ["--order", "list"]
    argv = ["--root", str(root), "--list", "train_list.txt", "--shard-size", SMALL,
            "--threads", "2", *order, *args]
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
    with tarfile.open(packed / "shards" / shards.index.shards[0]) as tar:
        tar.extractall(packed / "extracted", filter="data")
    first = sorted(p.name for p in (packed / "extracted").iterdir())
    assert first[:2] == ["000000000.cls", "000000000.jpg"]


def test_pack_a_class_folder_tree(tmp_path):
    import shutil
    root = write_images(tmp_path, 9)
    for i in range(9):
        os.makedirs(root / "tree" / f"class{i % 3}", exist_ok=True)
        shutil.copy(root / "img" / f"{i:03d}.jpg", root / "tree" / f"class{i % 3}" / f"{i:03d}.jpg")
    assert run_pack(root, "--list", "tree") == 0
    loose = load_split(str(root), "tree")
    shards = load_split(str(root), "shards/tree.index.npz")
    assert shards.labels.tolist() == loose.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(np.array_equal(shards.read(i), loose.read(i)) for i in range(9))


def test_own_tar_headers_are_the_standard_librarys():
    for name, size in [("000000123.jpg", 123457), ("000000001.cls", 1), ("000000002.png", 0)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
        assert tar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)
        assert parse_tar_header(tar_header(name, size)) == (name, size)
    bad = bytearray(tar_header("000000001.cls", 1))
    bad[130] ^= 1
    with pytest.raises(BadFile, match="bad checksum"):
        parse_tar_header(bad)


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
        assert sorted(epoch_on_every_rank(loaders, epoch)[1]) == list(range(N_ODD))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_loose_and_packed_give_identical_batches(packed, backend, split):
    loose = collect(build_loader(cfg_for(packed, backend), split, DistContext(), seed=7), 1)
    shards = collect(build_loader(shard_cfg(packed, backend), split, DistContext(), seed=7), 1)
    assert len(loose) == len(shards)
    for (a, la, va), (b, lb, vb) in zip(loose, shards):
        assert np.array_equal(la, lb) and np.array_equal(va, vb) and np.array_equal(a, b)


def test_shuffled_pack_stores_a_seeded_permutation_named_by_list_line(tmp_path, capsys):
    root = write_images(tmp_path, N_ODD)
    assert run_pack(root, "--order", "shuffled") == 0
    loose = read_list(str(root / "train_list.txt"), str(root))
    shards = load_split(str(root), "shards/train.index.npz")
    keys = shards.index.key.tolist()
    assert sorted(keys) == list(range(N_ODD)) and keys != sorted(keys)
    assert shards.labels.tolist() == keys  # label = list line in this set
    for i, key in enumerate(keys):
        assert np.array_equal(shards.read(i), loose.read(key))
        assert shards.name(i).endswith(f":{key:09d}.jpg")
    first = {p.name: p.read_bytes() for p in (root / "shards").glob("*.tar")}
    # the order is a pure function of the seed: a second pack elsewhere is byte-identical
    assert run_pack(root, "--order", "shuffled", out=tmp_path / "again") == 0
    assert first == {p.name: p.read_bytes() for p in (tmp_path / "again").glob("*.tar")}
    capsys.readouterr()
    assert run_pack(root, "--order", "shuffled", "--seed", "1") == 2  # other settings, same --out
    assert "another source or other settings" in capsys.readouterr().err


def _count_preads(monkeypatch):
    calls = []
    real = os.preadv

    def counted(fd, buffers, offset):
        calls.append(offset)
        return real(fd, buffers, offset)
    monkeypatch.setattr(os, "preadv", counted)
    return calls


def test_block_reads_serve_a_block_with_one_read(packed, monkeypatch):
    """Threads reading in the block-local order read each (block, shard) span once, and
    every sample's bytes are the loose file's."""
    from concurrent.futures import ThreadPoolExecutor
    from ppdpn.data.plan import ShardPlan
    loose = read_list(str(packed / "train_list.txt"), str(packed))
    shards = load_split(str(packed), "shards/train.index.npz")
    block, window = 4, 2
    spans = {(i // block, int(shards.index.shard[i])) for i in range(N_ODD)}
    shards.read_in_blocks(block, len(spans))  # keeps 2 x that: nothing evicted, exact count
    order = ShardPlan(N_ODD, 1, 0, 5, True, 3, block, window).batches(0)[0].reshape(-1)[:N_ODD]
    calls = _count_preads(monkeypatch)
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(shards.read, order.tolist()))
    for i, data in zip(order, got):
        assert np.array_equal(data, loose.read(int(i)))
    assert len(calls) == len(spans) < N_ODD


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_block_shuffle_on_shards_sees_every_sample_once_as_loose_files_do(packed, backend, world):
    kw = dict(shuffle_block=4, shuffle_window=2)
    loaders = [build_loader(shard_cfg(packed, backend, **kw), "train",
                            DistContext(rank=r, world_size=world), seed=5) for r in range(world)]
    assert loaders[0].samples.block == 4
    loose = build_loader(cfg_for(packed, backend, **kw), "train",
                         DistContext(rank=0, world_size=world), seed=5)
    for epoch in range(2):
        per_rank, seen = epoch_on_every_rank(loaders, epoch)
        assert sorted(seen) == list(range(N_ODD))
        # the same plan over loose files: rank 0 gets the very same batches
        for (a, la, _), (b, lb, _) in zip(per_rank[0], collect(loose, epoch)):
            assert np.array_equal(la, lb) and np.array_equal(a, b)
    if world == 1:
        assert_resume_repeats_the_batches(shard_cfg(packed, backend, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_on_shards_repeats_the_same_batches(packed, backend):
    assert_resume_repeats_the_batches(shard_cfg(packed, backend))



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [1, 4])
def test_member_failing_mid_run_is_skipped_and_named(tmp_path, backend, block, caplog):
    """Also when read in blocks: a span cut by the truncation falls back to the
    samples' own reads, and only the damaged members fail."""
    import logging
    root = write_images(tmp_path, 13)
    assert run_pack(root) == 0
    ld = build_loader(shard_cfg(root, backend, shuffle_block=block), "train", DistContext(), seed=0)
    index = ld.samples.index
    for i, junk in ((4, b"not an image"), (9, None)):  # after the pre-flight
        path = root / "shards" / index.shards[index.shard[i]]
        if junk:
            _flip(path, int(index.offset[i]), junk)
        else:  # the shard cut inside the member
            os.truncate(path, int(index.offset[i]) + 10)
    with caplog.at_level(logging.WARNING, logger="ppdpn.data"):
        _two_epochs_see_all_but(ld, 13, skipped=(4, 9))
    for i in (4, 9):
        assert caplog.text.count(index.name(i)) == 1, caplog.text  # named once


def _plant_bad_sources(root):
    """Missing, truncated and text-named-.jpg source files (positions 2, 5, 8) and a
    line listing 003.jpg again (position 12): {position: (file, reason)}."""
    os.unlink(root / "img" / "002.jpg")
    data = (root / "img" / "005.jpg").read_bytes()
    (root / "img" / "005.jpg").write_bytes(data[:len(data) // 2])
    (root / "img" / "008.jpg").write_text("not an image, but named like one\n" * 4)
    with open(root / "train_list.txt", "a") as f:
        f.write("img/003.jpg 12\n")  # listed twice
    return {2: ("002", "missing"), 5: ("005", "truncated"), 8: ("008", "not a JPEG or PNG"),
            12: ("003", "duplicate of line 4")}


def test_pack_names_every_bad_source_file_or_leaves_them_out(tmp_path, capsys):
    root = write_images(tmp_path, 12)
    planted = _plant_bad_sources(root)
    assert run_pack(root) == 1
    out = capsys.readouterr().out
    for name, why in planted.values():
        assert re.search(rf"BAD \S*img/{name}\.jpg: {why}", out), out
    assert "4 bad source files" in out and not (root / "shards" / "train.index.npz").exists()
    assert run_pack(root, "--drop-bad") == 0  # continues the stopped pack, leaving them out
    out = capsys.readouterr().out
    assert "left out 4 bad files" in out
    assert all(re.search(rf"BAD \S*img/{name}\.jpg: {why}", out) for name, why in planted.values())
    index = ShardIndex.load(str(root / "shards" / "train.index.npz"))
    assert index.dropped.tolist() == sorted(planted)
    assert index.key.tolist() == [i for i in range(13) if i not in planted]
    assert index.label.tolist() == index.key.tolist()  # the list's labels (= positions here)
    assert validate.main(["--root", str(root), "--list", "shards/train.index.npz",
                          "--decode", "--workers", "2"]) == 0
    assert "with full decode: 0 problems" in capsys.readouterr().out


def test_pack_refuses_bad_usage_naming_the_argument(tmp_path, capsys):
    root = write_images(tmp_path, 4)
    (tmp_path / "a_file").write_text("x")
    cases = [(["--list", "nope.txt"], "nope.txt does not exist"),
             (["--out", str(tmp_path / "a_file" / "sub")], "--out: cannot write to"),
             (["--shard-size", "big"], "--shard-size 'big'"),
             (["--root", str(tmp_path / "none")], "--root:")]
    for args, message in cases:
        assert run_pack(root, *args) == 2
        assert message in capsys.readouterr().err
    assert run_pack(root) == 0 and run_pack(root) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert run_pack(root, "--shard-size", "16KiB") == 2  # another pack in the same --out
    assert "--overwrite" in capsys.readouterr().err
    assert run_pack(root, "--shard-size", "16KiB", "--overwrite") == 0


def _flip(path, at, byte=None):
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(1)
        f.seek(at)
        f.write(bytes([old[0] ^ 0xFF]) if byte is None else byte)


def test_validate_names_every_bad_member(packed, tmp_path, capsys):
    import shutil
    shutil.copytree(packed / "shards", tmp_path / "shards")
    index = ShardIndex.load(str(tmp_path / "shards" / "train.index.npz"))
    last = len(index.shards) - 1
    shard_of = lambda i: tmp_path / "shards" / index.shards[index.shard[i]]  # noqa: E731
    _flip(shard_of(0), int(index.offset[0]), b"X")  # the JPEG magic of sample 0
    _flip(shard_of(3), int(index.offset[3] + index.size[3] // 2))  # inside image data
    lost = [i for i in range(N_ODD) if index.shard[i] == last]
    os.truncate(shard_of(lost[0]), int(index.offset[lost[0]]) + 100)  # cut the last shard
    index.label[6] = 7  # the index disagrees with the label member
    index.size[9] += 1  # ... and with a tar header
    index.save(str(tmp_path / "shards" / "train.index.npz"))
    assert validate.main(["--root", str(tmp_path), "--list", "shards/train.index.npz",
                          "--workers", "1"]) == 1
    out = capsys.readouterr().out
    names = {i: index.name(i) for i in range(N_ODD)}
    assert f"BAD {names[0]}: not a JPEG or PNG image" in out
    assert f"BAD {index.shards[index.shard[3]]}: sha256 differs" in out
    assert f"BAD {names[6]}: label member" in out and f"BAD {names[9]}: tar header says" in out
    for i in lost:
        assert f"BAD {names[i]}: member ends at byte" in out
    assert f"BAD {index.shards[last]}: " in out  # the shorter file itself


def _wait_for(predicate, proc, timeout=60):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupted_pack_resumes_to_the_same_shards(tmp_path):
    """A source file that is a FIFO stops the pack mid-run for real; SIGINT, then
    SIGKILL, then the real file: the rerun keeps the verified shards, redoes a damaged
    one and the partial one, and ends byte-identical to an uninterrupted pack."""
    import shutil
    ref = write_images(tmp_path / "ref", 30)
    assert run_pack(ref) == 0
    root = tmp_path / "cut"
    shutil.copytree(ref, root, ignore=shutil.ignore_patterns("shards", ".*"))
    os.unlink(root / "img" / "021.jpg")
    os.mkfifo(root / "img" / "021.jpg")  # reading it blocks until someone writes
    cmd = [sys.executable, "-m", "data.pack", "--root", str(root), "--list", "train_list.txt",
           "--shard-size", SMALL, "--threads", "1", "--order", "list"]
    shards = root / "shards"
    for sig in (signal.SIGINT, signal.SIGKILL):
        # SIGINT back to its default: a test run started in the background (nohup, `&`)
        # hands SIG_IGN down, and Python then installs no KeyboardInterrupt handler
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=_default_sigint)
        _wait_for(lambda: list(shards.glob("*.partial")) and len(list(shards.glob("*.tar"))) >= 5,
                  proc)
        time.sleep(0.5)  # blocked in the FIFO now
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
        if sig == signal.SIGINT:
            assert "rerun the same command" in err
    assert not (shards / "train.index.npz").exists()
    os.unlink(root / "img" / "021.jpg")
    shutil.copy(ref / "img" / "021.jpg", root / "img" / "021.jpg")
    _flip(shards / "train-000001.tar", 700)  # a completed shard damaged meanwhile
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "redo train-000001.tar: its bytes changed" in r.stdout
    assert re.search(r"kept \d+ verified shards", r.stdout)
    redone = re.findall(r"(train-\d{6}\.tar): \d+ samples", r.stdout)
    assert redone[0] == "train-000001.tar" and "train-000000.tar" not in redone
    names = sorted(p.name for p in (ref / "shards").glob("*.tar"))
    assert names == sorted(p.name for p in shards.glob("*.tar*"))
    for name in names:
        assert (ref / "shards" / name).read_bytes() == (shards / name).read_bytes(), name
    a, b = (ShardIndex.load(str(d / "shards" / "train.index.npz")) for d in (ref, root))
    for field in ("shard", "offset", "size", "label", "wh", "key", "kind", "shard_bytes"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.shard_sha256 == b.shard_sha256 and a.source_sha256 == b.source_sha256


def test_a_file_that_is_no_shard_index_is_named(tmp_path):
    from ppdpn.data.lists import DataSetError
    np.savez(tmp_path / "other.index.npz", a=np.zeros(3))
    (tmp_path / "text.index.npz").write_text("hello")
    for name, why in (("other", "no format 'ppdpn-shards'"), ("text", "not an .npz file"),
                      ("none", "shard index not found")):
        with pytest.raises(DataSetError, match=why) as e:
            load_split(str(tmp_path), f"{name}.index.npz")
        assert f"{name}.index.npz" in str(e.value)
