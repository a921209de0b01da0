"""Loading weights safely: PaddleClas's published .pdparams and this project's own files.

A .pdparams file is a pickle, and unpickling runs whatever constructor the file names.
`safe_load` only lets through the few globals that rebuild numpy arrays and dicts, so a
weight file from the internet cannot run code. PaddleClas names its layers differently
from this project (`dpn3.c1x1_a_func._conv.weight` vs `blocks.2.reduce.conv.weight`);
`paddleclas_key` translates one name, deterministically, in both directions.
"""
import logging
import pickle
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import paddle

from ppdpn.models.densenet import DenseNet
from ppdpn.models.dpn import DPN

logger = logging.getLogger(__name__)

CLASSIFIER_KEYS = ("fc.weight", "fc.bias")
# paddle.save adds this bookkeeping entry when it saves a dict of tensors.
PADDLE_SAVE_META_KEY = "StructuredToParameterName@@"


class WeightsError(ValueError):
    """A weight file that does not fit the model; the message names the file and keys."""


class UnsafePickleError(pickle.UnpicklingError):
    """A weight file names a global that is not needed to rebuild arrays and dicts."""


def _array_constructors() -> Dict[Tuple[str, str], Any]:
    import codecs
    try:  # numpy >= 2 keeps the implementation in numpy._core
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    reconstruct, scalar = multiarray._reconstruct, multiarray.scalar
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("collections", "OrderedDict"): OrderedDict,
               # protocol 2 (older Paddle) stores raw bytes through _codecs.encode
               ("_codecs", "encode"): codecs.encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and 2 names
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar  # numpy scalars in checkpoint dicts
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        # latin1, as paddle.load: protocol-2 files from Python 2 hold array bytes as str
        super().__init__(file, encoding="latin1")
        self.path = path
        self.allowed = _array_constructors()

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise UnsafePickleError(
                f"refusing {module}.{name} in {self.path}: not an array/dict constructor")
        return self.allowed[(module, name)]


def safe_load(path) -> Any:
    """Unpickle a .pdparams / checkpoint file, allowing only array and dict constructors."""
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, str(path)).load()
    except UnsafePickleError:
        raise
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001
        # Truncated or garbage bytes fail in many ways (EOFError, UnpicklingError,
        # OverflowError on a huge length field, numpy's errors on bad array records...),
        # and pickle's own message never names the file.
        raise WeightsError(f"{path} is not a readable weights/checkpoint file "
                           f"({type(e).__name__}: {str(e)[:120]})") from e


# Our name prefix -> PaddleClas's, per family. Unit names inside a prefix (bn, conv) are
# renamed by _UNIT_NAMES afterwards; head and classifier are plain renames.
_DPN_UNITS = {"proj": "c1x1_w_func", "reduce": "c1x1_a_func", "grouped": "c3x3_b_func",
              "expand": "c1x1_c_func"}
_DPN_RULES: List[Tuple[str, Callable]] = [
    (r"stem\.", lambda m: "conv1_x_1_func."),
    (r"blocks\.(\d+)\.(\w+)\.", lambda m: f"dpn{int(m[1]) + 1}.{_DPN_UNITS[m[2]]}."),
    (r"head_bn\.", lambda m: "conv5_x_x_bn."),
    (r"fc\.", lambda m: "out."),
]
_DENSENET_RULES: List[Tuple[str, Callable]] = [
    (r"stem\.", lambda m: "conv1_func."),
    (r"blocks\.(\d+)\.layers\.(\d+)\.(reduce|grow)\.",
     lambda m: "db_conv_{0}.conv{0}_{1}.bn_ac_func{2}.".format(
         int(m[1]) + 2, int(m[2]) + 1, 1 if m[3] == "reduce" else 2)),
    (r"blocks\.(\d+)\.transition\.", lambda m: f"tr_conv{int(m[1]) + 2}_blk.conv_ac_func."),
    (r"head_bn\.", lambda m: "batch_norm."),
    (r"fc\.", lambda m: "out."),
]
_UNIT_NAMES = {"bn.": "_batch_norm.", "conv.": "_conv."}


