"""Pack a data set into tar shards plus an index, for file systems where opening
1.28 M small files per epoch is the bottleneck (NFS, Lustre, GPFS).

    python -m data.pack --root /data/ILSVRC2012 --list train_list.txt
                        [--out /data/ILSVRC2012/shards] [--name train]
                        [--shard-size 512MiB] [--order shuffled|list] [--seed 0]
                        [--drop-bad] [--threads 8] [--overwrite]

Writes <out>/<name>-000000.tar ... (ustar, webdataset member names `<key>.jpg` +
`<key>.cls`, the key being the sample's line in the list) and <out>/<name>.index.npz;
point DataLoader.train_list at the index. The samples are stored in a seeded random
order (--order shuffled, the default), so that a block of neighbouring samples, which
DataLoader.shuffle_block reads at once, is not one class of a class-sorted list;
--order list keeps the list's order.
Every image gets the loaders' header check while it is packed; a bad one stops the
pack (after naming every bad file) unless --drop-bad leaves it out. Every shard is
written aside, fsynced, read back and checked member by member, then renamed: rerun
the same command after an interruption and it keeps the verified shards and redoes
the rest. Exit status: 0 done, 1 bad data, 2 bad usage, 130 interrupted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make `ppdpn` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.shard_writer import (Prefetch, ShardWriter, entries_of, load_record,  # noqa: E402
                               quick_check, sample_bytes, verify_written)
from ppdpn.data.check import find_duplicates  # noqa: E402
from ppdpn.data.plan import hash_uniform  # noqa: E402
from ppdpn.data.lists import (DataSetError, Samples, read_list, resolve_split,  # noqa: E402
                              scan_image_folder)
from ppdpn.data.shards import (BLOCK, END_OF_ARCHIVE, INDEX_SUFFIX, KINDS,  # noqa: E402
                               ShardIndex, fsync_dir, member_key, write_atomic)

# ~140 GB of ImageNet train in ~260 shards: few enough fds, large enough that opening
# one is rare, small enough that a redone shard after an interruption costs seconds.
DEFAULT_SHARD_SIZE = "512MiB"
# Source files read ahead per thread: an NFS read is latency-bound, threads hide it.
READ_AHEAD_PER_THREAD = 4
_UNITS = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12,
          "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}
_ORDER_STREAM = 101  # hash stream of the stored order, apart from the plan's streams


def stored_order(n: int, order: str, seed: int) -> np.ndarray:
    """List positions in the order the shards store them: 0..n-1, or a permutation
    that is a pure function of (seed, n), so a resumed pack continues the same one."""
    if order == "list":
        return np.arange(n, dtype=np.int64)
    keys = hash_uniform(seed, _ORDER_STREAM, 0, np.arange(n), 1)[:, 0]
    return np.argsort(keys, kind="stable").astype(np.int64)


class UsageError(Exception):
    """Bad arguments or an out dir that cannot be used: exit status 2."""


def parse_size(text: str) -> int:
    """'512MiB' -> 536870912, '256MB' / '256M' -> 256000000, '4096' -> 4096."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not m:
        raise UsageError(f"--shard-size {text!r}: expected a size such as 512MiB or 256MB")
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if value < 4 * BLOCK:
        raise UsageError(f"--shard-size {text!r}: at least {4 * BLOCK} bytes")
    return value


def load_source(root: str, list_name: str) -> Tuple[Samples, str]:
    """The source samples and the sha256 of what defines them (the list file's bytes,
    or a folder tree's paths and labels): a resumed pack must pack the same list."""
    target = resolve_split(root, list_name)
    if not os.path.exists(target):
        raise UsageError(f"--list: {target} does not exist")
    if os.path.isdir(target):
        samples = scan_image_folder(target)[0]
        h = hashlib.sha256()
        for i in range(len(samples)):
            h.update(f"{os.path.relpath(samples.name(i), target)}\t{samples.labels[i]}\n".encode())
        return samples, h.hexdigest()
    samples = read_list(target, root)
    with open(target, "rb") as f:
        return samples, hashlib.file_digest(f, "sha256").hexdigest()


