"""Dual Path Networks (Chen et al. 2017, arXiv:1707.01629), as PaddleClas builds them.

Each block sees the concatenation of a residual path (fixed width `bw`, summed) and a
densely connected path (grows by `inc` per block, concatenated). Pre-activation
BN-ReLU-Conv units; the head is BN+ReLU over both paths, global average pool and a
Linear layer. Parameter counts equal PaddleClas's DPNs (see tests/test_models.py).
"""
from functools import partial
from typing import List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppdpn.models.layers import BatchNorm2D, ConvBNReLU, PreActConv, channel_axis, preact_chain
from ppdpn.models.registry import register_model

# (residual path, dense path as a list of pieces); the stem output enters as (None, [x]).
Paths = Tuple[Optional[paddle.Tensor], List[paddle.Tensor]]


class DualPathBlock(nn.Layer):
    """1x1 reduce -> grouped 3x3 -> 1x1 expand; the output is split between both paths.

    The first block of a stage projects its input (`project=True`, with `stride` 2 from
    the second stage on) into a new residual path of width `bw` and a dense path of
    2 * `inc` channels; the other blocks take the two paths as they come. The dense path
    travels as a list of pieces, concatenated only inside the next unit (so that with
    `recompute` the growing concatenation is never stored, see layers.preact_chain).
    """

    def __init__(self, in_channels: int, width: int, bw: int, inc: int, groups: int,
                 project: bool, stride: int = 1, recompute: bool = False,
                 data_format: str = "NCHW"):
        super().__init__()
        self.bw, self.inc, self.project = bw, inc, project
        self.recompute = recompute
        self.axis = channel_axis(data_format)
        # Registration order = PaddleClas's key order (c1x1_w, c1x1_a, c3x3_b, c1x1_c).
        if project:
            self.proj = PreActConv(in_channels, bw + 2 * inc, 1, stride, data_format=data_format)
        self.reduce = PreActConv(in_channels, width, 1, data_format=data_format)
        self.grouped = PreActConv(width, width, 3, stride, groups, data_format=data_format)
        self.expand = PreActConv(width, bw + inc, 1, data_format=data_format)

    def forward(self, paths: Paths) -> Paths:
        """paths: (residual, [dense pieces]) -> the same for the next block."""
        residual, dense = paths
        inputs = [residual] + list(dense) if residual is not None else list(dense)
        chain = partial(preact_chain, axis=self.axis, memory_efficient=self.recompute)
        if self.project:
            residual, projected_dense = paddle.split(
                chain([self.proj], inputs), [self.bw, 2 * self.inc], axis=self.axis)
            dense = [projected_dense]
        # With recompute the grouped 3x3 output is not kept either: recomputing that
        # convolution costs little time and saves a block-wide activation per block.
        out = chain([self.grouped, self.expand], [chain([self.reduce], inputs)])
        out_residual, out_dense = paddle.split(out, [self.bw, self.inc], axis=self.axis)
        return residual + out_residual, list(dense) + [out_dense]


class DPN(nn.Layer):
    """A DPN given its numbers (docs/reference.md section 3).

    k_r: width of the 3x3 convolutions in the first stage, k_r * bw[s] / bw[0] in stage s;
    groups: groups of those convolutions; k_sec: blocks per stage; inc_sec: dense-path
    growth per block; bw: residual-path width per stage.
    `recompute`: memory-efficient units that rebuild their concat and BN-ReLU output in
    backward instead of storing them (layers.preact_chain). `data_format`: "NCHW" or
    "NHWC" (input layout too).
    """

    def __init__(self, stem_channels: int, stem_kernel: int, k_r: int, groups: int,
                 k_sec: Sequence[int], inc_sec: Sequence[int], bw: Sequence[int],
                 num_classes: int = 1000, recompute: bool = False, data_format: str = "NCHW"):
        super().__init__()
        self.num_classes, self.recompute, self.data_format = num_classes, recompute, data_format
        self.axis = channel_axis(data_format)
        self.stem = ConvBNReLU(3, stem_channels, stem_kernel, data_format=data_format)
        self.stem_pool = nn.MaxPool2D(3, stride=2, padding=1, data_format=data_format)
        self.blocks = nn.LayerList()
        channels = stem_channels
        for stage, (depth, inc, width) in enumerate(zip(k_sec, inc_sec, bw)):
            inner = k_r * width // bw[0]
            for i in range(depth):
                self.blocks.append(DualPathBlock(
                    channels, inner, width, inc, groups, project=(i == 0),
                    stride=2 if (i == 0 and stage > 0) else 1,
                    recompute=recompute, data_format=data_format))
                # A projecting block starts the dense path at 2 * inc, and every block adds inc.
                dense = 3 * inc if i == 0 else dense + inc
                channels = width + dense
        self.num_features = channels
        self.head_bn = BatchNorm2D(channels, data_format=data_format)
        self.pool = nn.AdaptiveAvgPool2D(1, data_format=data_format)
        # PaddleClas initialises the DPN classifier with U(-0.01, 0.01).
        init = nn.initializer.Uniform(-0.01, 0.01)
        self.fc = nn.Linear(channels, num_classes, weight_attr=paddle.ParamAttr(initializer=init))

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        """Stem and all blocks, then BN+ReLU over both paths: (N, num_features, H/32, W/32)."""
        paths = (None, [self.stem_pool(self.stem(x))])
        for block in self.blocks:
            paths = block(paths)
        residual, dense = paths
        return F.relu(self.head_bn(paddle.concat([residual] + dense, axis=self.axis)))

    def forward_head(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(paddle.flatten(self.pool(x), start_axis=1))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def DPN68(**kwargs) -> DPN:
    return DPN(stem_channels=10, stem_kernel=3, k_r=128, groups=32, k_sec=(3, 4, 12, 3),
               inc_sec=(16, 32, 32, 64), bw=(64, 128, 256, 512), **kwargs)


@register_model
def DPN92(**kwargs) -> DPN:
    return DPN(stem_channels=64, stem_kernel=7, k_r=96, groups=32, k_sec=(3, 4, 20, 3),
               inc_sec=(16, 32, 24, 128), bw=(256, 512, 1024, 2048), **kwargs)


@register_model
def DPN98(**kwargs) -> DPN:
    return DPN(stem_channels=96, stem_kernel=7, k_r=160, groups=40, k_sec=(3, 6, 20, 3),
               inc_sec=(16, 32, 32, 128), bw=(256, 512, 1024, 2048), **kwargs)


@register_model
def DPN107(**kwargs) -> DPN:
    return DPN(stem_channels=128, stem_kernel=7, k_r=200, groups=50, k_sec=(4, 8, 20, 3),
               inc_sec=(20, 64, 64, 128), bw=(256, 512, 1024, 2048), **kwargs)


@register_model
def DPN131(**kwargs) -> DPN:
    return DPN(stem_channels=128, stem_kernel=7, k_r=160, groups=40, k_sec=(4, 8, 28, 3),
               inc_sec=(16, 32, 32, 128), bw=(256, 512, 1024, 2048), **kwargs)


@register_model
def DPNTiny(**kwargs) -> DPN:
    """Not a published model: a small DPN for the CPU demo and fast tests."""
    return DPN(stem_channels=16, stem_kernel=3, k_r=32, groups=8, k_sec=(1, 1, 2, 1),
               inc_sec=(8, 8, 16, 16), bw=(32, 64, 128, 256), **kwargs)
