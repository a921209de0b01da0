"""PaddleClas recipes as they are: the layout translation (ppdpn/paddleclas.py).

The recipes are written here from PaddleClas's documented key names (README, "Coming from
PaddleClas"); no PaddleClas file is in the repository.
"""
import copy
import logging
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppdpn.config import ConfigError, load_config
from ppdpn.paddleclas import recipe_text
from tests.conftest import ROOT

DPNS = ["DPN68", "DPN92", "DPN98", "DPN107", "DPN131"]
DENSENETS = ["DenseNet121", "DenseNet161", "DenseNet169", "DenseNet201", "DenseNet264"]
NORMALIZE = {"NormalizeImage": {"scale": "1.0/255.0", "mean": [0.485, 0.456, 0.406],
                                "std": [0.229, 0.224, 0.225], "order": ""}}


def paddleclas_recipe(model="DPN68"):
    """PaddleClas's ImageNet recipe layout for one of the ten models."""
    dpn = model.startswith("DPN")
    train_ops = [{"DecodeImage": {"to_rgb": True, "channel_first": False}},
                 {"RandCropImage": {"size": 224}}, {"RandFlipImage": {"flip_code": 1}},
                 copy.deepcopy(NORMALIZE)]
    eval_ops = [{"DecodeImage": {"to_rgb": True, "channel_first": False}},
                {"ResizeImage": {"resize_short": 256}}, {"CropImage": {"size": 224}},
                copy.deepcopy(NORMALIZE)]
    train_ds = {"name": "ImageNetDataset", "image_root": "./dataset/ILSVRC2012/",
                "cls_label_path": "./dataset/ILSVRC2012/train_list.txt",
                "transform_ops": train_ops}
    if dpn:
        train_ds["batch_transform_ops"] = [{"MixupOperator": {"alpha": 0.2}}]
    sampler = {"name": "DistributedBatchSampler", "batch_size": 64, "drop_last": False}
    lr = ({"name": "Cosine", "learning_rate": 0.1} if dpn else
          {"name": "Piecewise", "learning_rate": 0.1, "decay_epochs": [30, 60, 90],
           "values": [0.1, 0.01, 0.001, 0.0001]})
    ce = {"weight": 1.0, "epsilon": 0.1} if dpn else {"weight": 1.0}
    return {
        "Global": {"checkpoints": None, "pretrained_model": None, "output_dir": "./output/",
                   "device": "gpu", "save_interval": 1, "eval_during_train": True,
                   "eval_interval": 1, "epochs": 200 if dpn else 120, "print_batch_step": 10,
                   "use_visualdl": False, "image_shape": [3, 224, 224],
                   "save_inference_dir": "./inference"},
        "AMP": {"use_amp": False, "use_fp16_test": False, "scale_loss": 128.0,
                "use_dynamic_loss_scaling": True, "use_promote": False, "level": "O1"},
        "Arch": {"name": model, "class_num": 1000},
        "Loss": {"Train": [{"CELoss": ce}], "Eval": [{"CELoss": {"weight": 1.0}}]},
        "Optimizer": {"name": "Momentum", "momentum": 0.9, "lr": lr,
                      "regularizer": {"name": "L2", "coeff": 0.0001}},
        "DataLoader": {
            "Train": {"dataset": train_ds, "sampler": {**sampler, "shuffle": True},
                      "loader": {"num_workers": 4, "use_shared_memory": True}},
            "Eval": {"dataset": {"name": "ImageNetDataset", "image_root": "./dataset/ILSVRC2012/",
                                 "cls_label_path": "./dataset/ILSVRC2012/val_list.txt",
                                 "transform_ops": eval_ops},
                     "sampler": {**sampler, "shuffle": False},
                     "loader": {"num_workers": 4, "use_shared_memory": True}}},
        "Infer": {"infer_imgs": "docs/images/whl_demo.jpg", "batch_size": 10,
                  "transforms": [{"DecodeImage": {"to_rgb": True, "channel_first": False}},
                                 {"ResizeImage": {"resize_short": 256}},
                                 {"CropImage": {"size": 224}}, copy.deepcopy(NORMALIZE),
                                 {"ToCHWImage": None}],
                  "PostProcess": {"name": "Topk", "topk": 5,
                                  "class_id_map_file": "ppcls/utils/imagenet1k_label_list.txt"}},
        "Metric": {"Train": None if dpn else [{"TopkAcc": {"topk": [1, 5]}}],
                   "Eval": [{"TopkAcc": {"topk": [1, 5]}}]},
    }


