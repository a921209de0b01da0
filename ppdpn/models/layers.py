"""Building blocks shared by DPN and DenseNet: BN-ReLU-Conv units, stems, recompute.

Both families follow PaddleClas: convolutions without bias, BatchNorm with epsilon 1e-5 and
momentum 0.9 (Paddle's convention: running = 0.9 * running + 0.1 * batch).
"""
from typing import Callable, Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
DATA_FORMATS = ("NCHW", "NHWC")


def channel_axis(data_format: str) -> int:
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    return 1 if data_format == "NCHW" else 3


class BatchNorm2D(nn.BatchNorm2D):
    """BatchNorm2D whose running-stat update can be switched off for a recompute replay.

    Recompute runs a block's forward twice in one training step; a plain BatchNorm would
    then move its running statistics twice. During the replay (`replaying` set by
    `recompute_once`) the output is still normalised with the batch statistics, exactly
    as in the first pass, but the update lands in throw-away copies of the buffers.
    """

    replaying = False

    def __init__(self, num_features: int, data_format: str = "NCHW"):
        super().__init__(num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                         data_format=data_format)

    def forward(self, x):
        if not (self.training and self.replaying):
            return super().forward(x)
        return F.batch_norm(x, self._mean.clone(), self._variance.clone(), self.weight,
                            self.bias, training=True, momentum=self._momentum,
                            epsilon=self._epsilon, data_format=self._data_format,
                            use_global_stats=self._use_global_stats)


class PreActConv(nn.Layer):
    """BN -> ReLU -> Conv (no bias): the unit every DPN and DenseNet block is made of."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, data_format: str = "NCHW"):
        super().__init__()
        # Registration order (bn, then conv) is the order PaddleClas's state_dict lists them.
        self.bn = BatchNorm2D(in_channels, data_format=data_format)
        self.conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, groups=groups, bias_attr=False,
                              data_format=data_format)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


class ConvBNReLU(nn.Layer):
    """Conv -> BN -> ReLU: the stem of both families (stride 2, 'same' padding)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 2,
                 data_format: str = "NCHW"):
        super().__init__()
        self.conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias_attr=False, data_format=data_format)
        self.bn = BatchNorm2D(out_channels, data_format=data_format)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def should_recompute(layer: nn.Layer, enabled: bool) -> bool:
    """Recompute only pays off when a backward pass will follow."""
    return enabled and layer.training and paddle.is_grad_enabled()


def recompute_once(function: Callable, batch_norms: Sequence[BatchNorm2D], *args):
    """Run `function(*args)` under recompute, updating BN running stats only once.

    `use_reentrant=False` because the reentrant variant gives no parameter gradients to a
    block whose inputs need no grad (PLATFORM.md). Paddle replays `function` during
    backward; the call counter tells the first pass from the replay.
    """
    calls = 0

    def run(*inputs):
        nonlocal calls
        calls += 1
        for bn in batch_norms:
            bn.replaying = calls > 1
        try:
            return function(*inputs)
        finally:
            for bn in batch_norms:
                bn.replaying = False

    return recompute(run, *args, use_reentrant=False)
