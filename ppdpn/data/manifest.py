"""The manifest: every file's check result, computed once per data set, read by every rank.

Checking ImageNet's 1.28 M files (header + tail of each) on every rank at every start
costs tens of millions of reads on a network file system before the first step, and
again at each requeue. The manifest keeps what the run needs of each file (width and
height from its header, its size in bytes, ok or why it is bad) and of the list
(duplicate lines) in one .npz file, keyed by the list's content and the image root.

Who builds: the first process to create `<manifest>.lock` (O_CREAT | O_EXCL), with no
collective (gloo gives up after ~30 s, a scan takes longer). It refreshes the lock's
mtime every HEARTBEAT_SECONDS; the others poll for the manifest and take the lock over
when its heartbeat is older than STALE_LOCK_SECONDS (the builder died). This works on
one node, on many nodes sharing a file system, and on nodes each with their own copy.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ppdpn.data.check import inspect_files
from ppdpn.data.lists import DataSetError, Samples

log = logging.getLogger("ppdpn.data")

# Bump when what the arrays mean changes: older files are then rebuilt, never misread.
FORMAT_VERSION = 1
# The builder touches its lock this often ...
HEARTBEAT_SECONDS = 5.0
# ... and a lock untouched for this long belongs to a dead builder (12 missed beats:
# a loaded NFS server can delay an mtime update by seconds, not by a minute).
STALE_LOCK_SECONDS = 60.0
# How often a waiting rank looks for the finished manifest: a stat and maybe one read.
POLL_SECONDS = 1.0
_ARRAYS = ("sizes", "nbytes", "bad_index", "bad_reason", "dup_index", "dup_first")


@dataclass
class FileTable:
    """Per-file check results of a split, in list order."""
    sizes: np.ndarray  # int32 [n, 2]: (width, height) from the header; -1 for a bad file
    nbytes: np.ndarray  # int64 [n]: file size when checked; -1 for a bad file
    bad: Dict[int, str]  # index -> why the file is bad
    duplicate_of: List[Tuple[int, int]]  # (index, index of the first line naming that file)
    built_here: bool = field(default=False, compare=False)  # this process scanned the files

    def duplicates(self) -> List[Tuple[int, str]]:
        """(index, reason) for lines naming a file listed before (check.find_duplicates)."""
        return [(i, f"duplicate of line {first + 1}") for i, first in self.duplicate_of]


def manifest_path(samples: Samples, manifest_dir: str = "") -> str:
    """Next to the list file (`train_list.txt.manifest.npz`) or the class-folder tree
    (`val.manifest.npz`); in `manifest_dir`, named with the key too, since several
    data sets may share that folder."""
    source = samples.source.rstrip("/") or samples.source
    if not manifest_dir:
        return f"{source}.manifest.npz"
    return os.path.join(manifest_dir, f"{os.path.basename(source)}."
                                      f"{manifest_key(samples)[:16]}.manifest.npz")


def manifest_key(samples: Samples) -> str:
    """sha256 of the list's content and the absolute root its paths are joined to."""
    text = f"{samples.content_digest()}\n{os.path.abspath(samples.paths.root or '.')}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def check_samples(samples: Samples, workers: int) -> FileTable:
    """Read every file's header and tail (the scan the manifest saves)."""
    sizes, nbytes, bad = inspect_files(samples.paths, workers=max(1, workers))
    return FileTable(sizes, nbytes, dict(bad), samples.paths.duplicates(), built_here=True)


