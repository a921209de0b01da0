"""Densely connected networks (Huang et al. 2017, arXiv:1608.06993), as PaddleClas builds them.

Stem conv7/2 + BN + ReLU + max pool 3/2/1; dense blocks of BN-ReLU-1x1 (bn_size x growth)
and BN-ReLU-3x3 (growth) layers, each seeing the concatenation of all earlier features;
transitions BN-ReLU-1x1 (halving the channels) + avg pool 2/2; head BN+ReLU, global
average pool, Linear. Parameter counts equal PaddleClas's DenseNets.
"""
import math
from typing import List, Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppdpn.models.layers import BatchNorm2D, ConvBNReLU, PreActConv, channel_axis, preact_chain
from ppdpn.models.registry import register_model


class DenseLayer(nn.Layer):
    """Adds `growth` channels computed from all features so far.

    With `recompute`, each BN-ReLU-conv unit keeps only its inputs for backward and rebuilds
    the concat and the BN-ReLU output there (layers.preact_chain): the memory-efficient
    DenseNet (Pleiss et al. 2017), whose stored activations grow linearly rather than
    quadratically with depth, without computing any convolution twice.
    """

    def __init__(self, in_channels: int, growth: int, bn_size: int, recompute: bool = False,
                 data_format: str = "NCHW"):
        super().__init__()
        self.recompute = recompute
        self.axis = channel_axis(data_format)
        self.reduce = PreActConv(in_channels, bn_size * growth, 1, data_format=data_format)
        self.grow = PreActConv(bn_size * growth, growth, 3, data_format=data_format)

    def forward(self, features: List[paddle.Tensor]) -> paddle.Tensor:
        x = preact_chain([self.reduce], features, self.axis, self.recompute)
        return preact_chain([self.grow], [x], self.axis, self.recompute)


class Transition(PreActConv):
    """BN-ReLU-1x1 conv to `out_channels` (its forward); DenseBlock applies `pool` (2x2
    average) after it, so the unit itself can take the memory-efficient path."""

    def __init__(self, in_channels: int, out_channels: int, data_format: str = "NCHW"):
        super().__init__(in_channels, out_channels, 1, data_format=data_format)
        self.pool = nn.AvgPool2D(2, stride=2, data_format=data_format)


class DenseBlock(nn.Layer):
    """`depth` dense layers, then (except in the last stage) a transition."""

    def __init__(self, in_channels: int, depth: int, growth: int, bn_size: int,
                 transition: bool, recompute: bool = False, data_format: str = "NCHW"):
        super().__init__()
        self.axis = channel_axis(data_format)
        self.layers = nn.LayerList([
            DenseLayer(in_channels + i * growth, growth, bn_size, recompute, data_format)
            for i in range(depth)])
        self.out_channels = in_channels + depth * growth
        self.recompute = recompute
        self.transition = None
        if transition:
            self.transition = Transition(self.out_channels, self.out_channels // 2, data_format)
            self.out_channels //= 2

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # Keep the features as a list and concatenate once per layer (inside the layer, so
        # recompute can drop it) instead of growing one tensor block by block.
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        if self.transition is None:
            return paddle.concat(features, axis=self.axis)
        t = self.transition
        return t.pool(preact_chain([t], features, self.axis, self.recompute))


class DenseNet(nn.Layer):
    """A DenseNet given its numbers (docs/reference.md section 3).

    `recompute`: memory-efficient dense layers (see DenseLayer). `data_format`: "NCHW" or
    "NHWC" (the input's layout too).
    """

    def __init__(self, stem_channels: int, growth: int, block_config: Sequence[int],
                 bn_size: int = 4, num_classes: int = 1000, recompute: bool = False,
                 data_format: str = "NCHW"):
        super().__init__()
        self.num_classes, self.recompute, self.data_format = num_classes, recompute, data_format
        self.stem = ConvBNReLU(3, stem_channels, 7, data_format=data_format)
        self.stem_pool = nn.MaxPool2D(3, stride=2, padding=1, data_format=data_format)
        self.blocks = nn.LayerList()
        channels = stem_channels
        for i, depth in enumerate(block_config):
            self.blocks.append(DenseBlock(channels, depth, growth, bn_size,
                                          transition=i < len(block_config) - 1,
                                          recompute=recompute, data_format=data_format))
            channels = self.blocks[-1].out_channels
        self.num_features = channels
        self.head_bn = BatchNorm2D(channels, data_format=data_format)
        self.pool = nn.AdaptiveAvgPool2D(1, data_format=data_format)
        # PaddleClas initialises the DenseNet classifier with U(-1/sqrt(C), 1/sqrt(C)).
        bound = 1.0 / math.sqrt(channels)
        init = nn.initializer.Uniform(-bound, bound)
        self.fc = nn.Linear(channels, num_classes, weight_attr=paddle.ParamAttr(initializer=init))

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        """Stem, dense blocks and transitions, head BN+ReLU: (N, num_features, H/32, W/32)."""
        x = self.stem_pool(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return F.relu(self.head_bn(x))

    def forward_head(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(paddle.flatten(self.pool(x), start_axis=1))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def DenseNet121(**kwargs) -> DenseNet:
    return DenseNet(stem_channels=64, growth=32, block_config=(6, 12, 24, 16), **kwargs)


@register_model
def DenseNet161(**kwargs) -> DenseNet:
    return DenseNet(stem_channels=96, growth=48, block_config=(6, 12, 36, 24), **kwargs)


@register_model
def DenseNet169(**kwargs) -> DenseNet:
    return DenseNet(stem_channels=64, growth=32, block_config=(6, 12, 32, 32), **kwargs)


@register_model
def DenseNet201(**kwargs) -> DenseNet:
    return DenseNet(stem_channels=64, growth=32, block_config=(6, 12, 48, 32), **kwargs)


@register_model
def DenseNet264(**kwargs) -> DenseNet:
    return DenseNet(stem_channels=64, growth=32, block_config=(6, 12, 64, 48), **kwargs)


@register_model
def DenseNetTiny(**kwargs) -> DenseNet:
    """Not a published model: a small DenseNet for the CPU demo and fast tests."""
    return DenseNet(stem_channels=16, growth=16, block_config=(1, 2, 4, 8), **kwargs)