def _rules_for(model: paddle.nn.Layer, name: Optional[str] = None) -> List[Tuple[str, Callable]]:
    if isinstance(model, DPN):
        return _DPN_RULES
    if isinstance(model, DenseNet):
        return _DENSENET_RULES
    raise TypeError(f"no PaddleClas layout known for {name or type(model).__name__}")


def paddleclas_key(key: str, rules: List[Tuple[str, Callable]]) -> str:
    """Translate one of our state_dict keys into PaddleClas's name for it."""
    for pattern, replace in rules:
        m = re.match(pattern, key)
        if m:
            rest = key[m.end():]
            for ours, theirs in _UNIT_NAMES.items():
                if rest.startswith(ours):
                    rest = theirs + rest[len(ours):]
            return replace(m) + rest
    raise KeyError(f"no PaddleClas name for {key!r}")


def paddleclas_key_map(model: paddle.nn.Layer, name: Optional[str] = None) -> Dict[str, str]:
    """Our key -> PaddleClas key for every entry of model.state_dict(), in order."""
    rules = _rules_for(model, name)
    return {key: paddleclas_key(key, rules) for key in model.state_dict()}


def to_paddleclas_state_dict(model: paddle.nn.Layer, name: Optional[str] = None,
                             weights: Optional[Dict[str, np.ndarray]] = None) -> Dict:
    """The model's weights under PaddleClas's keys, ready for paddle.save (numpy values).
    `weights` (our keys -> arrays) replaces the model's own tensors: under AMP O2 the
    caller passes the fp32 master copies (checkpoint.fp32_weights)."""
    key_map = paddleclas_key_map(model, name)  # the layout follows from the model's class
    if weights is None:
        weights = {k: v.numpy() for k, v in model.state_dict().items()}
    return OrderedDict((key_map[k], weights[k]) for k in model.state_dict())