def user_cache_dir() -> str:
    """Where manifests of read-only data sets go: $XDG_CACHE_HOME/ppdpn/manifests."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ppdpn", "manifests")


def load_or_build(samples: Samples, manifest_dir: str = "", workers: int = 1) -> FileTable:
    """The split's FileTable from its manifest, built first if missing, stale or damaged.

    Without manifest_dir, a data set whose folder is read-only (a shared ImageNet copy,
    often) keeps its manifest in user_cache_dir(); one built ahead next to the list
    (`python -m data.validate --write-manifest`) is still read first."""
    path = manifest_path(samples, manifest_dir)
    key = manifest_key(samples)
    table, why = read_manifest(path, key, len(samples))
    if table is not None:
        return table
    folder = os.path.dirname(os.path.abspath(path))
    if not manifest_dir and os.path.isdir(folder) and not os.access(folder, os.W_OK):
        cache = user_cache_dir()
        path = manifest_path(samples, cache)
        table, why = read_manifest(path, key, len(samples))
        if table is not None:
            return table
        log.info("%s is read-only: the manifest of checked files goes to %s "
                 "(DataLoader.manifest_dir chooses another folder)", folder, cache)
    if why != "missing":
        log.warning("manifest %s %s: rebuilding it", path, why)
    return _build_once(samples, path, key, workers)


def _build_once(samples: Samples, path: str, key: str, workers: int) -> FileTable:
    """Build the manifest in the one process holding the lock; wait for it in the others."""
    lock = f"{path}.lock"
    told = False
    while True:
        try:
            fd = _create_lock(lock)
        except FileExistsError:
            holder, age = _lock_state(lock)
            if age is not None and age > STALE_LOCK_SECONDS:
                log.warning("manifest lock %s: no heartbeat from %s for %.0f s; taking over",
                            lock, holder, age)
                _remove(lock)
                continue
            if age is not None and not told:
                log.info("waiting for %s to build the manifest %s", holder, path)
                told = True
            time.sleep(POLL_SECONDS)
            table, _ = read_manifest(path, key, len(samples))
            if table is not None:
                return table
            continue
        return _build_holding(samples, path, key, workers, lock, fd)


def _build_holding(samples: Samples, path: str, key: str, workers: int, lock: str,
                   fd: int) -> FileTable:
    """Scan and write while holding the lock; a heartbeat thread keeps it fresh."""
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{_me()}\n")
        table, _ = read_manifest(path, key, len(samples))
        if table is not None:  # finished by the previous holder while we polled
            return table
        beat.start()
        start = time.time()
        table = check_samples(samples, workers)
        write_manifest(path, key, table)
        log.info("manifest %s: checked %d files in %.1f s, %d bad", path, len(samples),
                 time.time() - start, len(table.bad))
        return table
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()
        _remove(lock)


def _create_lock(lock: str) -> int:
    """O_CREAT | O_EXCL: exactly one process gets it. A folder that refuses the file is
    an error naming the key that moves the manifest elsewhere."""
    try:
        os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
        return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise
    except OSError as e:
        raise DataSetError(
            f"cannot write the manifest of checked files next to {lock[:-len('.lock')]} "
            f"({e.strerror or e}): set DataLoader.manifest_dir to a writable folder "
            "(or build it ahead with `python -m data.validate --write-manifest`)") from None


def _heartbeat(lock: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            os.utime(lock)
        except OSError:  # taken over or removed: the builder's write still lands atomically
            pass


def _lock_state(lock: str) -> Tuple[str, Optional[float]]:
    """(who holds the lock, seconds since its last heartbeat); age None when it is gone."""
    try:
        age = time.time() - os.stat(lock).st_mtime
        with open(lock) as f:
            holder = f.read().strip() or "another process"
    except FileNotFoundError:
        return "", None
    except OSError:
        holder = "another process"
    return holder, age


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _me() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


def _checksum(version: int, key: str, arrays: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(f"{version}\n{key}\n".encode())
    for name in _ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name} {a.dtype.str} {a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_manifest(path: str, key: str, table: FileTable) -> None:
    """Write aside, fsync, rename: a crash never leaves a half manifest under `path`."""
    bad = sorted(table.bad.items())
    arrays = {
        "sizes": np.asarray(table.sizes, dtype=np.int32),
        "nbytes": np.asarray(table.nbytes, dtype=np.int64),
        "bad_index": np.asarray([i for i, _ in bad], dtype=np.int64),
        "bad_reason": np.asarray([why for _, why in bad], dtype=str),
        "dup_index": np.asarray([i for i, _ in table.duplicate_of], dtype=np.int64),
        "dup_first": np.asarray([first for _, first in table.duplicate_of], dtype=np.int64),
    }
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, version=np.int64(FORMAT_VERSION), key=np.str_(key),
                     checksum=np.str_(_checksum(FORMAT_VERSION, key, arrays)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise DataSetError(f"cannot write the manifest {path} ({e.strerror or e}): set "
                           "DataLoader.manifest_dir to a writable folder") from None
    try:  # make the rename itself durable
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise


def read_manifest(path: str, key: str, count: int) -> Tuple[Optional[FileTable], str]:
    """(table, "") from a manifest that matches `key` and `count` and its checksum;
    (None, why not) otherwise ("missing" when there is no file)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            version = int(z["version"])
            if version != FORMAT_VERSION:
                return None, f"has format version {version}, this code reads {FORMAT_VERSION}"
            stored_key, checksum = str(z["key"]), str(z["checksum"])
            arrays = {name: z[name] for name in _ARRAYS}
    except FileNotFoundError:
        return None, "missing"
    except Exception as e:  # a torn or overwritten file: zip, npy or key errors
        return None, f"is unreadable ({type(e).__name__}: {str(e)[:120]})"
    if _checksum(version, stored_key, arrays) != checksum:
        return None, "is damaged (checksum mismatch)"
    if stored_key != key:
        return None, "was made for another list content or image root"
    sizes, nbytes = arrays["sizes"], arrays["nbytes"]
    if sizes.shape != (count, 2) or nbytes.shape != (count,):
        return None, f"holds {len(sizes)} files, the list {count}"
    bad = dict(zip(arrays["bad_index"].tolist(), arrays["bad_reason"].tolist()))
    dups = list(zip(arrays["dup_index"].tolist(), arrays["dup_first"].tolist()))
    return FileTable(sizes, nbytes, bad, dups), ""
