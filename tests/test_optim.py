"""LR schedules: values at known steps, and the batch scaling rule."""
import math

import pytest

from ppdpn.config import LRConfig
from ppdpn.optim import ScheduleLR, build_schedule


def test_cosine_with_warmup_at_known_steps():
    cfg = LRConfig(name="Cosine", learning_rate=0.1, warmup_epoch=2, warmup_start_lr=0.0,
                   eta_min=0.001, base_batch_size=256)
    s = build_schedule(cfg, epochs=10, steps_per_epoch=100, global_batch=256)
    assert s.warmup_steps == 200 and s.total_steps == 1000
    assert s.lr_at(0) == 0.0
    assert s.lr_at(100) == pytest.approx(0.05)          # half-way through warmup
    assert s.lr_at(200) == pytest.approx(0.1)           # end of warmup: the peak
    assert s.lr_at(600) == pytest.approx(0.001 + 0.099 * 0.5)  # cosine mid-point
    assert s.lr_at(999) == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 799 / 800)))
    assert s.lr_at(1000) == pytest.approx(0.001)        # the floor


def test_cosine_without_warmup_matches_paddleclas_recipe():
    s = build_schedule(LRConfig(), epochs=200, steps_per_epoch=5005, global_batch=256)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(1001000) == pytest.approx(0.0)
    assert s.lr_at(500500) == pytest.approx(0.05)


def test_piecewise_densenet_recipe():
    cfg = LRConfig(name="Piecewise", decay_epochs=[30, 60, 90], values=[0.1, 0.01, 0.001, 0.0001])
    s = build_schedule(cfg, epochs=120, steps_per_epoch=10, global_batch=256)
    assert [s.lr_at(t) for t in (0, 299, 300, 599, 600, 900, 1199)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001])


def test_linear_scaling_by_global_batch():
    s = build_schedule(LRConfig(learning_rate=0.1), epochs=1, steps_per_epoch=10, global_batch=64)
    assert s.base_lr == pytest.approx(0.025)
    s = build_schedule(LRConfig(learning_rate=0.1, scale_with_batch=False), 1, 10, 64)
    assert s.base_lr == pytest.approx(0.1)


def test_paddle_scheduler_follows_the_schedule_from_any_start_step():
    s = build_schedule(LRConfig(warmup_steps=5), epochs=2, steps_per_epoch=10, global_batch=256)
    sched = ScheduleLR(s)
    seen = []
    for _ in range(20):
        seen.append(sched.get_lr())
        sched.step()
    assert seen == pytest.approx([s.lr_at(t) for t in range(20)])
    resumed = ScheduleLR(s)
    resumed.last_epoch = 12 - 1
    resumed.step()
    assert resumed.get_lr() == pytest.approx(s.lr_at(12))