def _weights_in(obj: Any, path) -> Dict[str, np.ndarray]:
    """The key -> array dict inside a loaded file (a state_dict or a checkpoint)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # checkpoint: {"model": state_dict, "optimizer": ..., ...}
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    weights = {k: np.asarray(v) for k, v in obj.items() if k != PADDLE_SAVE_META_KEY}
    bad = [k for k, v in weights.items() if not np.issubdtype(v.dtype, np.number)]
    if bad:
        raise WeightsError(f"{path}: entries that are not numeric arrays: {', '.join(bad)}")
    return weights


def _shape(a) -> List[int]:
    return list(a.shape)


def _listing(title: str, items: List[str], limit: int = 20) -> str:
    """'title: a [1], b [2]' with at most `limit` items (a wrong model can miss hundreds)."""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title}: {', '.join(items[:limit])}{more}" if items else ""


def _check_keys(model_state: Dict, weights: Dict, label: Callable[[str], str],
                where: str, as_saved: Optional[Dict] = None) -> List[str]:
    """Raise naming every missing, unexpected or wrongly shaped key; return the keys to skip.

    Only a classifier sized for another number of classes (same input width) is skipped.
    `as_saved` is the file's dict under its own keys (to say which model it holds).
    """
    missing = [f"{label(k)} {_shape(v)}" for k, v in model_state.items() if k not in weights]
    unexpected = [f"{k} {_shape(v)}" for k, v in weights.items() if k not in model_state]
    wrong = {k: f"{label(k)}: file {_shape(weights[k])} vs model {_shape(v)}"
             for k, v in model_state.items()
             if k in weights and _shape(weights[k]) != _shape(v)}
    weight, bias = CLASSIFIER_KEYS
    skipped = []
    if (weight in wrong and bias in wrong
            and weights[weight].shape[0] == model_state[weight].shape[0]):
        skipped = [weight, bias]
    wrong_listed = [v for k, v in wrong.items() if k not in skipped]
    if missing or unexpected or wrong_listed:
        other = matching_model(weights if as_saved is None else as_saved)
        # Said first: the keys below would bury it.
        hint = (f"the file holds a {other} (every key and shape fit it): set "
                f"Arch.name={other}; ") if other else ""
        problems = [_listing("missing keys", missing), _listing("unexpected keys", unexpected),
                    _listing("wrong shapes", wrong_listed)]
        raise WeightsError(f"cannot load {where}: {hint}" + "; ".join(p for p in problems if p))
    return skipped


def matching_model(weights: Dict) -> Optional[str]:
    """The registered model whose state_dict has exactly these keys and shapes (ours or
    PaddleClas's names; the classifier may be sized for other classes), or None. Only
    for error messages: each model is built under paddle.LazyGuard (shapes, no memory),
    ~3 s for all of them."""
    from ppdpn.models import get_model_fn, list_models
    file_shapes = {k: _shape(v) for k, v in weights.items()}
    for name in list_models():
        with paddle.LazyGuard():
            model = get_model_fn(name)()
        ours = {k: _shape(v) for k, v in model.state_dict().items()}
        theirs = {paddleclas_key_map(model, name)[k]: v for k, v in ours.items()}
        for layout in (ours, theirs):
            if set(layout) == set(file_shapes) and all(
                    _fits(k, layout[k], file_shapes[k]) for k in layout):
                return name
    return None


def _fits(key: str, model_shape: List[int], file_shape: List[int]) -> bool:
    """Equal shapes, except that a classifier ([in, classes] + [classes]: ours `fc.`,
    PaddleClas's `out.`) may have another number of classes."""
    if key in CLASSIFIER_KEYS or key in ("out.weight", "out.bias"):
        return model_shape[:-1] == file_shape[:-1]
    return model_shape == file_shape


def load_pretrained(model: paddle.nn.Layer, path, name: Optional[str] = None,
                    new_classifier: bool = True) -> List[str]:
    """Load `path` into `model`; returns the keys left out (only the classifier, if any).

    Accepts PaddleClas's published <Model>_pretrained.pdparams, our own state_dict saved
    with paddle.save, and checkpoints ({"model": state_dict, ...}). Anything missing,
    unexpected or of the wrong shape is an error naming the keys, except a classifier
    sized for a different number of classes: it keeps its fresh initialisation.
    """
    name = name or type(model).__name__
    weights = as_saved = _weights_in(safe_load(path), path)
    model_state = model.state_dict()
    key_map = paddleclas_key_map(model, name)
    theirs_to_ours = {v: k for k, v in key_map.items()}
    label = str
    if sum(k in theirs_to_ours for k in weights) > sum(k in model_state for k in weights):
        # PaddleClas layout. Errors use its names (an unexpected key keeps its own).
        weights = {theirs_to_ours.get(k, k): v for k, v in weights.items()}
        label = key_map.get
    skipped = _check_keys(model_state, weights, label, f"{path} into {name}", as_saved)
    if skipped and not new_classifier:  # eval-only: a fresh head would score chance
        classes = weights["fc.weight"].shape[-1]
        raise WeightsError(f"cannot evaluate {path} as {name}: its classifier is for {classes} "
                           f"classes, the model's for {model_state['fc.weight'].shape[-1]} "
                           f"(set Arch.class_num={classes})")
    if skipped:
        logger.warning("%s: classifier not loaded from %s (file %s vs model %s); "
                       "all other %d tensors loaded", name, path, _shape(weights["fc.weight"]),
                       _shape(model_state["fc.weight"]), len(model_state) - len(skipped))
    # A skipped classifier is given its own values so set_state_dict sees every key.
    model.set_state_dict({k: v.numpy() if k in skipped else
                          weights[k].astype(v.numpy().dtype, copy=False)
                          for k, v in model_state.items()})
    return skipped
