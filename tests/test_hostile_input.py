"""Hostile input: random and malformed configs, overrides, list files and checkpoint files.

The promise: a clear project error (ConfigError, DataSetError, CheckpointError,
UnsafePickleError) naming the input, never a bare KeyError/TypeError/UnicodeDecodeError/
RecursionError from deep inside, and never code run from a crafted file.
"""
import dataclasses
import hashlib
import json
import math
import os
import pickle
import struct
from typing import get_type_hints

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from ppdpn.checkpoint import CheckpointError, load_checkpoint
from ppdpn.config import Config, ConfigError, load_config
from ppdpn.data.lists import DataSetError, read_list
from ppdpn.models.weights import UnsafePickleError, _array_constructors, safe_load

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_CALLS = []


def _pwned(*args):
    """What a crafted pickle would like to run; refused unpicklers never reach it."""
    _CALLS.append(args)
    return {"model": {}}


# ---------------------------------------------------------------- config

def _schema():
    """{section: {field: annotation}} of the real config."""
    out = {}
    for name, cls in get_type_hints(Config).items():
        hints = get_type_hints(cls)
        out[name] = {g.name: hints[g.name] for g in dataclasses.fields(cls)}
    return out


SCHEMA = _schema()
KEYS = [f"{s}.{k}" for s, fields in SCHEMA.items() for k in fields] + ["Optimizer.lr.learning_rate",
                                                                      "Optimizer.lr.name"]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2 ** 70, 2 ** 70),
                     st.floats(), st.text(max_size=12),
                     st.sampled_from(["DPN68", "Cosine", "NCHW", "stop", "dali", "1e-4", "nan"]))
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4)
                       | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)
# Tokens that reach odd corners of the YAML parser and of the schema.
_YAML_TOKENS = ["Global:", "Optimizer:", "lr:", "DataLoader:", "  ", "\n", "- ", ": ", "[", "]",
                "{", "}", ",", "&a ", "*a", "<<: ", "!!binary aGk=", "!!set {a}", "? ", "~",
                "!!python/object/apply:os.system ['true']", "2001-13-45", "9" * 30, ".nan",
                "-.inf", "0x1F", "1e999", "'", '"', "\\x00", "\t", "seed", "epochs", "scale",
                "\ufeff", "%YAML 1.1\n---\n", "---\n", "...\n", "|\n  x", "#"]


def _section_mapping(section):
    fields = list(SCHEMA[section])
    return st.dictionaries(st.sampled_from(fields) | st.text(max_size=6), _values, max_size=5)


_documents = st.dictionaries(
    st.sampled_from(list(SCHEMA)) | st.text(max_size=6) | st.integers(),
    st.one_of(*[_section_mapping(s) for s in SCHEMA], _values), max_size=4)


def _assert_loaded_or_refused(load, *names):
    """`load()` gives a fully typed Config or raises ConfigError naming one of `names`."""
    try:
        cfg = load()
    except ConfigError as e:
        assert any(n in str(e) for n in names), str(e)
        return None
    assert isinstance(cfg, Config)
    for section, fields in SCHEMA.items():
        for key, tp in fields.items():
            value = getattr(getattr(cfg, section), key)
            if tp is float:
                assert isinstance(value, float) and math.isfinite(value), (section, key, value)
            elif tp is int:
                assert type(value) is int and abs(value) < 2 ** 63, (section, key, value)
            elif tp in (bool, str):
                assert type(value) is tp, (section, key, value)
    return cfg


