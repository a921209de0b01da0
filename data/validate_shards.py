"""Validate packed shards (data/pack.py) against their index: `python -m data.validate
--root DIR --list shards/train.index.npz` lands here.

Every sample is read by its offset: offset and size inside the shard, the tar headers
of its image and label members (name, size), the image header check (the loaders'
pre-flight, with the index's width and height) and the label; `--decode` decodes
every image. Each shard's sha256 is compared with the index too, which catches changed
bytes that no header check can place. Every bad member is named as
`<shard>.tar:<member>: reason`.
"""
from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import List, Optional

import numpy as np

from ppdpn.data.check import find_bad_labels
from ppdpn.data.lists import DataSetError
from ppdpn.data.shards import END_OF_ARCHIVE, ShardIndex, check_sample

_INDEX: Optional[ShardIndex] = None  # set before forking: workers inherit it


def check_shard(k: int, decode: bool = False) -> List[str]:
    """Problems of shard k as printable lines."""
    index, name = _INDEX, _INDEX.shards[k]
    members = np.nonzero(index.shard == k)[0]
    path = index.shard_path(k)
    if not os.path.isfile(path):
        return [f"{name}: missing ({len(members)} samples)"]
    size, problems = os.path.getsize(path), []
    if size != index.shard_bytes[k]:
        problems.append(f"{name}: {size} bytes, the index says {index.shard_bytes[k]}")
    with open(path, "rb") as f:
        fd = f.fileno()
        for i in members:
            why, data = check_sample(lambda o, n: os.pread(fd, n, o), index, i, size)
            if why is None and decode:
                why = decode_problem(data, *index.wh[i])
            if why:
                problems.append(f"{index.name(i)}: {why}")
        if size == index.shard_bytes[k]:
            if os.pread(fd, END_OF_ARCHIVE, size - END_OF_ARCHIVE) != bytes(END_OF_ARCHIVE):
                problems.append(f"{name}: no end-of-archive blocks")
            f.seek(0)
            if hashlib.file_digest(f, "sha256").hexdigest() != index.shard_sha256[k]:
                problems.append(f"{name}: sha256 differs from the index (its bytes changed "
                                "since it was packed)")
    return problems


def decode_problem(data, w: int, h: int) -> Optional[str]:
    """What data.validate --decode says about these image bytes, or None."""
    from data.validate import _decode_chunk
    bad = _decode_chunk([(io.BytesIO(bytes(data)), int(w), int(h))])
    return bad[0][1] if bad else None


def validate_shards(index_path: str, num_classes: Optional[int] = None, workers: int = 1,
                    decode: bool = False) -> int:
    """Print every problem; exit status 1 when there is one."""
    global _INDEX
    start = time.time()
    try:
        _INDEX = index = ShardIndex.load(index_path)
    except DataSetError as e:
        print(f"BAD {e}")
        return 1
    shards = range(len(index.shards))
    if workers > 1 and len(index.shards) > 1:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(check_shard, shards, [decode] * len(shards)))
    else:
        results = [check_shard(k, decode) for k in shards]
    problems = [line for r in results for line in r]
    problems += [f"{index.name(i)}: {why}" for i, why in find_bad_labels(index.label, num_classes)]
    for line in problems:
        print(f"BAD {line}")
    print(f"checked {len(index)} samples in {len(index.shards)} shards of {index_path} in "
          f"{time.time() - start:.1f} s{' with full decode' if decode else ''}: "
          f"{len(problems)} problems")
    return 1 if problems else 0
