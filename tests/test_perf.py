"""Performance paths on CPU: memory-efficient units, NHWC, benchmark mode, host syncs.

Recompute on the published structure (identical gradients and BN statistics for a DPN and
a DenseNet) is tested in tests/test_models.py::test_recompute_gives_the_same_gradients_and_bn_stats;
NCHW vs NHWC logits in tests/test_models.py::test_nhwc_computes_the_same_logits.
"""
import numpy as np
import paddle
import pytest

from conftest import last_json, run_train, tiny_overrides, twin_models
from ppdpn import dist
from ppdpn.benchmark import SyntheticLoader
from ppdpn.config import AMPConfig, GlobalConfig, OptimizerConfig
from ppdpn.data.augment import BatchAugment
from ppdpn.engine import Hooks, TrainState, build_amp, train_one_epoch
from ppdpn.models import create_model, layers
from ppdpn.models.densenet import DenseBlock
from ppdpn.optim import ScheduleLR, build_optimizer, build_schedule

TINY = ["DPNTiny", "DenseNetTiny"]


def _grads_after_one_step(model, x):
    model.train()
    (model(x) ** 2).mean().backward()
    return {p.name: p.grad.numpy() for p in model.parameters() if not p.stop_gradient}


@pytest.mark.parametrize("name", TINY)
def test_generic_recompute_fallback_equals_plain(name, monkeypatch):
    """Under AMP the units take Paddle's recompute instead of the explicit backward."""
    monkeypatch.setattr(layers, "_lean_path_applies", lambda unit, inputs: False)
    plain, recomputed = twin_models(name, recompute=True, seed=3)
    x = paddle.randn([4, 3, 64, 64])
    expected, got = _grads_after_one_step(plain, x), _grads_after_one_step(recomputed, x)
    for (key, a), b in zip(expected.items(), got.values()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=key)
    for (key, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values()):
        np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=key)  # stats moved once


@pytest.fixture
def float64():
    """Models and inputs in float64: NHWC and NCHW sum in different orders, and BN's
    backward amplifies fp32 rounding (stem.bn.weight grads differ by ~10% in fp32)."""
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype("float32")


@pytest.mark.parametrize("name", TINY)
def test_nhwc_with_recompute_matches_nchw_gradients(name, float64):
    plain, nhwc = twin_models(name, recompute=True, data_format="NHWC", seed=3)
    x = paddle.randn([4, 3, 64, 64], dtype="float64")
    expected = _grads_after_one_step(plain, x)
    got = _grads_after_one_step(nhwc, x.transpose([0, 2, 3, 1]))
    for (key, a), b in zip(expected.items(), got.values()):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12, err_msg=key)


def _allocator_peak_mb(model, x):
    """Peak bytes Paddle's host allocator holds during one training step."""
    model.train()
    (model(x) ** 2).mean().backward()  # first step: gradients exist from here on
    model.clear_gradients(set_to_zero=False)
    core = paddle.base.core
    base = core.host_memory_stat_current_value("Allocated", 0)
    core.host_memory_stat_reset_peak_value("Allocated", 0)
    (model(x) ** 2).mean().backward()
    return (core.host_memory_stat_peak_value("Allocated", 0) - base) / 2**20


def test_memory_efficient_units_store_less():
    """The lean units really drop the concat/BN/ReLU activations (a fast guard on a
    DenseNet121-shaped dense block and a small DPN; the published models' figures come
    from bench/train_step.py)."""
    paddle.seed(0)
    plain = DenseBlock(64, 6, 32, 4, transition=True)
    lean = DenseBlock(64, 6, 32, 4, transition=True, recompute=True)
    lean.set_state_dict(plain.state_dict())
    x = paddle.randn([4, 64, 28, 28])
    x.stop_gradient = False
    assert _allocator_peak_mb(lean, x) < 0.6 * _allocator_peak_mb(plain, x)  # measured 0.51
    plain, lean = twin_models("DPNTiny", recompute=True, seed=3)
    x = paddle.randn([8, 3, 96, 96])
    assert _allocator_peak_mb(lean, x) < 0.75 * _allocator_peak_mb(plain, x)  # measured 0.66


