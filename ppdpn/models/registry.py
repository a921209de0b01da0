"""The model registry: a dict of names to small constructor functions."""
from typing import Callable, Dict, List

_MODELS: Dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Register `fn` under its own name; a duplicate name is an error."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice (known: {', '.join(list_models())})")
    _MODELS[name] = fn
    return fn


def list_models() -> List[str]:
    return sorted(_MODELS)


def get_model_fn(name: str) -> Callable:
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name]
