"""``nn.Linear``: output features (rows) and input features (columns, ``block`` per unit after a flatten)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..optim import grow_parameter_
from ..shrink import expand_units, shrink_linear_in_features_, shrink_linear_out_features_
from .base import Claim, ClaimContext, GrowInit, ParamSlice, SliceHandler, fan_in_bound, register

LINEAR_OUT, LINEAR_IN = "linear_out", "linear_in"


def grow_linear_out_features_(layer: nn.Linear, n: int, optimizers: Sequence[Optimizer], init: GrowInit) -> None:
    """Append ``n`` output features: weight rows and bias entries drawn like ``nn.Linear``'s init."""
    bound = fan_in_bound(layer.in_features)
    grow_parameter_(layer, "weight", init.uniform(layer.weight, (n, layer.in_features), bound), 0, optimizers)
    if layer.bias is not None:
        grow_parameter_(layer, "bias", init.uniform(layer.bias, (n,), bound), 0, optimizers)
    layer.out_features += n


def grow_linear_in_features_(layer: nn.Linear, n: int, optimizers: Sequence[Optimizer]) -> None:
    """Append ``n`` input features with zero weights (the layer's output does not change)."""
    grow_parameter_(layer, "weight", layer.weight.new_zeros(layer.out_features, n), 1, optimizers)
    layer.in_features += n


@register
class LinearHandler(SliceHandler):
    kinds = {LINEAR_OUT: "out", LINEAR_IN: "in"}
    size_attrs = ("in_features", "out_features")
    priority = 90

    def owns(self, module: nn.Module, kind: str) -> bool:
        return isinstance(module, nn.Linear)

    def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
        if isinstance(module, nn.Linear):
            return Claim(LINEAR_OUT if is_out else LINEAR_IN)
        return None

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        return int(module.out_features) if kind == LINEAR_OUT else int(module.in_features) // block

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        if kind == LINEAR_OUT:
            return [ParamSlice("", "weight", 0, None), ParamSlice("", "bias", 0, None)]
        units = None if block == 1 else torch.arange(self.width(module, kind, block, parts)).repeat_interleave(block)
        return [ParamSlice("", "weight", 1, units)]

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        if kind == LINEAR_OUT:
            shrink_linear_out_features_(module, keep, optimizers)
        else:
            shrink_linear_in_features_(module, expand_units(keep, block), optimizers)

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        if kind == LINEAR_OUT:
            grow_linear_out_features_(module, n, optimizers, init)
        else:
            grow_linear_in_features_(module, n * block, optimizers)
