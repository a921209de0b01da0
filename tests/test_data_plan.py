"""The epoch plan: shard padding, exactly-once, crop windows, eval geometry (no images)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ppdpn.data.plan import (ShardPlan, epoch_order, eval_geometry, eval_windows,
                             hash_uniform, random_resized_crop, train_windows)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), world=st.integers(1, 5), batch=st.integers(1, 17),
       epoch=st.integers(0, 3))
def test_every_sample_once_per_epoch_over_all_ranks(n, world, batch, epoch):
    plans = [ShardPlan(n, world, r, batch, shuffle=True, seed=7) for r in range(world)]
    seen = []
    for p in plans:
        idx, valid = p.batches(epoch)
        assert idx.shape == (p.steps_per_epoch, batch) == valid.shape
        seen += idx[valid == 1].tolist()
    assert sorted(seen) == list(range(n))
    assert len({p.steps_per_epoch for p in plans}) == 1
    assert plans[0].steps_per_epoch == math.ceil(math.ceil(n / world) / batch)


def test_shuffle_changes_with_epoch_and_is_reproducible():
    a, b = epoch_order(1000, 3, 0, True), epoch_order(1000, 3, 1, True)
    assert sorted(a) == list(range(1000)) and not np.array_equal(a, b)
    assert np.array_equal(a, epoch_order(1000, 3, 0, True))
    assert not np.array_equal(a, epoch_order(1000, 4, 0, True))
    assert np.array_equal(epoch_order(5, 3, 0, False), np.arange(5))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), block=st.integers(2, 20), window=st.integers(1, 5),
       world=st.integers(1, 4), epoch=st.integers(0, 3))
def test_block_shuffle_is_still_every_sample_once_and_keeps_blocks_together(
        n, block, window, world, epoch):
    plans = [ShardPlan(n, world, r, 8, shuffle=True, seed=7, block=block, window=window)
             for r in range(world)]
    seen = []
    for p in plans:
        idx, valid = p.batches(epoch)
        seen += idx[valid == 1].tolist()
    assert sorted(seen) == list(range(n))
    order = epoch_order(n, 7, epoch, True, block, window)
    # at most `window` blocks are ever begun and not finished: what a reader keeps
    blocks = order // block
    first = {b: k for k, b in reversed(list(enumerate(blocks.tolist())))}
    last = {b: k for k, b in enumerate(blocks.tolist())}
    for k in range(n):
        assert sum(first[b] <= k <= last[b] for b in first) <= window


def test_block_shuffle_mixes_blocks_and_changes_with_epoch():
    n, block, window = 6400, 64, 8
    a, b = (epoch_order(n, 3, e, True, block, window) for e in (0, 1))
    assert not np.array_equal(a, b) and np.array_equal(a, epoch_order(n, 3, 0, True, block, window))
    assert not np.array_equal(a, epoch_order(n, 3, 0, True))  # not the global shuffle
    # a batch of 64 draws on several of its window's blocks, not on one
    per_batch = [len(set((a[s:s + 64] // block).tolist())) for s in range(0, n, 64)]
    assert min(per_batch) >= 4 and max(per_batch) <= window
    # the block order is random: consecutive windows are not neighbouring blocks
    firsts = [int(a[s:s + block * window].min()) // (block * window) for s in range(0, n, block * window)]
    assert firsts != sorted(firsts)


def test_hash_uniform_is_uniform_and_keyed():
    u = hash_uniform(1, 2, 3, np.arange(20000), 4)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - math.sqrt(1 / 12)) < 0.01
    # the same sample gets the same numbers whatever else is in the request
    assert np.array_equal(hash_uniform(1, 2, 3, np.array([5]), 4), u[5:6])


def test_crop_windows_follow_random_resized_crop():
    n = 20000
    rng = np.random.default_rng(0)
    w, h = rng.integers(40, 600, n), rng.integers(40, 600, n)
    sizes = np.stack([w, h], 1)
    win, flips = train_windows(0, 0, np.arange(n), sizes, (0.08, 1.0), (3 / 4, 4 / 3))
    x, y, cw, ch = win.T
    assert (x >= 0).all() and (y >= 0).all() and (cw > 0).all() and (ch > 0).all()
    assert (x + cw <= w).all() and (y + ch <= h).all()
    area = cw * ch / (w * h)
    assert np.quantile(area, 0.01) < 0.1 and area.max() <= 1.0
    ratio = cw / ch
    sampled = area < 0.9  # exclude the rare centre-crop fallback
    assert (ratio[sampled] > 0.70).mean() > 0.99 and (ratio[sampled] < 1.42).mean() > 0.99
    assert abs(flips.mean() - 0.5) < 0.02
    again, _ = train_windows(0, 0, np.arange(n), sizes, (0.08, 1.0), (3 / 4, 4 / 3))
    assert np.array_equal(win, again)


def test_crop_fallback_is_centre_crop_with_clamped_ratio():
    # A very wide image where no sampled window can fit at a 3/4..4/3 ratio and area 1.
    u = np.full((1, 23), 0.999)
    (x, y, w, h), = random_resized_crop(np.array([400]), np.array([100]), u, (1.0, 1.0), (0.75, 4 / 3))
    assert (w, h) == (133, 100) and x == (400 - 133) // 2 and y == 0


@pytest.mark.parametrize("w,h", [(500, 375), (375, 500), (256, 256), (1000, 300), (257, 999)])
def test_eval_geometry_matches_paddleclas(w, h):
    rw, rh, x0, y0 = eval_geometry(w, h, 256, 224)
    percent = 256 / min(w, h)
    assert (rw, rh) == (int(round(w * percent)), int(round(h * percent)))
    assert min(rw, rh) == 256 and (x0, y0) == ((rw - 224) // 2, (rh - 224) // 2)
    (sx, sy, sw, sh), = eval_windows(np.array([0]), np.array([[w, h]]), 256, 224)
    assert sw == pytest.approx(224 * w / rw) and sx == pytest.approx(x0 * w / rw)
