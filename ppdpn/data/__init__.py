"""ImageNet input: DALI and fallback loaders, batch augmentation, data set layouts.

    loader = build_loader(cfg.DataLoader, "train", ctx, seed)
    for epoch in ...:
        for images, labels, valid in loader.epoch(epoch, start_step):
            images, targets = augment(images, labels, rng)   # train only (augment.BatchAugment)

Every rank yields `loader.steps_per_epoch` full batches per epoch (the same number on
every rank); `valid` is 0 for padding and for files that failed mid-run, so metrics
count each sample of the split exactly once. Heavy imports (paddle, DALI) happen inside
the functions so the data tools and spawned checkers stay light.
"""
from __future__ import annotations

from typing import Optional


def build_loader(data_cfg, split: str, ctx, seed: int, num_classes: Optional[int] = None):
    """Loader of `split` ("train" | "val") for this rank, after the pre-flight check.

    `data_cfg.backend` picks DALI or the fallback; ctx (DistContext) gives the shard
    and the device. With `num_classes`, labels outside [0, num_classes) count as bad.
    The files are checked once per data set and the results kept in a manifest that
    every rank and every restart reads (ppdpn/data/manifest.py).
    """
    from ppdpn.data.base import preflight
    from ppdpn.data.lists import load_split
    from ppdpn.data.manifest import load_or_build

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    list_name = data_cfg.train_list if split == "train" else data_cfg.val_list
    samples = load_split(data_cfg.image_root, list_name)
    from ppdpn.data.shards import ShardSamples, shard_preflight
    if isinstance(samples, ShardSamples):  # sizes and byte counts from the index
        samples, sizes = shard_preflight(samples, data_cfg.drop_bad_files, num_classes)
        file_bytes = samples.index.size
    else:
        table = load_or_build(samples, data_cfg.manifest_dir, data_cfg.num_workers)
        samples, sizes, file_bytes = preflight(samples, table, data_cfg.drop_bad_files,
                                               num_classes)
    if data_cfg.backend == "dali":
        from ppdpn.data.dali import DaliLoader as cls
    else:
        from ppdpn.data.fallback import FallbackLoader as cls
    return cls(data_cfg, split, ctx, seed, samples, sizes, file_bytes)

