"""The manifest of checked files and the compact sample tables (issue 19, items 1-2)."""
import logging
import multiprocessing as mp
import os
import pickle
import time

import cv2
import numpy as np
import pytest

from ppdpn.data import build_loader, check, lists, manifest
from ppdpn.data.lists import DataSetError, _parse_lines, load_split, read_list
from ppdpn.data.paths import PathTable
from ppdpn.dist import DistContext
from test_data_loaders import cfg_for, collect, write_images


def _count_inspections(monkeypatch):
    """A counter around the real check.inspect_file (the one function that reads a file
    for the manifest): how many files a step opened."""
    calls = []
    real = check.inspect_file

    def counted(path):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(check, "inspect_file", counted)
    return calls


def _manifest_of(root):
    return str(root / "train_list.txt.manifest.npz")


def test_second_start_reads_the_manifest_not_the_images(tmp_path, monkeypatch, caplog):
    root = write_images(tmp_path, 9)
    calls = _count_inspections(monkeypatch)
    first = build_loader(cfg_for(root, "dali"), "train", DistContext(), 0)
    assert len(calls) == 9 and os.path.isfile(_manifest_of(root))
    assert not os.path.exists(_manifest_of(root) + ".lock")
    os.remove(root / "img" / "004.jpg")  # gone after the manifest: no start-up read sees it
    calls.clear()
    again = build_loader(cfg_for(root, "dali"), "train", DistContext(), 0)
    assert calls == []
    np.testing.assert_array_equal(again.sizes, first.sizes)
    np.testing.assert_array_equal(again.file_bytes, first.file_bytes)
    assert (again.file_bytes > 0).all() and (again.sizes > 0).all()
    with caplog.at_level(logging.WARNING, logger="ppdpn.data"):  # caught when read
        seen = sorted(sum((lab[v == 1].tolist() for _, lab, v in collect(again, 0)), []))
    assert seen == [0, 1, 2, 3, 5, 6, 7, 8]
    assert "004.jpg" in caplog.text and "unreadable mid-run" in caplog.text


@pytest.mark.parametrize("backend", ["dali", "fallback"])
def test_file_rewritten_after_the_manifest_is_named_and_skipped(tmp_path, backend, caplog):
    root = write_images(tmp_path, 10)
    build_loader(cfg_for(root, backend), "train", DistContext(), 0)  # writes the manifest
    img = cv2.imread(str(root / "img" / "002.jpg"))
    cv2.imwrite(str(root / "img" / "002.jpg"), cv2.resize(img, (img.shape[1] + 5, img.shape[0])))
    path = root / "img" / "006.jpg"  # same pixel size, other bytes: another image
    before = path.stat().st_size
    img = cv2.imread(str(path))
    cv2.imwrite(str(path), 255 - img, [cv2.IMWRITE_JPEG_QUALITY, 60])
    after = path.stat().st_size
    assert after != before
    loader = build_loader(cfg_for(root, backend), "train", DistContext(), 0)
    with caplog.at_level(logging.WARNING, logger="ppdpn.data"):
        batches = collect(loader, 0)
    seen = sorted(sum((lab[v == 1].tolist() for _, lab, v in batches), []))
    assert seen == [0, 1, 3, 4, 5, 7, 8, 9]
    assert sum(len(lab) for _, lab, _ in batches) == loader.steps_per_epoch * loader.batch_size
    lines = caplog.text.splitlines()
    assert any("002.jpg" in ln and "changed since the pre-flight" in ln for ln in lines), lines
    assert any("006.jpg" in ln and f"({after} bytes, manifest says {before})" in ln
               for ln in lines), lines


def test_changed_list_is_rebuilt(tmp_path, monkeypatch, caplog):
    root = write_images(tmp_path, 6)
    build_loader(cfg_for(root, "dali"), "train", DistContext(), 0)
    lines = (root / "train_list.txt").read_text().splitlines(keepends=True)
    (root / "train_list.txt").write_text("".join(lines[:4]))
    calls = _count_inspections(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ppdpn.data"):
        loader = build_loader(cfg_for(root, "dali"), "train", DistContext(), 0)
    assert loader.num_samples == 4 and len(calls) == 4
    assert f"manifest {_manifest_of(root)} was made for another list content" in caplog.text


def _rewrite(path, **changes):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "edited sizes", "old version",
                                    "not a zip"])
