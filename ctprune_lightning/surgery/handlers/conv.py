"""Convolutions (Conv1d/2d/3d): output and input channels, and depthwise convolutions as pass-throughs.

A depthwise convolution (``groups == in_channels == out_channels``) ties each output channel to its input
channel: it neither produces nor consumes a group's units, it carries them (role ``"through"``), like a
norm. Other grouped convolutions tie channels to their group and are refused with a reason; transposed
convolutions are refused.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn
from torch.optim import Optimizer

from ..optim import grow_parameter_
from ..shrink import (CONV_TYPES, is_depthwise, shrink_conv_in_channels_, shrink_conv_out_channels_,
                      shrink_depthwise_conv_channels_)
from .base import Claim, ClaimContext, GrowInit, ParamSlice, SliceHandler, fan_in_bound, register

CONV_OUT, CONV_IN, DEPTHWISE = "conv_out", "conv_in", "depthwise"


def _fan_in(conv: nn.Module) -> int:
    return int(conv.in_channels // conv.groups * math.prod(conv.kernel_size))


def grow_conv_out_channels_(conv: nn.Module, n: int, optimizers: Sequence[Optimizer], init: GrowInit) -> None:
    """Append ``n`` filters (and bias entries) drawn like the convolution's init; depthwise: ``n`` channels."""
    bound = fan_in_bound(_fan_in(conv))
    shape = (n, *conv.weight.shape[1:])
    grow_parameter_(conv, "weight", init.uniform(conv.weight, shape, bound), 0, optimizers)
    if conv.bias is not None:
        grow_parameter_(conv, "bias", init.uniform(conv.bias, (n,), bound), 0, optimizers)
    conv.out_channels += n
    if is_depthwise_shape(conv):
        conv.in_channels += n
        conv.groups += n


def is_depthwise_shape(conv: nn.Module) -> bool:
    """After growing the filters: depthwise when ``groups == in_channels`` and one input per filter."""
    return conv.groups > 1 and conv.groups == conv.in_channels and conv.weight.shape[1] == 1


def grow_conv_in_channels_(conv: nn.Module, n: int, optimizers: Sequence[Optimizer]) -> None:
    """Append ``n`` input channels with zero weights (the output does not change)."""
    shape = (conv.weight.shape[0], n, *conv.weight.shape[2:])
    grow_parameter_(conv, "weight", conv.weight.new_zeros(shape), 1, optimizers)
    conv.in_channels += n


@register
class ConvHandler(SliceHandler):
    kinds = {CONV_OUT: "out", CONV_IN: "in", DEPTHWISE: "through"}
    size_attrs = ("in_channels", "out_channels", "groups")
    priority = 80

    def owns(self, module: nn.Module, kind: str) -> bool:
        return isinstance(module, CONV_TYPES)

    def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
        if not isinstance(module, nn.modules.conv._ConvNd):
            return None
        if not isinstance(module, CONV_TYPES):
            return f"coupled to {type(module).__name__} '{{}}' (transposed convolutions are not supported)"
        if is_depthwise(module):
            return Claim(DEPTHWISE)
        if module.groups != 1:
            return (f"coupled to grouped convolution '{{}}' (groups={module.groups}): its channels are tied to their "
                    "group, which is not supported (depthwise convolutions are)")
        return Claim(CONV_OUT if is_out else CONV_IN)

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        return int(module.in_channels if kind == CONV_IN else module.out_channels)

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        if kind == CONV_IN:
            return [ParamSlice("", "weight", 1, None)]
        return [ParamSlice("", "weight", 0, None), ParamSlice("", "bias", 0, None)]

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        fn = {CONV_OUT: shrink_conv_out_channels_, CONV_IN: shrink_conv_in_channels_,
              DEPTHWISE: shrink_depthwise_conv_channels_}[kind]
        fn(module, keep, optimizers)

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        if kind == CONV_IN:
            grow_conv_in_channels_(module, n, optimizers)
        else:
            grow_conv_out_channels_(module, n, optimizers, init)