def write(tmp_path, doc, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


# Where the PaddleClas file and our recipe differ on purpose (paths, logging, workers;
# use_promote, which PaddleClas sets false and Paddle applies under AMP O2 only; the LR,
# which PaddleClas uses as written and ppdpn's recipes scale from 256, the same at 4 x 64).
ALIGN = ["Global.output_dir=./output/", "Global.device=gpu", "Global.print_interval=10",
         "Global.visualdl=false", "DataLoader.image_root=./dataset/ILSVRC2012/",
         "DataLoader.num_workers=4", "DataLoader.eval_batch_size=64", "AMP.use_promote=false",
         "Optimizer.lr.scale_with_batch=false"]


@pytest.mark.parametrize("model", DPNS + DENSENETS)
def test_paddleclas_recipe_resolves_to_our_recipe(model, tmp_path):
    theirs = load_config(write(tmp_path, paddleclas_recipe(model)))
    ours = load_config(str(ROOT / "configs" / f"{model.lower()}.yaml"), ALIGN)
    assert theirs == ours
    assert theirs.Optimizer.weight_decay == 1e-4 and theirs.DataLoader.batch_size == 64
    assert theirs.Loss.label_smoothing == (0.1 if model in DPNS else 0.0)
    assert theirs.DataLoader.mixup_alpha == (0.2 if model in DPNS else 0.0)
    assert theirs.DataLoader.train_list == "train_list.txt"


def test_overrides_written_paddleclas_way(tmp_path):
    path = write(tmp_path, paddleclas_recipe())
    cfg = load_config(path, ["DataLoader.Train.sampler.batch_size=32",
                             "DataLoader.Train.dataset.transform_ops.1.RandCropImage.size=192",
                             "DataLoader.Eval.dataset.transform_ops.2.CropImage.size=192",
                             "Infer.transforms.2.CropImage.size=192",
                             "Loss.Train.0.CELoss.epsilon=0.2", "Global.print_batch_step=7",
                             "Optimizer.regularizer.coeff=5e-5", "DataLoader.backend=fallback"])
    assert (cfg.DataLoader.batch_size, cfg.DataLoader.eval_batch_size) == (32, 64)
    assert cfg.DataLoader.image_size == 192 and cfg.Loss.label_smoothing == 0.2
    assert cfg.Global.print_interval == 7 and cfg.Optimizer.weight_decay == 5e-5
    assert cfg.DataLoader.backend == "fallback"  # ppdpn's own key on a PaddleClas file
    assert not cfg.Optimizer.lr.scale_with_batch  # PaddleClas's LR is used as written
    assert load_config(path, ["Optimizer.lr.scale_with_batch=true"]).Optimizer.lr.scale_with_batch
    with pytest.raises(ConfigError, match=r"transform_ops is a list of 4; '7'"):
        load_config(path, ["DataLoader.Train.dataset.transform_ops.7.RandCropImage.size=1"])
    # Train crop 192 with eval crop 224: ppdpn has one image_size, named in the error.
    with pytest.raises(ConfigError, match=r"one DataLoader.image_size .*192"):
        load_config(path, ["DataLoader.Train.dataset.transform_ops.1.RandCropImage.size=192"])


def test_more_fields_honoured(tmp_path):
    doc = paddleclas_recipe()
    doc["Global"].update(use_dali=False, update_freq=2, seed=7)
    doc["AMP"].update(use_amp=True, use_fp16_test=True, level="O2", use_promote=True)
    doc["Arch"].update(data_format="NHWC", pretrained="/w/DPN68_pretrained")
    doc["Optimizer"].update(one_dim_param_no_weight_decay=True, multi_precision=True)
    doc["Optimizer"]["lr"].update(warmup_epoch=5, warmup_start_lr=0.01, by_epoch=False)
    ds = doc["DataLoader"]["Train"]["dataset"]
    ds["transform_ops"][1]["RandCropImage"].update(scale=[0.2, 1.0], ratio=[0.5, 2.0])
    ds["transform_ops"][3]["NormalizeImage"]["output_fp16"] = True
    ds["batch_transform_ops"] = [{"OpSampler": {"MixupOperator": {"alpha": 0.8, "prob": 0.5},
                                                "CutmixOperator": {"alpha": 1.0, "prob": 0.5}}}]
    cfg = load_config(write(tmp_path, doc))
    assert cfg.DataLoader.backend == "fallback" and cfg.Global.accum_steps == 2
    assert cfg.Global.seed == 7 and cfg.Global.pretrained_model == "/w/DPN68_pretrained.pdparams"
    assert (cfg.AMP.use_amp, cfg.AMP.level, cfg.AMP.eval_fp32) == (True, "O2", False)
    assert cfg.Arch.data_format == cfg.DataLoader.output_layout == "NHWC"
    assert cfg.Optimizer.no_decay_bn_bias and cfg.Optimizer.lr.warmup_epoch == 5.0
    assert cfg.Optimizer.lr.warmup_start_lr == 0.01
    assert (cfg.DataLoader.scale, cfg.DataLoader.ratio) == ([0.2, 1.0], [0.5, 2.0])
    assert cfg.DataLoader.output_dtype == "float16"
    assert (cfg.DataLoader.mixup_alpha, cfg.DataLoader.cutmix_alpha) == (0.8, 1.0)


def _set(doc, dotted, value):
    node = doc
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


TRAIN = "DataLoader.Train.dataset"
REFUSED = [  # (key set, value, words the error must hold)
    (f"{TRAIN}.transform_ops.2", {"TimmAutoAugment": {"config_str": "rand-m9-mstd0.5"}},
     ["TimmAutoAugment", "RandCropImage"]),
    (f"{TRAIN}.transform_ops.3", {"RandomErasing": {"EPSILON": 0.25}}, ["RandomErasing"]),
    (f"{TRAIN}.batch_transform_ops", [{"FmixOperator": {"alpha": 1}}], ["FmixOperator"]),
    (f"{TRAIN}.batch_transform_ops", [{"MixupOperator": {"alpha": 0.2}},
                                      {"CutmixOperator": {"alpha": 1.0}}], ["OpSampler"]),
    ("Loss.Train", [{"DistillationCELoss": {"weight": 1.0}}], ["DistillationCELoss", "CELoss"]),
    ("Loss.Train.0.CELoss.weight", 0.5, ["Loss.Train[0].CELoss.weight"]),
    ("Optimizer.name", "AdamW", ["Optimizer.name", "Momentum"]),
    ("Optimizer.regularizer.name", "L1", ["regularizer.name", "L2"]),
    ("Optimizer.lr.name", "MultiStepDecay", ["Optimizer.lr.name", "Piecewise"]),
    ("Optimizer.lr.by_epoch", True, ["by_epoch"]),
    ("EMA", {"decay": 0.9999}, ["EMA", "no EMA"]),
    ("Arch.pretrained", True, ["Arch.pretrained", "Global.pretrained_model"]),
    ("Global.pretrained_model", "https://x/DPN68_pretrained.pdparams", ["downloads nothing"]),
    ("Global.eval_during_train", False, ["eval_during_train", "eval_interval"]),
    ("Global.to_static", True, ["to_static", "dygraph"]),
    ("Global.start_eval_epoch", 5, ["start_eval_epoch", "eval_interval"]),
    ("Global.device", "xpu", ["Global.device", "gpu or cpu"]),
    ("DataLoader.Train.sampler.drop_last", True, ["drop_last"]),
    ("DataLoader.Eval.sampler.shuffle", True, ["Eval.sampler.shuffle"]),
    ("DataLoader.Train.sampler.name", "PKSampler", ["PKSampler", "DistributedBatchSampler"]),
    ("DataLoader.Eval.dataset.transform_ops.1", {"ResizeImage": {"size": 256}}, ["resize_short"]),
    (f"{TRAIN}.transform_ops.3.NormalizeImage.mean", [0.5, 0.5, 0.5], ["mean", "0.485"]),
    (f"{TRAIN}.transform_ops.1.RandCropImage.interpolation", "bicubic", ["interpolation"]),
    ("DataLoader.Eval.dataset.image_root", "/elsewhere", ["one", "image_root"]),
    ("Metric.Eval", [{"TopkAcc": {"topk": [1, 10]}}], ["topk", "top-5"]),
    ("Global.no_such_key", 1, ["Global.no_such_key"]),
]


@pytest.mark.parametrize("key,value,words", REFUSED, ids=[r[0].split(".")[-1] + "-" + str(i)
                                                          for i, r in enumerate(REFUSED)])
def test_unsupported_fields_and_operators_are_named(key, value, words, tmp_path):
    doc = paddleclas_recipe()
    _set(doc, key, value)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, doc))
    message = str(err.value)
    assert "recipe.yaml" in message
    for word in words:
        assert word in message, message