class Packer:
    """One pack run: keep the verified shards of an earlier run, write the rest."""

    def __init__(self, samples: Samples, source: str, source_sha256: str, out: str, name: str,
                 shard_size: int, drop_bad: bool, threads: int, order: str = "shuffled",
                 seed: int = 0):
        # positions below are in stored order; self.keys maps them to list lines
        self.keys = stored_order(len(samples), order, seed)
        self.samples = samples if order == "list" else samples.subset(self.keys)
        self.source, self.source_sha256 = source, source_sha256
        self.out, self.name, self.shard_size = out, name, shard_size
        self.drop_bad, self.threads = drop_bad, threads
        # What makes two packs of one list differ. Not --drop-bad: the shards before the
        # first bad file are the same either way (a shard holding a dropped file is
        # redone by a run without --drop-bad, which then stops at that file).
        self.params = {"name": name, "shard_size": shard_size, "order": order,
                       **({"seed": seed} if order == "shuffled" else {})}
        # Per-shard records (entries, sha256, sample range): what a resumed run keeps.
        self.work = os.path.join(out, f".{name}.pack")
        self.index_path = os.path.join(out, name + INDEX_SUFFIX)
        self.bad: List[Tuple[int, str, str]] = []  # (position, path, reason)
        self.packed_bytes = self.packed_files = 0

    def shard_file(self, k: int) -> str:
        return os.path.join(self.out, f"{self.name}-{k:06d}.tar")

    def record_file(self, k: int) -> str:
        return os.path.join(self.work, f"{k:06d}.npz")

    def run(self, overwrite: bool) -> int:
        start = time.time()
        if self.already_done(overwrite):
            print(f"nothing to do: {self.index_path} is complete for this source")
            return 0
        self.prepare_work_dir(overwrite)
        # A path listed twice would be packed twice and seen twice per epoch.
        self.duplicates = dict(find_duplicates([self.samples.name(i)
                                                for i in range(len(self.samples))]))
        kept = self.verified_records()
        count = self.pack_all(kept)
        if count is None:
            self.report_bad()
            print(f"stopped: {len(self.bad)} bad source files (fix them and rerun the same "
                  "command to continue, or rerun with --drop-bad to leave them out)")
            return 1
        index = self.build_index(count)
        problems = quick_check(index)
        if problems:
            for line in problems:
                print(f"BAD {line}")
            print(f"the shards do not match the index: {len(problems)} problems; not written")
            return 1
        self.remove_stale(count)
        index.save(self.index_path)
        self.report_bad()
        secs = time.time() - start
        print(f"{len(index)} samples in {count} shards, index {self.index_path}"
              + (f"; left out {len(index.dropped)} bad files" if len(index.dropped) else ""))
        print(f"packed {self.packed_files} files, {self.packed_bytes / 1e6:.1f} MB in {secs:.1f} s: "
              f"{self.packed_bytes / 1e6 / max(secs, 1e-9):.1f} MB/s, "
              f"{self.packed_files / max(secs, 1e-9):.0f} files/s")
        return 0

    def already_done(self, overwrite: bool) -> bool:
        if not os.path.exists(self.index_path):
            return False
        try:
            index = ShardIndex.load(self.index_path)
        except DataSetError:
            index = None
        same = (index is not None and index.source_sha256 == self.source_sha256
                and index.params == self.params)
        if same and len(index.dropped) and not self.drop_bad:
            print(f"{self.index_path} left out {len(index.dropped)} bad files; without "
                  "--drop-bad they stop the pack")
        elif same:
            problems = quick_check(index)
            if not problems:
                return True
            print(f"{self.index_path}: {problems[0]}; packing the damaged shards again")
        elif index is not None and not overwrite:
            raise UsageError(f"{self.index_path} holds a pack of another source or other "
                             "settings; pass --overwrite to replace it, or choose another --out")
        os.unlink(self.index_path)
        return False

    def prepare_work_dir(self, overwrite: bool) -> None:
        meta_path = os.path.join(self.work, "source.json")
        meta = {"source_sha256": self.source_sha256, "params": self.params}
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                if json.load(f) == meta:
                    return
            if not overwrite:
                raise UsageError(f"{self.out} holds an unfinished pack of another source or "
                                 "other settings; pass --overwrite to discard it, or choose "
                                 "another --out")
        if overwrite:
            for fn in os.listdir(self.out):
                if re.fullmatch(re.escape(self.name) + r"-\d{6}\.tar(\.partial)?", fn):
                    os.unlink(os.path.join(self.out, fn))
            if os.path.isdir(self.work):
                for fn in os.listdir(self.work):
                    os.unlink(os.path.join(self.work, fn))
        os.makedirs(self.work, exist_ok=True)
        write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))

    def verified_records(self) -> Dict[int, Tuple[dict, Dict]]:
        """{shard number: (meta, entries)} of earlier shards whose file still hashes to
        what was recorded; the others are redone."""
        kept = {}
        for fn in sorted(os.listdir(self.work)):
            if not re.fullmatch(r"\d{6}\.npz", fn):
                continue
            k = int(fn[:6])
            meta, entries = load_record(self.record_file(k))
            path = self.shard_file(k)
            why = None
            if not os.path.isfile(path):
                why = "missing"
            elif os.path.getsize(path) != meta["bytes"]:
                why = f"{os.path.getsize(path)} bytes, {meta['bytes']} were written"
            else:
                with open(path, "rb") as f:
                    if hashlib.file_digest(f, "sha256").hexdigest() != meta["sha256"]:
                        why = "its bytes changed since it was written (sha256)"
            if why:
                print(f"redo {os.path.basename(path)}: {why}")
                os.unlink(self.record_file(k))
            else:
                kept[k] = (meta, entries)
        if kept:
            print(f"kept {len(kept)} verified shards of an earlier run")
        return kept

    def pack_all(self, kept) -> Optional[int]:
        """Pack every sample; the number of shards, or None when bad files stop it."""
        n, k, pos, reader = len(self.samples), 0, 0, None
        # Not `with`: its exit waits for the readers, and a reader stuck in a slow
        # read would make Ctrl-C hang.
        pool = ThreadPoolExecutor(self.threads)
        try:
            while pos < n:
                meta = kept[k][0] if k in kept else None
                if meta and meta["first"] == pos and (self.drop_bad or not meta["dropped"]):
                    self.bad += [tuple(b) for b in meta["dropped"]]
                    pos = meta["end"]
                    k += 1
                    continue
                if reader is None or reader.pos != pos:
                    reader = Prefetch(pool, self.samples, pos,
                                      self.threads * READ_AHEAD_PER_THREAD, self.duplicates)
                end = self.pack_shard(k, reader)
                if end is None:  # a bad file without --drop-bad: name all, write no more
                    while reader.pos < n:
                        at = reader.pos
                        data, why = reader.get()
                        if data is None:
                            self.bad.append((at, self.samples.name(at), why))
                    return None
                pos, k = end, k + 1
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return k

    def pack_shard(self, k: int, reader: Prefetch) -> Optional[int]:
        """Write shard k from reader.pos on: aside, fsynced, read back, then renamed.
        Returns the position after its last sample, None at a bad file (no --drop-bad)."""
        path, first, n = self.shard_file(k), reader.pos, len(self.samples)
        t0 = time.time()
        writer = ShardWriter(path + ".partial")
        rows, dropped = [], []
        while reader.pos < n:
            at = reader.pos
            data, info = reader.get()
            if data is None:
                self.bad.append((at, self.samples.name(at), info))
                if not self.drop_bad:
                    writer.abandon()
                    return None
                dropped.append(self.bad[-1])
                continue
            if rows and writer.size + sample_bytes(data.size) + END_OF_ARCHIVE > self.shard_size:
                reader.unget((data, info))
                break
            key, label = member_key(self.keys[at]), int(self.samples.labels[at])
            offset = writer.add(key + KINDS[info[2]], data)
            writer.add(key + ".cls", str(label).encode())
            rows.append((self.keys[at], offset, data.size, label, info[:2], info[2]))
        size, sha = writer.finish()
        entries = entries_of(rows)
        why = verify_written(writer.path, sha, size, entries)
        if why:
            raise PackError(f"{writer.path}: reading it back failed: {why} (a disk or file "
                            "system fault; rerun to write it again)")
        os.replace(writer.path, path)
        fsync_dir(self.out)
        meta = {"first": first, "end": reader.pos, "bytes": size, "sha256": sha,
                "dropped": dropped}
        write_atomic(self.record_file(k), lambda f: np.savez(
            f, meta=np.array(json.dumps(meta)), **entries))
        self.packed_files += len(rows)
        self.packed_bytes += int(entries["size"].sum())
        secs = time.time() - t0
        print(f"{os.path.basename(path)}: {len(rows)} samples, {size / 1e6:.1f} MB, "
              f"verified ({secs:.1f} s, {size / 1e6 / max(secs, 1e-9):.0f} MB/s)", flush=True)
        return reader.pos

    def build_index(self, count: int) -> ShardIndex:
        parts, metas = [], []
        for k in range(count):
            meta, entries = load_record(self.record_file(k))
            parts.append(entries)
            metas.append(meta)
        cat = {a: np.concatenate([p[a] for p in parts]) for a in parts[0]}
        shard = np.concatenate([np.full(len(p["key"]), k, np.int32) for k, p in enumerate(parts)])
        dropped = [int(self.keys[b[0]]) for m in metas for b in m["dropped"]]
        if not len(shard):
            raise DataSetError(f"{self.source}: every file is bad")
        return ShardIndex(
            [os.path.basename(self.shard_file(k)) for k in range(count)],
            np.array([m["bytes"] for m in metas], np.int64), [m["sha256"] for m in metas],
            shard, cat["offset"], cat["size"], cat["label"], cat["wh"], cat["key"], cat["kind"],
            source=self.source, source_sha256=self.source_sha256, params=self.params,
            dropped=np.asarray(dropped, np.int64), folder=os.path.abspath(self.out))

    def remove_stale(self, count: int) -> None:
        """Shards numbered past this pack's last (a --overwrite of a larger pack)."""
        for fn in os.listdir(self.out):
            m = re.fullmatch(re.escape(self.name) + r"-(\d{6})\.tar(\.partial)?", fn)
            if m and (m.group(2) or int(m.group(1)) >= count):
                os.unlink(os.path.join(self.out, fn))

    def report_bad(self) -> None:
        for _, path, why in sorted(set(self.bad)):
            print(f"BAD {path}: {why}")


