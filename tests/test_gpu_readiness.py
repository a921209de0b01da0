"""GPU-only decisions, checked on the CPU wherever the behaviour reproduces here.

AMP O2 on a GPU casts the parameters to fp16 (paddle.amp.decorate -> amp_initialize) and
the optimizer's first step creates fp32 master copies (Optimizer._create_master_weight).
On the CPU build decorate is a no-op, so `_o2_model` calls those two steps itself: the
state it builds is what a GPU run holds after its first step, without a GPU kernel.
"""
import json

import numpy as np
import paddle
import pytest
from paddle.amp.auto_cast import amp_initialize

from conftest import last_json, run_train, tiny_overrides
from ppdpn import dist
from ppdpn.checkpoint import fp32_weights, load_optimizer_state, optimizer_state, set_weights
from ppdpn.config import ConfigError, DataConfig, load_config
from ppdpn.data import build_loader
from ppdpn.data.augment import box_mask, mix_batch
from ppdpn.engine import Amp
from ppdpn.models import create_model
from ppdpn.models.weights import to_paddleclas_state_dict


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_flags_never_ask_for_exhaustive_search_in_a_deterministic_run(amp, deterministic):
    """Paddle's cuDNN conv refuses exhaustive search with deterministic algorithms."""
    flags = dist.gpu_flags(amp=amp, deterministic=deterministic)
    assert not (flags.get("FLAGS_cudnn_exhaustive_search") and flags.get("FLAGS_cudnn_deterministic"))
    assert flags.get("FLAGS_cudnn_deterministic", False) is deterministic
    assert flags["FLAGS_cudnn_exhaustive_search"] is (not deterministic)
    persistent = flags.get("FLAGS_cudnn_batchnorm_spatial_persistent", False)
    assert persistent is (amp and not deterministic)


def _o2_model(seed=0):
    """DenseNetTiny + Momentum as they stand after an O2 GPU run's first step: conv and
    linear weights fp16, BatchNorm fp32, fp32 master copies that fp16 cannot hold."""
    paddle.seed(seed)
    model = create_model("DenseNetTiny", num_classes=4)
    opt = paddle.optimizer.Momentum(0.1, parameters=model.parameters(), multi_precision=True)
    exact = {p.name: p.numpy() + np.float32(1e-4) for p in model.parameters()}
    amp_initialize(models=[model], dtype="float16", excluded_layers=None)
    for p in model.parameters():
        if p.dtype == paddle.float16:
            opt._create_master_weight(p)
            opt._master_weights[p.name].set_value(paddle.to_tensor(exact[p.name]))
    return model, opt, exact


def test_o2_checkpoint_weights_are_the_fp32_master_copies():
    model, opt, exact = _o2_model()
    low = [n for n, p in model.named_parameters() if p.dtype == paddle.float16]
    assert len(low) > 10  # the model really holds fp16 parameters
    weights = fp32_weights(model, opt)
    assert {a.dtype for a in weights.values()} == {np.dtype("float32")}
    names = {n: p.name for n, p in model.named_parameters()}
    for key in low:  # exact master values, not the fp16 parameter cast up
        np.testing.assert_array_equal(weights[key], exact[names[key]])
        assert not np.array_equal(weights[key], model.state_dict()[key].astype("float32").numpy())
    pc = to_paddleclas_state_dict(model, "DenseNetTiny", weights)  # best_model.pdparams
    assert {np.asarray(v).dtype for v in pc.values()} == {np.dtype("float32")}


def test_resume_crosses_amp_levels_in_both_directions():
    """An O2 checkpoint loads into an fp32 model, and an fp32 checkpoint into an O2 model,
    whose master copies then equal the checkpoint's fp32 weights exactly."""
    o2, o2_opt, exact = _o2_model()
    saved, saved_opt = fp32_weights(o2, o2_opt), optimizer_state(o2_opt, o2)
    assert "master_weights" in saved_opt
    paddle.seed(1)
    plain = create_model("DenseNetTiny", num_classes=4)
    plain_opt = paddle.optimizer.Momentum(0.1, parameters=plain.parameters())
    set_weights(plain, saved)
    load_optimizer_state(plain_opt, plain, saved_opt, weights=saved)
    assert not plain_opt._master_weights  # fp32 parameters need none
    for key, value in plain.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), saved[key])
    # and back: the fp32 run's checkpoint into a fresh O2 model
    back, back_opt, _ = _o2_model(seed=2)
    set_weights(back, fp32_weights(plain, plain_opt))
    load_optimizer_state(back_opt, back, optimizer_state(plain_opt, plain), weights=saved)
    for name, p in back.named_parameters():
        if p.dtype == paddle.float16:
            np.testing.assert_array_equal(back_opt._master_weights[p.name].numpy(), saved[name])
            np.testing.assert_array_equal(p.numpy(), saved[name].astype(np.float16))


