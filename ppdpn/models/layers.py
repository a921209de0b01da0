"""Building blocks shared by DPN and DenseNet: BN-ReLU-Conv units, stems, recompute.

Both families follow PaddleClas: convolutions without bias, BatchNorm with epsilon 1e-5 and
momentum 0.9 (Paddle's convention: running = 0.9 * running + 0.1 * batch).
"""
from typing import Callable, Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import _C_ops
from paddle.autograd import PyLayer
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


def concat(inputs: Sequence[paddle.Tensor], axis: int) -> paddle.Tensor:
    return inputs[0] if len(inputs) == 1 else paddle.concat(list(inputs), axis=axis)


def run_units(units: Sequence[PreActConv], inputs: Sequence[paddle.Tensor], axis: int):
    """units[-1](...units[0](concat(inputs))): the plain forward of a chain."""
    x = concat(inputs, axis)
    for unit in units:
        x = unit(x)
    return x


class _LeanChain(PyLayer):
    """concat -> (BN -> ReLU -> conv) per unit, keeping only the inputs for backward.

    Backward rebuilds what lies in between from the inputs: the concat and each BN-ReLU
    output (element-wise work) and, in a chain of more than one unit, the convolutions
    before the last one; then it runs the gradient kernels the plain graph would run, on
    the same values, so the gradients are bit-identical. The BN replays normalise with
    the batch statistics on copies of the running ones, so those move once. The *_grad
    kernels are Paddle's own (paddle._C_ops, not a public API): should their signatures
    change, tests/test_models.py's recompute test fails rather than training.
    """

    @staticmethod
    def forward(ctx, units, axis, *tensors):
        # tensors: the inputs, then (bn.weight, bn.bias, conv.weight) of each unit
        n_inputs = len(tensors) - 3 * len(units)
        ctx.units, ctx.axis, ctx.n_inputs = units, axis, n_inputs
        ctx.needs_grad = [not t.stop_gradient for t in tensors]
        ctx.save_for_backward(*tensors)
        return run_units(units, tensors[:n_inputs], axis)  # grad is off: nothing else is kept

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensor()
        inputs, params = saved[:ctx.n_inputs], saved[ctx.n_inputs:]
        x, replays = concat(inputs, ctx.axis), []
        for i, unit in enumerate(ctx.units):  # forward again, keeping what backward reads
            bn = unit.bn
            y, *stats = _C_ops.batch_norm(
                x, bn._mean.clone(), bn._variance.clone(), params[3 * i], params[3 * i + 1],
                False, bn._momentum, bn._epsilon, bn._data_format, False, False)
            act = _C_ops.relu(y)
            del y
            replays.append((x, act, stats))
            if i + 1 < len(ctx.units):
                x = unit.conv(act)
        param_grads = []
        for i in reversed(range(len(ctx.units))):
            bn, conv = ctx.units[i].bn, ctx.units[i].conv
            scale, bias, weight = params[3 * i:3 * i + 3]
            x, act, (mean, var, saved_mean, saved_var, reserve) = replays.pop()
            d_act, d_weight = _C_ops.conv2d_grad(
                act, weight, grad, conv._stride, conv._updated_padding,
                conv._padding_algorithm, conv._dilation, conv._groups, conv._data_format)
            d_y = _C_ops.relu_grad(act, d_act)
            del act, d_act
            grad, d_scale, d_bias = _C_ops.batch_norm_grad(
                x, scale, bias, mean, var, saved_mean, saved_var, reserve, d_y, bn._momentum,
                bn._epsilon, bn._data_format, False, False, False)
            del x, d_y
            param_grads = [d_scale, d_bias, d_weight] + param_grads
        d_inputs = [grad] if len(inputs) == 1 else paddle.split(
            grad, [t.shape[ctx.axis] for t in inputs], axis=ctx.axis)
        grads = (*d_inputs, *param_grads)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_grad))


def _lean_path_applies(units: Sequence[PreActConv], inputs) -> bool:
    """The explicit backward covers one float type throughout (fp32, or fp64 for exact
    tests), batch-statistics BN and plain (not depthwise) convs; anything else (AMP's
    mixed types, frozen BN statistics) takes Paddle's generic recompute."""
    params = [t for u in units for t in (u.bn.weight, u.conv.weight)]
    dtypes = {t.dtype for t in (*inputs, *params)}
    return (not paddle.amp.is_autocast_enabled() and len(dtypes) == 1
            and dtypes <= {paddle.float32, paddle.float64}
            and all(not u.bn._use_global_stats and u.conv._op_type == "conv2d" for u in units))


def preact_chain(units: Sequence[PreActConv], inputs: Sequence[paddle.Tensor], axis: int,
                 memory_efficient: bool) -> paddle.Tensor:
    """run_units(units, inputs); memory-efficient: keep only `inputs` for backward.

    With one unit, the concat and the BN-ReLU output (as wide as all inputs together: the
    quadratic part of a dense block's memory) are rebuilt in backward instead of stored,
    and the conv output, the next unit's input, is kept: no convolution runs twice. Each
    further unit also drops the conv output before it, for one more convolution in
    backward (worth it for DPN's grouped 3x3, cheap to run but as wide as the block).
    """
    if not (memory_efficient and units[0].training and paddle.is_grad_enabled()):
        return run_units(units, inputs, axis)
    if _lean_path_applies(units, inputs):
        params = [t for u in units for t in (u.bn.weight, u.bn.bias, u.conv.weight)]
        return _LeanChain.apply(list(units), axis, *inputs, *params)
    return recompute_once(lambda *xs: run_units(units, xs, axis), [u.bn for u in units], *inputs)


def recompute_once(function: Callable, batch_norms: Sequence[BatchNorm2D], *args):
    """Run `function(*args)` under Paddle's recompute, updating BN running stats only once.

    `use_reentrant=False` because the reentrant variant gives no parameter gradients to a
    block whose inputs need no grad (docs/reference.md §8). Paddle replays `function` during
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