class PackError(Exception):
    """A shard read back differently from what was written: exit status 1."""


def default_name(list_name: str) -> str:
    """train_list.txt -> train, val_list.txt -> val, a folder `val` -> val."""
    stem = os.path.basename(os.path.normpath(list_name)).split(".")[0]
    return re.sub(r"_list$", "", stem) or "data"


def writable_dir(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".pack-probe-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--out: cannot write to {out} ({e.strerror or e})") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="image root (list paths are relative to it)")
    p.add_argument("--list", required=True, help="list file or class-folder tree, relative to --root")
    p.add_argument("--out", help="output folder (default: <root>/shards)")
    p.add_argument("--name", help="shard and index name (default: from --list, train_list.txt -> train)")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, help="target shard size (512MiB, 256MB, ...)")
    p.add_argument("--order", choices=["shuffled", "list"], default="shuffled",
                   help="sample order in the shards (default shuffled: see DataLoader.shuffle_block)")
    p.add_argument("--seed", type=int, default=0, help="of --order shuffled")
    p.add_argument("--drop-bad", action="store_true", help="leave bad source files out instead of stopping")
    p.add_argument("--threads", type=int, default=8, help="threads reading source files")
    p.add_argument("--overwrite", action="store_true", help="replace a pack of another source in --out")
    a = p.parse_args(argv)
    try:
        shard_size = parse_size(a.shard_size)
        name = a.name or default_name(a.list)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise UsageError(f"--name {name!r}: use letters, digits, '_' and '-' only")
        if a.threads < 1:
            raise UsageError(f"--threads {a.threads}: at least 1")
        if not os.path.isdir(a.root):
            raise UsageError(f"--root: {a.root} is not a directory")
        samples, sha = load_source(a.root, a.list)
        out = a.out or os.path.join(a.root, "shards")
        writable_dir(out)
        packer = Packer(samples, resolve_split(a.root, a.list), sha, out, name, shard_size,
                        a.drop_bad, a.threads, a.order, a.seed)
        return packer.run(a.overwrite)
    except UsageError as e:
        print(f"pack: {e}", file=sys.stderr)
        return 2
    except (DataSetError, PackError) as e:
        print(f"pack: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # leave at once: reader threads may sit in a slow read
        print("interrupted: rerun the same command to continue", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
