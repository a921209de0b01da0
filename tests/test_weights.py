"""Weight files: PaddleClas's layout, own files and checkpoints, refusals, safe unpickling."""
import logging
import os
import pickle

import numpy as np
import paddle
import pytest

from conftest import read_tsv
from ppdpn.models import create_model
from ppdpn.models.weights import (UnsafePickleError, WeightsError, load_pretrained, safe_load,
                                  to_paddleclas_state_dict)

MODELS = ["DPN68", "DenseNet121"]


def random_paddleclas_file(name, path, num_classes=1000, seed=0):
    """Write a file shaped like <name>_pretrained.pdparams, with random values."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in read_tsv(name):
        if key == "out.weight":
            shape = (shape[0], num_classes)
        elif key == "out.bias":
            shape = (num_classes,)
        low = 0.5 if key.endswith("_variance") else -0.1
        state[key] = rng.uniform(low, low + 1.0, shape).astype("float32")
    paddle.save(state, str(path))
    return state


def logits(model, seed=3):
    model.eval()
    x = paddle.to_tensor(np.random.default_rng(seed).standard_normal((2, 3, 64, 64)),
                         dtype="float32")
    with paddle.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("name", MODELS)
def test_paddleclas_file_loads_and_sets_every_tensor(name, tmp_path):
    file_state = random_paddleclas_file(name, tmp_path / "w.pdparams")
    model = create_model(name)
    before = logits(model)
    assert load_pretrained(model, tmp_path / "w.pdparams", name=name) == []
    after = logits(model)
    assert not np.allclose(before, after)
    # Independent of the key translation: set the tensors by position (the layouts list
    # them in the same order, checked in test_models.py) and compare.
    direct = create_model(name)
    for tensor, value in zip(direct.state_dict().values(), file_state.values()):
        tensor.set_value(value)
    np.testing.assert_array_equal(after, logits(direct))


def test_own_state_dict_checkpoint_and_paddleclas_export_round_trip(tmp_path):
    source = create_model("DPN68")
    expected = logits(source)
    paddle.save(source.state_dict(), str(tmp_path / "own.pdparams"))
    checkpoint = {"model": {k: v.numpy() for k, v in source.state_dict().items()},
                  "epoch": np.int64(7), "optimizer": {"lr": 0.1}}
    paddle.save(checkpoint, str(tmp_path / "checkpoint.pdparams"))
    paddle.save(to_paddleclas_state_dict(source, "DPN68"), str(tmp_path / "pc.pdparams"))
    for file in ("own.pdparams", "checkpoint.pdparams", "pc.pdparams"):
        np.testing.assert_array_equal(
            logits(create_model("DPN68", pretrained=str(tmp_path / file))), expected)


def test_protocol_2_files_as_older_paddle_wrote_them_load(tmp_path):
    source = create_model("DenseNetTiny", num_classes=10)
    paddle.save(source.state_dict(), str(tmp_path / "old.pdparams"), protocol=2)
    loaded = create_model("DenseNetTiny", num_classes=10, pretrained=str(tmp_path / "old.pdparams"))
    np.testing.assert_array_equal(logits(loaded), logits(source))


def _refusal(tmp_path, edit):
    state = random_paddleclas_file("DPN68", tmp_path / "w.pdparams")
    edit(state)
    paddle.save(state, str(tmp_path / "bad.pdparams"))
    with pytest.raises(ValueError) as error:
        create_model("DPN68", pretrained=str(tmp_path / "bad.pdparams"))
    return str(error.value)


def test_missing_key_is_refused_with_its_name_and_shape(tmp_path):
    message = _refusal(tmp_path, lambda s: s.pop("dpn3.c1x1_a_func._conv.weight"))
    assert "missing keys: dpn3.c1x1_a_func._conv.weight [128, 128, 1, 1]" in message


def test_wrong_shape_is_refused_with_its_name(tmp_path):
    def shrink(state):
        state["dpn5.c3x3_b_func._batch_norm._mean"] = np.zeros(7, "float32")

    message = _refusal(tmp_path, shrink)
    assert "dpn5.c3x3_b_func._batch_norm._mean: file [7] vs model [256]" in message


def test_unexpected_key_is_refused(tmp_path):
    message = _refusal(tmp_path, lambda s: s.update({"extra.weight": np.ones(3, "float32")}))
    assert "unexpected keys: extra.weight [3]" in message


def test_other_family_is_refused_with_a_bounded_listing(tmp_path):
    paddle.save(create_model("DenseNetTiny", num_classes=10).state_dict(), str(tmp_path / "d.pdparams"))
    with pytest.raises(ValueError) as error:
        create_model("DPNTiny", num_classes=10, pretrained=str(tmp_path / "d.pdparams"))
    message = str(error.value)
    assert "missing keys: blocks.0.proj.bn.weight [16]," in message
    assert "unexpected keys: blocks.0.layers.0.reduce.bn.weight [16]," in message
    assert "wrong shapes: stem.conv.weight: file [16, 3, 7, 7] vs model [16, 3, 3, 3]" in message
    assert message.count(" more") == 2 and len(message) < 4000


def test_other_class_count_loads_all_but_the_classifier(tmp_path, caplog):
    file_state = random_paddleclas_file("DPN68", tmp_path / "w.pdparams")
    model = create_model("DPN68", num_classes=10)
    fresh_fc = model.fc.weight.numpy()
    with caplog.at_level(logging.WARNING, logger="ppdpn.models.weights"):
        skipped = load_pretrained(model, tmp_path / "w.pdparams", name="DPN68")
    assert skipped == ["fc.weight", "fc.bias"]
    assert "classifier not loaded" in caplog.text and "[832, 1000] vs model [832, 10]" in caplog.text
    np.testing.assert_array_equal(model.fc.weight.numpy(), fresh_fc)
    np.testing.assert_array_equal(model.head_bn._mean.numpy(), file_state["conv5_x_x_bn._mean"])
    np.testing.assert_array_equal(model.blocks[21].expand.conv.weight.numpy(),
                                  file_state["dpn22.c1x1_c_func._conv.weight"])


class _Planted:
    """Unpickling this runs a shell command: what a hostile weight file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_planted_pickle_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pdparams"
    with path.open("wb") as f:
        pickle.dump({"stem.conv.weight": np.zeros(3), "x": _Planted(marker)}, f, protocol=protocol)
    with pytest.raises(UnsafePickleError, match=rf"refusing posix\.system in {path}"):
        safe_load(path)
    with pytest.raises(UnsafePickleError):
        create_model("DPNTiny", num_classes=10, pretrained=str(path))
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["ours", "paddleclas"])
def test_weights_of_another_architecture_are_named_as_such(layout, tmp_path):
    """DPNTiny weights into DenseNetTiny: the error says which registered model the file
    holds (in either key layout) instead of only listing hundreds of keys."""
    paddle.seed(0)
    dpn = create_model("DPNTiny", num_classes=4)
    state = ({k: v.numpy() for k, v in dpn.state_dict().items()} if layout == "ours"
             else to_paddleclas_state_dict(dpn, "DPNTiny"))
    path = tmp_path / "dpntiny.pdparams"
    paddle.save(state, str(path))
    with pytest.raises(WeightsError) as err:
        create_model("DenseNetTiny", num_classes=10, pretrained=str(path))
    message = str(err.value)
    assert "the file holds a DPNTiny" in message and "Arch.name=DPNTiny" in message
    assert message.index("the file holds") < message.index("missing keys")