def test_amp_o2_recipe_keeps_use_promote_and_master_weights(tmp_path):
    from ppdpn.engine import build_amp
    doc = paddleclas_recipe()
    doc["AMP"].update(use_amp=True, level="O2", use_promote=False)
    doc["Optimizer"]["multi_precision"] = True
    cfg = load_config(write(tmp_path, doc))
    assert (cfg.AMP.use_amp, cfg.AMP.level, cfg.AMP.use_promote) == (True, "O2", False)
    # The autocast context is built with it (AMP itself is a no-op on CPU, PLATFORM.md).
    assert build_amp(cfg.AMP, use_gpu=True, log=lambda m: None).use_promote is False
    assert load_config(str(ROOT / "configs" / "dpn68_amp.yaml")).AMP.use_promote is True
    doc["Optimizer"]["multi_precision"] = False
    with pytest.raises(ConfigError, match="multi_precision.*master weights"):
        load_config(write(tmp_path, doc))


def test_ignored_keys_are_listed_in_one_log_line(tmp_path, caplog):
    path = write(tmp_path, paddleclas_recipe(), "logged.yaml")
    with caplog.at_level(logging.WARNING, logger="ppdpn.paddleclas"):
        load_config(path)
        load_config(path)
    lines = [r.getMessage() for r in caplog.records if "ignored PaddleClas keys" in r.getMessage()]
    assert len(lines) == 1
    for key in ("Global.image_shape", "Global.save_inference_dir", "Infer.PostProcess",
                "DataLoader.Train.loader.use_shared_memory"):
        assert key in lines[0]