@FAST
@given(doc=_documents)
def test_config_from_random_mappings(doc, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _assert_loaded_or_refused(lambda: load_config(path), "recipe.yaml")


@FAST
@given(text=st.lists(st.sampled_from(_YAML_TOKENS) | st.text(max_size=4), max_size=30).map("".join))
@example(text="Global: " + "[" * 3000 + "]" * 3000)
@example(text="Global: {seed: 2001-13-45}")
@example(text="Optimizer: {lr: {learning_rate: .nan}}")
@example(text="1: 2\n~: 3\n")
def test_config_from_random_yaml_text(text, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    _assert_loaded_or_refused(lambda: load_config(path), "recipe.yaml")


@FAST
@given(data=st.binary(max_size=200))
@example(data=b"Global:\n  seed: \xff\xfe\n")
def test_config_from_random_bytes(data, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(data)
    _assert_loaded_or_refused(lambda: load_config(path), "recipe.yaml")


_override_values = st.lists(st.sampled_from(_YAML_TOKENS) | st.text(max_size=5), max_size=6).map("".join)


@FAST
@given(overrides=st.lists(
    st.text(max_size=30)
    | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS) | st.text(max_size=12), _override_values),
    min_size=1, max_size=3))
@example(overrides=["Global.seed=" + "9" * 5000])
@example(overrides=["Global.seed=4294967296"])
@example(overrides=['Global.output_dir="a\\0b"'])
@example(overrides=["Optimizer.lr.learning_rate=" + "9" * 400])
def test_overrides_random(overrides):
    _assert_loaded_or_refused(lambda: load_config(None, overrides), "override", "-o")


def test_yaml_tags_never_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "recipe.yaml"
    path.write_text(f"Global: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="recipe.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="override"):
        load_config(None, [f"Global.seed=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


# ---------------------------------------------------------------- list files

_list_lines = st.lists(
    st.builds(lambda p, sep, label: f"{p}{sep}{label}",
              st.text(max_size=12), st.sampled_from([" ", "\t", "  ", "", "\x0b", "\u3000"]),
              st.integers(-10, 10 ** 6).map(str) | st.text(max_size=5))
    | st.text(max_size=20), max_size=12).map("\n".join)


def _assert_read_or_refused(path, root):
    try:
        samples = read_list(str(path), root)
    except DataSetError as e:
        assert str(path) in str(e), str(e)
        return
    assert len(samples) == len(samples.labels) >= 1
    assert samples.labels.dtype == np.int64
    assert all(isinstance(p, str) for p in samples.paths)


@FAST
@given(text=_list_lines)
def test_list_file_random_lines(text, tmp_path):
    path = tmp_path / "train_list.txt"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _assert_read_or_refused(path, str(tmp_path))


@FAST
@given(data=st.binary(max_size=300))
def test_list_file_random_bytes(data, tmp_path):
    path = tmp_path / "train_list.txt"
    path.write_bytes(data)
    _assert_read_or_refused(path, str(tmp_path))


@pytest.mark.parametrize("line", ["a.jpg 99999999999999999999999", "a.jpg -3", "a\x00b.jpg 1"])
def test_list_file_bad_label_or_path_is_a_dataset_error(tmp_path, line):
    path = tmp_path / "train_list.txt"
    path.write_text(line + "\n")
    with pytest.raises(DataSetError, match="train_list.txt:1"):
        read_list(str(path), str(tmp_path))


# ---------------------------------------------------------------- checkpoint files

def _write_with_record(path, data):
    """A step-numbered checkpoint with a matching integrity record, so loading gets
    past the checksum to the unpickler (what a crafted file would do)."""
    path.write_bytes(data)
    path.with_suffix(".json").write_text(json.dumps(
        {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def _assert_checkpoint_or_refused(path):
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        assert str(path) in str(e), str(e)
        return None
    assert isinstance(state["model"], dict)
    for key, value in state["model"].items():
        assert isinstance(key, str) and isinstance(value, np.ndarray)
    return state


@FAST
@given(data=st.binary(max_size=400), numbered=st.booleans())
@example(data=b"", numbered=True)
@example(data=b"\x80\x04\x8e" + (2 ** 60).to_bytes(8, "little"), numbered=False)
def test_checkpoint_random_bytes(data, numbered, tmp_path):
    path = tmp_path / ("ckpt-00000001.pdckpt" if numbered else "copy.pdckpt")
    _write_with_record(path, data)
    _assert_checkpoint_or_refused(path)
    assert not _CALLS


_arrays = st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "complex64"]).flatmap(
    lambda dt: st.lists(st.integers(0, 3), max_size=2).map(lambda shape: np.zeros(shape, dt)))
_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                    st.binary(max_size=8), _arrays)
_trees = st.recursive(_leaves, lambda c: st.lists(c, max_size=3) | st.tuples(c, c)
                      | st.dictionaries(st.text(max_size=5) | st.integers(), c, max_size=3)
                      | st.frozensets(st.integers(), max_size=3), max_leaves=10)


@FAST
@given(model=st.dictionaries(st.text(max_size=5) | st.integers(), _trees, max_size=4) | _trees,
       extra=st.dictionaries(st.text(max_size=8), _trees, max_size=3),
       protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_checkpoint_random_pickles(model, extra, protocol, tmp_path):
    """Pickles of plain data, good and bad: a checkpoint loads only with a 'model' dict of
    numeric arrays; frozensets/tuples need globals the safe unpickler refuses."""
    path = tmp_path / "ckpt-00000001.pdckpt"
    _write_with_record(path, pickle.dumps({**extra, "model": model}, protocol=protocol))
    _assert_checkpoint_or_refused(path)


class _Reduce:
    """Pickles as `func(*args)`: what a malicious file carries."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _raw_global_pickle(module, name, opcode):
    """A hand-made pickle calling module.name('x') through GLOBAL, STACK_GLOBAL or INST."""
    m, n = module.encode("utf-8", "surrogatepass"), name.encode("utf-8", "surrogatepass")
    if opcode == "GLOBAL":
        return b"c" + m + b"\n" + n + b"\n(X\x01\x00\x00\x00xtR."
    if opcode == "INST":
        return b"(X\x01\x00\x00\x00xi" + m + b"\n" + n + b"\n."
    return (b"\x80\x04\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n
            + b"\x93X\x01\x00\x00\x00x\x85R.")


_DANGEROUS = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
              ("builtins", "getattr"), ("builtins", "__import__"), ("subprocess", "Popen"),
              ("subprocess", "check_output"), ("pickle", "loads"), ("numpy", "load"),
              ("numpy.testing._private.utils", "runstring"), ("shutil", "rmtree"),
              ("io", "open"), ("builtins", "open"), ("test_hostile_input", "_pwned"),
              ("numpy.core.multiarray", "frombuffer"), ("collections", "namedtuple")]


@FAST
@given(target=st.sampled_from(_DANGEROUS)
       | st.tuples(st.text("abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=20),
                   st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20)),
       opcode=st.sampled_from(["GLOBAL", "STACK_GLOBAL", "INST"]),
       nested=st.booleans())
def test_pickles_naming_disallowed_globals_are_refused(target, opcode, nested, tmp_path):
    module, name = target
    assume(len(module.encode()) < 256 and len(name.encode()) < 256)
    assume((module, name) not in _array_constructors())
    data = _raw_global_pickle(module, name, opcode)
    if nested:  # the same call, pickled by pickle itself inside a checkpoint-shaped dict
        try:
            import importlib
            func = getattr(importlib.import_module(module), name)
            data = pickle.dumps({"model": {"w": np.zeros(2)}, "x": _Reduce(func, ("true",))})
        except Exception:  # noqa: BLE001 - random names, unpicklable functions: keep raw
            pass
    path = tmp_path / "weights.pdparams"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match="weights.pdparams") as e:
        safe_load(path)
    assert "refusing" in str(e.value)
    numbered = tmp_path / "ckpt-00000002.pdckpt"
    _write_with_record(numbered, data)
    with pytest.raises(CheckpointError, match="ckpt-00000002.pdckpt"):
        load_checkpoint(numbered)
    assert not _CALLS


@FAST
@given(data=st.binary(min_size=1, max_size=100))
@example(data=b"c_codecs\nencode\n(X\x01\x00\x00\x00aX\x05\x00\x00\x00bogustR.")
@example(data=b"\x8d\x00\x00\x00\x00\x00\x00\x00\x80")  # BINUNICODE8 length: OverflowError
def test_safe_load_random_bytes_names_the_file(data, tmp_path):
    path = tmp_path / "weights.pdparams"
    path.write_bytes(data)
    try:
        safe_load(path)
    except Exception as e:  # noqa: BLE001 - the property is about the message
        assert "weights.pdparams" in str(e), f"{type(e).__name__}: {e}"


def test_resume_refuses_a_checkpoint_that_does_not_fit_the_model(tmp_path):
    """Paddle's set_state_dict only warns on missing/misshapen entries; resume must not."""
    import paddle

    from ppdpn.config import load_config as load
    from ppdpn.engine import Amp, TrainState
    from ppdpn.resume import resume

    net = paddle.nn.Linear(3, 2)
    opt = paddle.optimizer.Momentum(0.1, parameters=net.parameters())
    cfg = load(None, [f"Global.output_dir={tmp_path}", "Arch.name=DenseNetTiny"])
    amp = Amp(False, "O1", "float16", None, True)
    base = {"optimizer": {}, "epoch": 0, "step_in_epoch": 0, "global_step": 4, "best_metric": -1.0,
            "global_batch": 8, "steps_per_epoch": 8}
    cases = {"shape": {"weight": np.zeros((2, 3), np.float32), "bias": np.zeros(2, np.float32)},
             "missing": {"weight": np.zeros((3, 2), np.float32)}}
    for name, model in cases.items():
        path = tmp_path / f"{name}.pdckpt"
        path.write_bytes(pickle.dumps({**base, "model": model}))
        cfg2 = load(None, [f"Global.output_dir={tmp_path}", "Arch.name=DenseNetTiny",
                           f"Global.checkpoints={path}"])
        with pytest.raises(CheckpointError, match=f"{name}.pdckpt.*{name}"):
            resume(cfg2, net, opt, amp, TrainState(), 8, log=lambda m: None)
    path = tmp_path / "counters.pdckpt"
    path.write_bytes(pickle.dumps({**base, "global_step": "4", "model": {
        "weight": np.zeros((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}))
    cfg2 = load(None, [f"Global.output_dir={tmp_path}", "Arch.name=DenseNetTiny",
                       f"Global.checkpoints={path}"])
    with pytest.raises(CheckpointError, match="counters.pdckpt.*global_step"):
        resume(cfg2, net, opt, amp, TrainState(), 8, log=lambda m: None)
    assert cfg is not None
