"""Recipe files: one YAML mapping of sections, or a chain of them through `_base_`.

A recipe may name another as its base, `_base_: dpn68.yaml` (a path relative to the
recipe), as PaddleClas and mmcv users write it, and then holds only what differs from
it. config.load_config reads recipes through load_with_bases.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ppdpn.config import _YAML_ERRORS, Config, ConfigError, _build, _show

BASE_KEY = "_base_"


def _read_recipe(p: Path, src: str) -> dict:
    """One YAML file as a mapping of sections, or a ConfigError naming it."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {src}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{src}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{src}: cannot read: {e.strerror or e}") from None
    except _YAML_ERRORS as e:
        raise ConfigError(f"{src}: not valid YAML: {e.__class__.__name__}: {str(e)[:300]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: top level must be a mapping of sections")
    return raw


def _merge(base: dict, child: dict) -> dict:
    """`child` over `base`: sections merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in child.items():
        if value is None and isinstance(out.get(key), dict):
            continue  # an empty section (`AMP:`) keeps the base's
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def load_with_bases(path: str, chain: tuple = ()) -> dict:
    """The recipe at `path` with its chain of `_base_` recipes merged underneath. Each
    base is checked on its own first, so an error in it names the base's file."""
    p = Path(path)
    raw = _read_recipe(p, str(path))
    if BASE_KEY not in raw:
        return raw
    base = raw.pop(BASE_KEY)
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: {BASE_KEY}={_show(base)} must be the path of a recipe, "
                          f"relative to {p.name}")
    base_path = p.parent / base
    here = (*chain, p.resolve())
    if base_path.resolve() in here:
        names = " -> ".join(str(c.name) for c in (*here, base_path.resolve()))
        raise ConfigError(f"{path}: {BASE_KEY} makes a cycle: {names}")
    if not base_path.is_file():
        raise ConfigError(f"{path}: {BASE_KEY} {base!r} not found (looked for {base_path})")
    base_raw = load_with_bases(str(base_path), here)
    _build(Config, base_raw, "", str(base_path))
    return _merge(base_raw, raw)