def test_damaged_or_outdated_manifest_is_logged_and_rebuilt(tmp_path, monkeypatch, caplog, damage):
    root = write_images(tmp_path, 5)
    first = build_loader(cfg_for(root, "dali"), "train", DistContext(), 0)
    path = _manifest_of(root)
    data = open(path, "rb").read()
    if damage == "truncated":
        open(path, "wb").write(data[:len(data) // 2])
    elif damage == "flipped byte":
        at = data.index(b"sizes.npy") + 200  # inside the stored sizes array
        open(path, "wb").write(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:])
    elif damage == "edited sizes":  # a consistent zip whose arrays no longer match
        _rewrite(path, sizes=np.load(path)["sizes"] + 1)
    elif damage == "old version":
        monkeypatch.setattr(manifest, "FORMAT_VERSION", manifest.FORMAT_VERSION + 1)
    else:
        open(path, "wb").write(b"not a manifest at all" * 10)
    calls = _count_inspections(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ppdpn.data"):
        again = build_loader(cfg_for(root, "dali"), "train", DistContext(), 0)
    assert len(calls) == 5
    np.testing.assert_array_equal(again.sizes, first.sizes)
    warned = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert len(warned) == 1 and path in warned[0], warned
    assert len(warned[0].splitlines()) == 1
    calls.clear()
    build_loader(cfg_for(root, "dali"), "train", DistContext(), 0)
    assert calls == []  # and the rebuilt one is trusted again


def test_bad_files_are_in_the_manifest_and_the_verdict_is_reused(tmp_path, monkeypatch):
    root = write_images(tmp_path, 6)
    (root / "img" / "001.jpg").write_bytes(b"")
    with pytest.raises(DataSetError, match="001.jpg: empty"):
        build_loader(cfg_for(root, "dali"), "train", DistContext(), 0)
    calls = _count_inspections(monkeypatch)
    with pytest.raises(DataSetError, match="001.jpg: empty"):
        build_loader(cfg_for(root, "dali"), "train", DistContext(), 0)
    loader = build_loader(cfg_for(root, "fallback", drop_bad_files=True), "train", DistContext(), 0)
    assert calls == [] and loader.num_samples == 5


def test_manifest_dir_and_an_unwritable_place(tmp_path):
    root = write_images(tmp_path / "data", 4)
    build_loader(cfg_for(root, "dali", manifest_dir=str(tmp_path / "manifests")), "train",
                 DistContext(), 0)
    made = os.listdir(tmp_path / "manifests")
    assert len(made) == 1 and made[0].startswith("train_list.txt.") and made[0].endswith(".npz")
    assert not os.path.exists(_manifest_of(root))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataSetError, match="DataLoader.manifest_dir"):
        build_loader(cfg_for(root, "dali", manifest_dir=str(tmp_path / "a_file" / "sub")),
                     "train", DistContext(), 0)


def test_a_read_only_data_set_keeps_its_manifest_in_the_user_cache(tmp_path, monkeypatch, caplog):
    """A shared, read-only ImageNet copy (a read-only bind mount here): the manifest goes
    to $XDG_CACHE_HOME/ppdpn/manifests, and the second start reads it from there."""
    import subprocess
    src = write_images(tmp_path / "data", 4)
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        calls = _count_inspections(monkeypatch)
        with caplog.at_level(logging.INFO, logger="ppdpn.data"):
            build_loader(cfg_for(ro, "dali"), "train", DistContext(), 0)
        assert "read-only" in caplog.text and len(calls) == 4
        made = os.listdir(tmp_path / "cache" / "ppdpn" / "manifests")
        assert len(made) == 1 and made[0].startswith("train_list.txt.")
        calls.clear()
        build_loader(cfg_for(ro, "dali"), "train", DistContext(), 0)
        assert calls == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_class_folder_tree_gets_a_manifest_beside_it(tmp_path, monkeypatch):
    for c in range(2):
        write_images(tmp_path / "val" / f"class{c}", 3, seed=c)
    cfg = cfg_for(tmp_path, "dali", val_list="val")
    build_loader(cfg, "val", DistContext(), 0)
    assert os.path.isfile(tmp_path / "val.manifest.npz")
    calls = _count_inspections(monkeypatch)
    assert build_loader(cfg, "val", DistContext(), 0).num_samples == 6 and calls == []


def test_validate_writes_the_manifest_ahead(tmp_path, monkeypatch, capsys):
    from data.validate import main
    root = write_images(tmp_path, 6)
    assert main(["--root", str(root), "--list", "train_list.txt", "--workers", "1",
                 "--write-manifest"]) == 0
    assert "wrote the manifest of 6 files (0 bad)" in capsys.readouterr().out
    calls = _count_inspections(monkeypatch)
    assert build_loader(cfg_for(root, "fallback"), "train", DistContext(), 0).num_samples == 6
    assert calls == []


# ---------------------------------------------------------------- who builds

def _start_together(root, barrier, out, delay):
    """One 'rank': waits for the others, then loads or builds the manifest."""
    manifest.POLL_SECONDS = 0.1
    real = check.inspect_file

    def slow(path):  # a slow file system: the build outlasts the others' start
        time.sleep(delay)
        return real(path)
    check.inspect_file = slow
    samples = load_split(str(root), "train_list.txt")
    barrier.wait()
    table = manifest.load_or_build(samples, "", workers=1)
    out.put((os.getpid(), table.built_here, table.sizes.tobytes(), table.nbytes.tobytes(),
             sorted(table.bad.items())))


def test_processes_starting_together_build_once_and_agree(tmp_path):
    root = write_images(tmp_path, 12)
    (root / "img" / "003.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 100)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_start_together, args=(root, barrier, out, 0.3)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(built for _, built, *_ in results) == 1
    assert len({tuple(map(repr, r[2:])) for r in results}) == 1  # identical tables
    assert results[0][4] and results[0][4][0][0] == 3  # the bad file, same verdict for all
    assert not os.path.exists(_manifest_of(root) + ".lock")


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    root = write_images(tmp_path, 4)
    lock = _manifest_of(root) + ".lock"
    with open(lock, "w") as f:
        f.write("node9 pid 4242\n")
    old = time.time() - manifest.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    samples = load_split(str(root), "train_list.txt")
    with caplog.at_level(logging.WARNING, logger="ppdpn.data"):
        table = manifest.load_or_build(samples)
    assert table.built_here and "no heartbeat from node9 pid 4242" in caplog.text
    assert not os.path.exists(lock) and os.path.isfile(_manifest_of(root))


def test_a_waiter_takes_the_builders_manifest(tmp_path, monkeypatch, caplog):
    """A live lock (fresh heartbeat): wait, then read what its holder wrote."""
    import threading
    root = write_images(tmp_path, 4)
    path = _manifest_of(root)
    samples = load_split(str(root), "train_list.txt")
    with open(path + ".lock", "w") as f:
        f.write("node3 pid 77\n")
    built = manifest.check_samples(samples, 1)

    def builder():
        time.sleep(0.6)
        manifest.write_manifest(path, manifest.manifest_key(samples), built)
        os.remove(path + ".lock")
    monkeypatch.setattr(manifest, "POLL_SECONDS", 0.1)
    thread = threading.Thread(target=builder)
    thread.start()
    calls = _count_inspections(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ppdpn.data"):
        table = manifest.load_or_build(samples)
    thread.join()
    assert not table.built_here and calls == []
    np.testing.assert_array_equal(table.sizes, built.sizes)
    assert "waiting for node3 pid 77" in caplog.text


# ---------------------------------------------------------------- compact tables

def test_samples_hold_arrays_not_strings(tmp_path):
    n = 5000
    lines = "".join(f"train/n{i % 7:08d}/img_{i}.JPEG {i % 7}\n" for i in range(n))
    (tmp_path / "list.txt").write_text(lines)
    s = read_list(str(tmp_path / "list.txt"), "/data")
    assert isinstance(s.paths, PathTable)
    assert type(s.paths.blob) is np.ndarray and type(s.paths.offsets) is np.ndarray
    assert s.labels.dtype == np.int64 and s.labels[12] == 5
    assert s.paths[12] == "/data/train/n00000005/img_12.JPEG" == s.name(12)
    assert s.rel_paths[-1] == f"train/n{(n - 1) % 7:08d}/img_{n - 1}.JPEG"
    # what a fork or pickle of the data set carries: the three arrays, nothing per path
    assert len(pickle.dumps(s)) < s.paths.nbytes() + s.labels.nbytes + 1000
    sub = s.subset(np.arange(0, n, 3))
    assert isinstance(sub.paths, PathTable) and sub.paths[4] == s.paths[12]
    assert list(sub.paths)[:2] == [s.paths[0], s.paths[3]]


@pytest.mark.parametrize("text", [
    "a.jpg 1\nb c.jpg 2\n",  # the fast form, a space in a path
    "a.jpg 1\r\nb.jpg 2\r\n",  # CRLF
    "a.jpg\t1\n\n  b.jpg   007  \n",  # tabs, blank line, padding, leading zeros
    "dir/é.jpg 3\nx.jpg 4",  # non-ASCII, no final newline
])
@pytest.mark.parametrize("chunk", [None, 5])  # 5: lines straddle the parser's pieces
def test_fast_and_careful_parsers_agree(tmp_path, monkeypatch, text, chunk):
    if chunk:
        monkeypatch.setattr(lists, "PARSE_CHUNK", chunk)
    path = tmp_path / "list.txt"
    path.write_bytes(text.encode())
    s = read_list(str(path), "root")
    rel, labels = _parse_lines(text.encode(), str(path), None)
    assert list(s.rel_paths) == rel and s.labels.tolist() == labels
    assert list(s.paths) == [os.path.join("root", r) for r in rel]


def test_duplicates_normalise_paths_like_before(tmp_path):
    text = "a/b.jpg 0\nc.jpg 1\na//b.jpg 0\n./c.jpg 1\nd.jpg 2\nc.jpg 1\n"
    (tmp_path / "list.txt").write_text(text)
    s = read_list(str(tmp_path / "list.txt"), str(tmp_path))
    assert check.find_duplicates(s.paths) == [(2, "duplicate of line 1"),
                                              (3, "duplicate of line 2"),
                                              (5, "duplicate of line 2")]
    plain = PathTable.from_strings(["x/1", "x/2", "x/1", "y", "x/2"], "/r")
    assert plain.duplicates() == [(2, 0), (4, 1)]
