"""The typed config: defaults, overrides, and errors that name key, value and file."""
import pytest

from ppdpn.config import ConfigError, load_config, parse_override, save_resolved

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.Arch.name.lower() in recipe.stem.lower() or recipe.stem.startswith("demo")


def test_dpn_and_densenet_recipes_match_paddleclas():
    dpn = load_config(ROOT / "configs/dpn92.yaml")
    assert (dpn.Global.epochs, dpn.Optimizer.lr.name, dpn.Optimizer.lr.learning_rate) == (200, "Cosine", 0.1)
    assert (dpn.Loss.label_smoothing, dpn.DataLoader.mixup_alpha, dpn.Optimizer.weight_decay) == (0.1, 0.2, 1e-4)
    assert dpn.DataLoader.batch_size * 4 == dpn.Optimizer.lr.base_batch_size == 256
    dn = load_config(ROOT / "configs/densenet121.yaml")
    assert (dn.Global.epochs, dn.Optimizer.lr.name, dn.Optimizer.lr.decay_epochs) == (120, "Piecewise", [30, 60, 90])
    assert (dn.Loss.label_smoothing, dn.DataLoader.mixup_alpha) == (0.0, 0.0)


def test_overrides_are_yaml_and_typed(tmp_path):
    cfg = load_config(ROOT / "configs/dpn68.yaml",
                      ["Global.epochs=3", "Optimizer.lr.learning_rate=1e-3", "Global.checkpoints=null",
                       "Optimizer.lr.decay_epochs=[1, 2, 3]", "AMP.use_amp=true"])
    assert cfg.Global.epochs == 3 and cfg.Optimizer.lr.learning_rate == pytest.approx(1e-3)
    assert cfg.Optimizer.lr.decay_epochs == [1, 2, 3] and cfg.AMP.use_amp is True
    with pytest.raises(Exception):
        cfg.Global.epochs = 5  # frozen: derived values never go back into the config


@pytest.mark.parametrize("override, words", [
    ("Global.epochs=-1", ["Global.epochs", "-1", ">= 1"]),
    ("DataLoader.batch_size=0", ["DataLoader.batch_size", "0"]),
    ("Arch.name=ResNet50", ["Arch.name", "ResNet50", "DPN68"]),
    ("Global.epoch=3", ["Global.epoch", "unknown", "epochs"]),
    ("Global.epochs=three", ["Global.epochs", "three", "int"]),
    ("Global.epochs=true", ["Global.epochs", "int"]),
    ("AMP.level=O3", ["AMP.level", "O3", "O1"]),
    ("Nope.key=1", ["Nope", "unknown"]),
    ("DataLoader.scale=[0.5, 0.1]", ["DataLoader.scale", "low <= high"]),
    ("DataLoader.resize_short=100", ["DataLoader.resize_short", "image_size"]),
    ("Arch.data_format=NHWC", ["Arch.data_format", "DataLoader.output_layout"]),
])
def test_bad_values_name_key_value_and_file(override, words):
    recipe = ROOT / "configs/dpn68.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(recipe, [override])
    msg = str(e.value)
    assert "dpn68.yaml" in msg
    for w in words:
        assert w in msg


def test_piecewise_needs_one_value_more_than_boundaries():
    with pytest.raises(ConfigError, match=r"densenet121\.yaml.*Optimizer\.lr\.values"):
        load_config(ROOT / "configs/densenet121.yaml", ["Optimizer.lr.values=[0.1]"])


def test_errors_in_the_file_itself_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("Global:\n  epochs: 10\n  save_intervall: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*Global\.save_intervall"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(tmp_path / "list.yaml")


def test_override_parser_never_evaluates():
    parts, value = parse_override("Global.output_dir=__import__('os').system('true')")
    assert value == "__import__('os').system('true')"
    for bad in ("noequals", "=3", "a..b=1", "a.b c=1"):
        with pytest.raises(ConfigError):
            parse_override(bad)


def test_resolved_config_is_saved_with_code_version(tmp_path):
    import yaml
    cfg = load_config(ROOT / "configs/dpn68.yaml", ["Global.epochs=7"])
    path = save_resolved(cfg, tmp_path, {"global_batch": 128})
    doc = yaml.safe_load(path.read_text())
    assert doc["Global"]["epochs"] == 7 and doc["_run"]["global_batch"] == 128
    assert doc["_run"]["code_version"]


def test_amp_recipes_are_their_base_plus_amp():
    """configs/*_amp.yaml hold only what differs from their base; resolved, they are the
    base recipe with AMP O2 and fp16 batches."""
    for amp_recipe in sorted((ROOT / "configs").glob("*_amp.yaml")):
        base = load_config(amp_recipe.with_name(amp_recipe.name.replace("_amp", ""))).to_dict()
        amp = load_config(amp_recipe).to_dict()
        assert (amp["AMP"]["use_amp"], amp["AMP"]["level"], amp["DataLoader"]["output_dtype"]) == (
            True, "O2", "float16")
        for section in ("AMP", "DataLoader", "Global"):
            base.pop(section), amp.pop(section)
        assert amp == base, amp_recipe.name


def test_base_recipes_merge_and_are_checked_strictly(tmp_path):
    (tmp_path / "parent.yaml").write_text("Global:\n  epochs: 10\n  seed: 3\nArch:\n  name: DPN92\n")
    (tmp_path / "child.yaml").write_text("_base_: parent.yaml\nGlobal:\n  epochs: 4\n")
    cfg = load_config(tmp_path / "child.yaml", ["Global.print_interval=7"])
    assert (cfg.Global.epochs, cfg.Global.seed, cfg.Arch.name, cfg.Global.print_interval) == (
        4, 3, "DPN92", 7)
    # A bad key in the base names the base's file; one in the child names the child.
    (tmp_path / "parent.yaml").write_text("Global:\n  epoch: 10\n")
    with pytest.raises(ConfigError, match=r"parent\.yaml: unknown key Global\.epoch"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "parent.yaml").write_text("Global:\n  epochs: 10\n")
    (tmp_path / "child.yaml").write_text("_base_: parent.yaml\nGlobal:\n  epochs: -4\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: Global\.epochs=-4 must be >= 1"):
        load_config(tmp_path / "child.yaml")


@pytest.mark.parametrize("files, words", [
    ({"a.yaml": "_base_: b.yaml\n", "b.yaml": "_base_: a.yaml\n"}, ["cycle", "a.yaml -> b.yaml -> a.yaml"]),
    ({"a.yaml": "_base_: a.yaml\n"}, ["cycle", "a.yaml -> a.yaml"]),
    ({"a.yaml": "_base_: gone.yaml\n"}, ["a.yaml", "gone.yaml", "not found"]),
    ({"a.yaml": "_base_: [b.yaml]\n"}, ["a.yaml", "_base_", "path of a recipe"]),
])
def test_bad_base_recipes_are_refused_by_name(tmp_path, files, words):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "a.yaml")
    for w in words:
        assert w in str(e.value)
