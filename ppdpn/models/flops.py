"""Model size and cost: parameter counts and multiply-accumulates (MACs).

`paddle.flops` fails on Paddle 3.3.1 with numpy >= 2.4 (docs/reference.md section 2), so MACs are
counted with forward hooks on Conv2D and Linear, the layers that hold all but a fraction
of a percent of the arithmetic; BN, ReLU, pooling and additions are not counted, as in
paddle.flops and PaddleClas's published figures. FLOPs = 2 x MACs.
"""
from typing import Dict, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from ppdpn.models.registry import get_model_fn


def count_params(model: nn.Layer) -> Tuple[int, int]:
    """(trainable parameters, all state_dict entries incl. BN running mean/variance)."""
    trainable = sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)
    everything = sum(int(np.prod(t.shape)) for t in model.state_dict().values())
    return trainable, everything


def _conv_macs(layer: nn.Conv2D, output: paddle.Tensor) -> int:
    # Every output element is a dot product over (in_channels / groups) x kernel window.
    kernel = int(np.prod(layer._kernel_size))
    return int(np.prod(output.shape)) * (layer._in_channels // layer._groups) * kernel


def _linear_macs(layer: nn.Linear, output: paddle.Tensor) -> int:
    return int(np.prod(output.shape)) * int(layer.weight.shape[0])  # weight is [in, out]


def count_macs(model: nn.Layer, input_shape: Sequence[int]) -> int:
    """MACs of one forward pass of `model` on a zero tensor of `input_shape` (whole batch)."""
    total = 0

    def hook(counter):
        def record(layer, inputs, output):
            nonlocal total
            total += counter(layer, output)
        return record

    handles = []
    for layer in model.sublayers():
        if isinstance(layer, nn.Conv2D):
            handles.append(layer.register_forward_post_hook(hook(_conv_macs)))
        elif isinstance(layer, nn.Linear):
            handles.append(layer.register_forward_post_hook(hook(_linear_macs)))
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            model(paddle.zeros(list(input_shape), dtype="float32"))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total


def model_stats(name: str, image_size: int = 224) -> Dict[str, float]:
    """Trainable params, params incl. BN stats and GMACs at 1x3xSxS for a registered model."""
    model = get_model_fn(name)(num_classes=1000)
    trainable, everything = count_params(model)
    macs = count_macs(model, (1, 3, image_size, image_size))
    return {"trainable": trainable, "all": everything, "gmacs": macs / 1e9}


def format_table(names: Sequence[str], image_size: int = 224) -> str:
    """The size/cost table printed by `python -m ppdpn.models`."""
    header = (f"{'model':<14}{'trainable params':>18}{'params incl. BN stats':>24}"
              f"{'GMACs':>9}{'GFLOPs':>9}")
    lines = [header, "-" * len(header)]
    for name in names:
        s = model_stats(name, image_size)
        lines.append(f"{name:<14}{s['trainable']:>18,}{s['all']:>24,}"
                     f"{s['gmacs']:>9.3f}{2 * s['gmacs']:>9.3f}")
    lines += ["",
              "trainable params: parameters the optimizer updates (timm's and PaddleClas's "
              "DenseNet convention);",
              "params incl. BN stats: every state_dict entry, i.e. plus BatchNorm running "
              "mean/variance (PaddleClas's DPN README convention);",
              f"GMACs: multiply-accumulates of Conv2D and Linear layers at 1x3x{image_size}x"
              f"{image_size}, counted with forward hooks; GFLOPs = 2 x GMACs."]
    return "\n".join(lines)