def test_benchmark_prints_one_json_line(tmp_path):
    proc = run_train(["-c", "configs/demo.yaml", "--benchmark", "--warmup", "1", "--steps", "2",
                      "-o", f"Global.output_dir={tmp_path}", "Arch.name=DenseNetTiny",
                      "DataLoader.batch_size=4", "DataLoader.image_size=32", "Arch.recompute=true"])
    last = proc.stdout.strip().splitlines()[-1]
    record = last_json(last)
    for key in ("model", "batch_per_device", "image_size", "world_size", "img_s", "step_ms",
                "data_wait_ms", "peak_mem_mb", "alloc_peak_mb"):
        assert key in record, key
    assert record["model"] == "DenseNetTiny" and record["batch_per_device"] == 4
    assert record["image_size"] == 32 and record["world_size"] == 1 and record["steps"] == 2
    assert record["img_s"] > 0 and record["step_ms"] > 0
    assert record["peak_mem_mb"] >= record["alloc_peak_mb"] > 0  # RSS covers the allocator


def test_nhwc_end_to_end_from_the_real_loader(tiny_data, tmp_path):
    """The loader's NHWC batches, CutMix on them and an NHWC model: benchmark on real data,
    then training and evaluation through train.py."""
    nhwc = {"DataLoader.output_layout": "NHWC", "Arch.data_format": "NHWC",
            "DataLoader.cutmix_alpha": 1.0, "Arch.recompute": True}
    proc = run_train(["-c", "configs/demo.yaml", "--benchmark", "--real-data", "--warmup", "1",
                      "--steps", "3", "-o"] + tiny_overrides(tiny_data, tmp_path / "bench", **nhwc))
    record = last_json(proc.stdout)
    assert record["data_format"] == "NHWC" and record["real_data"] and record["steps"] == 3
    proc = run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(
        tiny_data, tmp_path / "train", **nhwc, **{"Global.max_steps": 3}))
    assert last_json(proc.stdout)["images"] == 24  # every val image, through the NHWC model


def test_train_one_epoch_reads_the_device_once_per_print_window(monkeypatch):
    """No host-device sync per step: values are read at the print interval only (with
    several ranks the stop flags ride on that flush's all-reduce, so no step adds one)."""
    state, reads = TrainState(), []
    for method in ("item", "numpy", "tolist", "__float__", "__int__", "__bool__", "__index__",
                   "__array__"):
        original = getattr(paddle.Tensor, method)

        def counted(self, *args, _original=original, **kwargs):
            reads.append(state.global_step)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(paddle.Tensor, method, counted)
    outcome, windows = _train_12_steps(state, print_interval=6, stop_requested=lambda: False)
    monkeypatch.undo()
    assert outcome == "epoch_end" and state.global_step == 12 and windows == [6, 6]
    assert sorted(set(reads)) == [6, 12], f"host reads at steps {reads}"
    assert len(reads) <= 2 * 4, f"{len(reads)} host reads in 2 windows"


def test_a_single_process_stops_at_the_step_the_signal_arrived():
    """One rank: agreeing on a stop is free, so it happens at the next step, not at the
    next flush (the partial window is still reported)."""
    state = TrainState()
    outcome, windows = _train_12_steps(state, print_interval=6,
                                       stop_requested=lambda: state.global_step >= 3)
    assert outcome == "stopped" and state.global_step == 3 and windows == [3]


def _train_12_steps(state, print_interval, stop_requested):
    """train_one_epoch of DenseNetTiny on 12 synthetic batches: (outcome, window sizes)."""
    paddle.seed(0)
    model = create_model("DenseNetTiny", num_classes=4)
    loader = SyntheticLoader(4, 32, 4, steps=12, layout="NCHW", seed=0)
    opt_cfg = OptimizerConfig()
    lr = ScheduleLR(build_schedule(opt_cfg.lr, 1, 12, 4))
    optimizer = build_optimizer(model, opt_cfg, lr, multi_precision=False)
    windows = []
    hooks = Hooks(progress=lambda s, count, values: windows.append(count), stop_requested=stop_requested)
    outcome = train_one_epoch(model, loader, optimizer, lr, build_amp(AMPConfig(), use_gpu=False), state,
                              GlobalConfig(seed=0, print_interval=print_interval, max_skipped_steps=1),
                              BatchAugment(4, mixup_alpha=0.2, label_smoothing=0.1), hooks)
    return outcome, windows


def test_gpu_flags_are_the_cudnn_training_settings():
    assert dist.gpu_flags(amp=False, deterministic=False) == {
        "FLAGS_cudnn_exhaustive_search": True, "FLAGS_conv_workspace_size_limit": 4096}
    assert dist.gpu_flags(amp=True, deterministic=False)[
        "FLAGS_cudnn_batchnorm_spatial_persistent"] is True