def test_fp32_eval_of_an_o2_model_runs_an_fp32_copy_of_the_master_weights():
    model, opt, _ = _o2_model()
    amp = Amp(True, "O2", "float16", None, eval_fp32=True)
    twin = amp.eval_model(model, opt)
    assert twin is not model and {p.dtype for p in twin.parameters()} == {paddle.float32}
    reference = create_model("DenseNetTiny", num_classes=4)
    set_weights(reference, fp32_weights(model, opt))
    x = paddle.randn([2, 3, 32, 32])
    twin.eval(), reference.eval()
    np.testing.assert_array_equal(twin(x).numpy(), reference(x).numpy())
    assert {p.dtype for p in model.parameters()} == {paddle.float16, paddle.float32}  # untouched
    # eval under autocast (eval_fp32 false), or a model in fp32 anyway: the model itself
    assert Amp(True, "O2", "float16", None, eval_fp32=False).eval_model(model, opt) is model
    assert amp.eval_model(reference) is reference


def test_config_refuses_fp16_inputs_without_amp_and_master_grad_outside_o2():
    with pytest.raises(ConfigError, match="DataLoader.output_dtype=float16.*AMP.use_amp"):
        load_config("configs/demo.yaml", ["DataLoader.output_dtype=float16"])
    with pytest.raises(ConfigError, match="AMP.master_grad=true needs AMP.level=O2"):
        load_config("configs/demo.yaml", ["AMP.use_amp=true", "AMP.master_grad=true"])
    cfg = load_config("configs/dpn68_amp.yaml")
    assert cfg.AMP.level == "O2" and cfg.AMP.master_grad is False  # as PaddleClas and NVIDIA


def test_an_amp_o2_recipe_trains_evaluates_and_evaluates_only_on_a_cpu(tiny_data, tmp_path):
    """On a CPU, AMP is off: fp32 weights, fp32 batches (output_dtype float16 would feed
    fp16 images to conv2d, which has no CPU fp16 kernel), said once."""
    amp = {"AMP.use_amp": True, "AMP.level": "O2", "DataLoader.output_dtype": "float16"}
    out = tmp_path / "run"
    proc = run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, out, **amp))
    assert last_json(proc.stdout)["images"] == 24
    log = (out / "train.log").read_text()
    assert log.count("AMP requested but the device is CPU") == 1
    for extra in ({}, {"AMP.eval_fp32": False}):
        proc = run_train(["-c", "configs/demo.yaml", "--eval-only", "-o"] + tiny_overrides(
            tiny_data, tmp_path / "eval", **amp, **extra,
            **{"Global.pretrained_model": out / "checkpoints" / "best.pdckpt"}))
        assert last_json(proc.stdout)["images"] == 24


def test_cutmix_box_is_made_on_the_device():
    box = box_mask(2, 5, 1, 3, 6, 4, "float32").numpy()
    expect = np.zeros((6, 4), np.float32)
    expect[2:5, 1:3] = 1
    np.testing.assert_array_equal(box, expect)


def test_a_training_step_copies_nothing_from_the_host(tiny_data, monkeypatch):
    """Labels, the valid mask and the CutMix box reach the step without paddle.to_tensor
    (a blocking host-to-device copy per step on a GPU): the loaders hand them out as
    tensors (DALI outputs them; the fallback's DataLoader thread copies them)."""
    calls = []
    original = paddle.to_tensor

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for backend in ("dali", "fallback"):
        cfg = DataConfig(backend=backend, image_root=str(tiny_data), batch_size=8,
                         num_workers=1, image_size=16, resize_short=18)
        loader = build_loader(cfg, "train", dist.DistContext(), seed=0)
        monkeypatch.setattr(paddle, "to_tensor", counted)
        for step, (images, labels, valid) in enumerate(loader.epoch(0)):
            rng = np.random.default_rng(step)
            mix_batch(images, labels, 4, 0.0, 1.0, 0.1, rng)  # CutMix every step
        monkeypatch.undo()
        assert step + 1 == loader.steps_per_epoch == 8
        assert labels.dtype == paddle.int64 and valid.dtype == paddle.float32
        assert not calls, f"{backend}: {len(calls)} paddle.to_tensor calls in an epoch"


@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory):
    from ppdpn import export
    paddle.seed(0)
    model = create_model("DenseNetTiny", num_classes=4)
    model.eval()
    out = tmp_path_factory.mktemp("export")
    export.export_model(model, out, name="DenseNetTiny")
    return out


