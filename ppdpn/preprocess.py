"""The evaluation transform in numpy + OpenCV: the one source of its geometry and
constants, for predict, export and both loaders (ppdpn/data uses eval_geometry and the
ImageNet statistics from here).

It is PaddleClas's eval pipeline (docs/reference.md §5): decode to RGB; cv2.resize with
INTER_LINEAR (no antialiasing) so the short side becomes `resize_short`, each side
rounded with Python's round(); centre crop at ((W-crop)//2, (H-crop)//2);
(x/255 - mean)/std in float32; HWC -> CHW. Exported models carry these numbers in
preprocess.json (see `preprocess_spec`), so a deployed model is fed exactly this.

EXIF orientation is ignored everywhere (training, validation, predict): the pixels are
used as stored. The DALI decoders are set so, and the crop plans are computed from the
stored frame size in the JPEG header (ppdpn/data/plan.py); it is also what PaddleClas's
evaluation does, and ImageNet's published accuracies are measured that way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np

# ImageNet statistics, RGB order, on the 0..1 scale: (x / 255 - mean) / std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDecodeError(ValueError):
    """A file that exists but is not an image OpenCV can decode."""


def decode_image(path) -> np.ndarray:
    """Read an image file as HWC uint8 RGB; raise naming the file when it cannot.

    Bytes are read by numpy and decoded by cv2.imdecode (as PaddleClas does), which also
    copes with non-ASCII paths that cv2.imread mishandles on some platforms. Grey and
    RGBA become 3 channels; EXIF orientation is ignored, as in the loaders (see above).
    """
    import cv2
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = np.fromfile(str(path), dtype=np.uint8)
    try:
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
        img = cv2.imdecode(data, flags) if data.size else None
    except cv2.error:  # most bad files give None, a few make a codec throw
        img = None
    if img is None:
        raise ImageDecodeError(f"{path}: not an image OpenCV can decode")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resized_size(width: int, height: int, resize_short: int) -> Tuple[int, int]:
    """(new_width, new_height) with the short side at `resize_short`, as PaddleClas
    computes it: `percent = resize_short / short`, then `round(w * percent)` (Python's
    round). The order matters: `round(w * resize_short / short)` differs by a pixel for
    hundreds of sizes, e.g. 623x448 at 288 gives 400 high, not 401."""
    percent = float(resize_short) / min(width, height)
    return int(round(width * percent)), int(round(height * percent))


def eval_geometry(width: int, height: int, resize_short: int, crop: int):
    """The resized size (W', H') and the centre crop's origin ((W'-crop)//2, (H'-crop)//2)."""
    rw, rh = resized_size(width, height, resize_short)
    return rw, rh, (rw - crop) // 2, (rh - crop) // 2


def resize_short_side(img: np.ndarray, resize_short: int) -> np.ndarray:
    import cv2
    h, w = img.shape[:2]
    return cv2.resize(img, resized_size(w, h, resize_short), interpolation=cv2.INTER_LINEAR)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {w}x{h} image")
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


def normalize_chw(img: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW, (x/255 - mean)/std."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    x = (img.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def eval_transform(img: np.ndarray, resize_short: int = 256, crop_size: int = 224,
                   mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """HWC uint8 RGB image -> (3, crop_size, crop_size) float32, PaddleClas's eval transform."""
    img = center_crop(resize_short_side(img, resize_short), crop_size)
    return normalize_chw(img, mean, std)


def preprocess_spec(resize_short: int = 256, crop_size: int = 224,
                    mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> dict:
    """The transform's numbers as a JSON-able dict (the "preprocess" part of preprocess.json)."""
    return {
        "resize_short": int(resize_short),
        "crop_size": int(crop_size),
        "interpolation": "INTER_LINEAR",
        "scale": "1/255",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
    }


def transform_from_spec(img: np.ndarray, spec: dict) -> np.ndarray:
    """Apply the transform a `preprocess_spec` dict describes; reject what it cannot honour."""
    fixed = {"interpolation": "INTER_LINEAR", "scale": "1/255", "channel_order": "RGB",
             "layout": "NCHW", "dtype": "float32"}
    for key, value in fixed.items():
        if spec.get(key, value) != value:
            raise ValueError(f"preprocess {key}={spec[key]!r} is not supported (only {value!r})")
    return eval_transform(img, spec["resize_short"], spec["crop_size"], spec["mean"], spec["std"])