@pytest.mark.parametrize("model", ["DPN92", "DenseNet169"])
def test_printed_translation_loads_to_the_same_config(model, tmp_path):
    path = write(tmp_path, paddleclas_recipe(model))
    text = recipe_text(path)
    ours = tmp_path / "ours.yaml"
    ours.write_text(text)
    assert load_config(str(ours)) == load_config(path)
    body = "".join(line for line in text.splitlines(True) if not line.startswith("#"))
    assert "image_shape" not in body and "Train" not in body  # only our keys, only differences
    assert "# ignored (no meaning in ppdpn): Global.image_shape" in text
    expected = {"output_dir", "device", "visualdl"} | ({"epochs"} if model in DENSENETS else set())
    assert set(yaml.safe_load(text)["Global"]) == expected  # DPN's 200 epochs is the default
    # The command line prints the same text; a ppdpn recipe is refused with exit 2.
    out = subprocess.run([sys.executable, "-m", "ppdpn.config", "--from-paddleclas", path],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == text
    bad = subprocess.run([sys.executable, "-m", "ppdpn.config", "--from-paddleclas",
                          str(ROOT / "configs" / "dpn68.yaml")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "not a PaddleClas recipe" in bad.stderr


def test_launch_sh_reads_a_paddleclas_recipe_before_anything_starts(tmp_path):
    from tests.test_launch import launcher_argv, run_launch
    no_gpu = "/usr/bin:/bin"  # no nvidia-smi: a CPU node
    doc = paddleclas_recipe("DenseNet121")
    doc["Global"]["output_dir"] = str(tmp_path / "out")
    path = write(tmp_path, doc)
    argv = launcher_argv(run_launch([path, "-o", "DataLoader.Train.sampler.batch_size=32"], no_gpu,
                                    env={"DRY_RUN": "1"}))
    assert argv[argv.index("--log_dir") + 1] == f"{tmp_path / 'out'}/log"
    assert argv[-4:] == ["-c", path, "-o", "DataLoader.Train.sampler.batch_size=32"]
    doc["DataLoader"]["Train"]["dataset"]["transform_ops"].insert(
        2, {"RandAugment": {"num_layers": 2}})
    proc = run_launch([write(tmp_path, doc, "augmented.yaml")], no_gpu)
    assert proc.returncode == 2 and "RandAugment" in proc.stderr
    assert not (tmp_path / "out").exists(), "the launcher ran"


def _paths(node, prefix=()):
    """Every key path into a recipe dict, list items included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


_RECIPE_PATHS = list(_paths(paddleclas_recipe("DPN68")))
_values = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 20, 10 ** 20) | st.floats()
                       | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(_RECIPE_PATHS), value=_values)
def test_any_value_anywhere_is_a_config_error_or_a_config(path, value, tmp_path):
    """Hostile input: a PaddleClas recipe with one value replaced by anything."""
    doc = paddleclas_recipe("DPN68")
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        load_config(write(tmp_path, doc))
    except ConfigError as e:
        assert "recipe.yaml" in str(e)