def test_trt_refuses_rather_than_running_without_tensorrt(exported_tiny, tmp_path, capsys):
    """Paddle Inference 3.x ignores enable_tensorrt_engine on a PIR (.json) model; --trt
    goes through paddle.tensorrt, and says so when that is not there (this CPU build)."""
    from ppdpn import predict, trt
    with pytest.raises(trt.TrtError, match="paddle.tensorrt"):
        trt.tensorrt_module()
    with pytest.raises(trt.TrtError, match="paddle.tensorrt"):
        trt.convert_model(exported_tiny, tmp_path, trt.TrtOptions(crop_size=32))
    image = tmp_path / "x.png"
    import cv2
    cv2.imwrite(str(image), np.full((40, 40, 3), 90, np.uint8))
    assert predict.main([str(image), "--model", str(exported_tiny), "--trt", "--device", "cpu"]) == 2
    assert "--trt needs a GPU" in capsys.readouterr().err


def test_trt_engine_count_reads_the_pir_program(exported_tiny, tmp_path):
    """The count --trt reports comes from the converted program's ops; an export that
    TensorRT has not touched has none (so convert_model would refuse it)."""
    from ppdpn import trt
    with paddle.pir_utils.IrGuard():
        exe = paddle.static.Executor(paddle.CPUPlace())
        program, _, _ = paddle.static.io.load_inference_model(
            str(exported_tiny / "inference"), executor=exe)
    names = [op.name() for op in program.global_block().ops]
    assert "pd_op.conv2d" in names and trt.count_engines(program) == 0
    # the cache key follows the model's bytes: a re-export is never served stale
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("inference.json", "inference.pdiparams"):
        (copy / f).write_bytes((exported_tiny / f).read_bytes())
    opts = trt.TrtOptions(crop_size=32)
    assert trt.converted_prefix(copy, tmp_path, opts) == trt.converted_prefix(exported_tiny, tmp_path, opts)
    (copy / "inference.pdiparams").write_bytes(b"\0" + (copy / "inference.pdiparams").read_bytes())
    assert trt.converted_prefix(copy, tmp_path, opts) != trt.converted_prefix(exported_tiny, tmp_path, opts)


def test_dali_pipelines_are_built_once_and_serve_every_epoch(tiny_data):
    """A pipeline is reused by the next epoch when its epoch ran to the end, with the same
    batches as freshly built ones; an epoch left early rebuilds."""
    cfg = DataConfig(backend="dali", image_root=str(tiny_data), batch_size=8, num_workers=1,
                     image_size=16, resize_short=18)
    loader = build_loader(cfg, "train", dist.DistContext(), seed=0)
    fresh = build_loader(cfg, "train", dist.DistContext(), seed=0)
    built = []
    original = loader.build_pipeline
    loader.build_pipeline = lambda source: built.append(1) or original(source)
    for epoch in range(3):
        for (a, la, va), (b, lb, vb) in zip(loader.epoch(epoch), fresh.epoch(epoch)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
            np.testing.assert_array_equal(la.numpy(), lb.numpy())
        fresh._parked.clear()  # the reference builds anew every epoch
    assert len(built) == 2  # two pipelines taking turns, built in epoch 0 only
    next(iter(loader.epoch(3)))  # left after one batch: not parked
    list(loader.epoch(4))
    assert len(built) == 4


def test_gpu_check_on_a_cpu_runs_what_it_can_and_marks_the_rest_not_run(tmp_path):
    """`python -m ppdpn.gpu_check` on this CPU machine: the CPU-runnable checks pass, every
    GPU-only one says "not run: no GPU" (never "passed"), exit 0, one JSON line last."""
    import subprocess
    import sys
    from conftest import ROOT
    proc = subprocess.run([sys.executable, "-m", "ppdpn.gpu_check", "--keep", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    status = {c["name"]: c["status"] for c in record["checks"]}
    gpu_only = ["env.cudnn_flags", "dali.mixed_handoff", "train.loss_scale", "bench.o2_nhwc",
                "bench.bf16_o1", "bench.o2_recompute", "export.trt_fp32", "export.trt_fp16"]
    assert all(status[name] == "not run: no GPU" for name in gpu_only), status
    ran = ["env.run_check", "train.run", "train.ranks_agree", "train.sigusr1_resume",
           "train.resume_amp_off", "train.eval_only", "bench.fp32_nchw", "bench.real_data",
           "export.paddle"]
    assert all(status[name] == "passed" for name in ran), status
    assert status["env.address"] == "passed" or status["env.address"].startswith("not run")
    assert record["gpus"] == 0 and record["failed"] == []


def test_gpu_check_counts_a_crashing_check_as_failed(tmp_path):
    from ppdpn import gpu_check

    def check_broken(node):
        raise RuntimeError("boom")
    node = gpu_check.Node(0, tmp_path, "DPNTiny")
    (result,) = gpu_check.run_checks([check_broken], node)
    assert result.name == "broken" and result.status == "failed" and "boom" in result.detail
