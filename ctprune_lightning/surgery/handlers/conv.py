"""Convolutions (Conv1d/2d/3d): output and input channels, and depthwise convolutions as pass-throughs.

A depthwise convolution (``groups == in_channels == out_channels``) ties each output channel to its input
channel: it neither produces nor consumes a group's units, it carries them (role ``"through"``), like a
norm. Transposed convolutions: :mod:`.transposed`.

A grouped convolution (``1 < groups``, not depthwise) is cut uniformly per group: its weight is
``[out, in/groups, *k]`` with group ``j`` owning outputs ``j*out/groups .. (j+1)*out/groups - 1`` and inputs
``j*in/groups ..``, so unit ``k`` of its output group is the channels ``{k, k + out/groups, ...}`` (one per
group; ``gconv_out``) and unit ``k`` of its input group is column ``k`` of the weight (``gconv_in``; the
convolution's ``in_channels`` shrinks by ``groups`` per unit). Every other slice coupled to those channels
(the producer, BatchNorm, the consumer) is cut through a *tiled* slice, kind ``tiled<g>:<kind>``
(:func:`tiled_kind`, :class:`TiledHandler`): the inner slice's channel ``c`` belongs to unit ``c % (width/g)``.
Discovery wraps them (:func:`tile_slices`); grouped convolutions of different ``groups`` in one group are refused.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..optim import grow_parameter_, replace_parameter_
from ..shrink import (CONV_TYPES, is_depthwise, shrink_conv_in_channels_, shrink_conv_out_channels_,
                      shrink_depthwise_conv_channels_)
from .base import Claim, ClaimContext, GrowInit, ParamSlice, SliceHandler, fan_in_bound, register
from .wrapped import WrappedHandler

CONV_OUT, CONV_IN, DEPTHWISE = "conv_out", "conv_in", "depthwise"
GCONV_OUT, GCONV_IN = "gconv_out", "gconv_in"


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


def tile_units(keep: Tensor, groups: int, width: int) -> Tensor:
    """Unit indices -> channel indices when unit ``k`` is the channels ``{k + j*width}`` of ``groups`` groups."""
    keep = keep.to(torch.long)
    return (torch.arange(int(groups), device=keep.device)[:, None] * int(width) + keep[None, :]).flatten()


def _check_grouped(conv: nn.Module, keep: Tensor, width: int) -> None:
    if keep.dim() != 1 or keep.numel() == 0 or int(keep.min()) < 0 or int(keep.max()) >= width:
        raise ValueError(f"grouped convolution {conv!r}: keep must be a non-empty 1-D index tensor in [0, {width})")


def grow_grouped_conv_out_channels_(conv: nn.Module, n: int, optimizers: Sequence[Optimizer], init: GrowInit) -> None:
    """Append ``n`` filters at the end of every group (``groups * n`` output channels), drawn like the init."""
    g, w = int(conv.groups), int(conv.out_channels // conv.groups)
    positions = tile_units(torch.arange(w, w + n), g, w + n)
    bound = fan_in_bound(_fan_in(conv))
    grow_parameter_(conv, "weight", init.uniform(conv.weight, (g * n, *conv.weight.shape[1:]), bound), 0, optimizers,
                    positions)
    if conv.bias is not None:
        grow_parameter_(conv, "bias", init.uniform(conv.bias, (g * n,), bound), 0, optimizers, positions)
    conv.out_channels += g * n


def tiled_kind(groups: int, kind: str) -> str:
    """The kind of a slice whose channel ``c`` belongs to unit ``c % (width / groups)`` (see the module docstring)."""
    return TiledHandler.wrap(groups, kind)


def parse_tiled(kind: str) -> tuple[int, str] | None:
    return TiledHandler.parse(kind)


def tile_slices(slices: Sequence, module_of: "dict[str, nn.Module]") -> tuple[list, str | None]:
    """A traced group's slices with every slice other than a grouped convolution's own wrapped as tiled, or a
    reason to refuse (grouped convolutions of different ``groups`` share the channels)."""
    gs = {int(module_of[s.module].groups) for s in slices if s.kind in (GCONV_OUT, GCONV_IN)}
    if not gs:
        return list(slices), None
    if len(gs) > 1:
        names = [s.module for s in slices if s.kind in (GCONV_OUT, GCONV_IN)]
        return list(slices), (f"coupled to grouped convolutions {names} with different groups {sorted(gs)} "
                               "(their channels cannot be cut uniformly per group in both)")
    g = gs.pop()
    out = [s if s.kind in (GCONV_OUT, GCONV_IN) else type(s)(s.module, tiled_kind(g, s.kind), s.block, s.parts)
           for s in slices]
    return out, None


@register
class TiledHandler(WrappedHandler):
    """A slice of any kind coupled to a grouped convolution's channels: channel ``c`` is unit ``c % width``."""

    prefix = "tiled"
    priority = 81

    def unit_of(self, index: Tensor, n: int, width: int) -> Tensor:
        return index % width

    def channels(self, keep: Tensor, n: int, width: int) -> Tensor:
        return tile_units(keep, n, width)

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        """Append ``g * n`` inner units, then move each group's ``n`` to the end of its group."""
        g, inner, h, w = self.inner(module, kind, block, parts)
        h.grow_(module, inner, block, parts, g * n, optimizers, init)
        old = torch.arange(g * w).view(g, w)
        new = (g * w + torch.arange(g * n)).view(g, n)
        h.shrink_(module, inner, block, parts, torch.cat([old, new], 1).flatten(), optimizers)


@register
class ConvHandler(SliceHandler):
    kinds = {CONV_OUT: "out", CONV_IN: "in", DEPTHWISE: "through", GCONV_OUT: "out", GCONV_IN: "in"}
    size_attrs = ("in_channels", "out_channels", "groups")
    priority = 80

    def owns(self, module: nn.Module, kind: str) -> bool:
        return isinstance(module, CONV_TYPES)

    def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
        if not isinstance(module, CONV_TYPES):  # transposed ones: TransposedConvHandler (transposed.py)
            return None
        if is_depthwise(module):
            return Claim(DEPTHWISE)
        if module.groups != 1:
            return Claim(GCONV_OUT if is_out else GCONV_IN)
        return Claim(CONV_OUT if is_out else CONV_IN)

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        if kind in (GCONV_OUT, GCONV_IN):
            return int(module.weight.shape[1]) if kind == GCONV_IN else int(module.out_channels // module.groups)
        return int(module.in_channels if kind == CONV_IN else module.out_channels)

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        if kind == GCONV_OUT:
            units = torch.arange(self.width(module, kind, block, parts)).repeat(module.groups)
            return [ParamSlice("", "weight", 0, units), ParamSlice("", "bias", 0, units)]
        if kind in (CONV_IN, GCONV_IN):
            return [ParamSlice("", "weight", 1, None)]
        return [ParamSlice("", "weight", 0, None), ParamSlice("", "bias", 0, None)]

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        if kind == GCONV_OUT:
            _check_grouped(module, keep, self.width(module, kind, block, parts))
            idx = tile_units(keep, module.groups, self.width(module, kind, block, parts))
            replace_parameter_(module, "weight", idx, 0, optimizers)
            if module.bias is not None:
                replace_parameter_(module, "bias", idx, 0, optimizers)
            module.out_channels = int(idx.numel())
            return
        if kind == GCONV_IN:
            _check_grouped(module, keep, self.width(module, kind, block, parts))
            replace_parameter_(module, "weight", keep, 1, optimizers)
            module.in_channels = int(keep.numel()) * module.groups
            return
        fn = {CONV_OUT: shrink_conv_out_channels_, CONV_IN: shrink_conv_in_channels_,
              DEPTHWISE: shrink_depthwise_conv_channels_}[kind]
        fn(module, keep, optimizers)

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        if kind == GCONV_OUT:
            grow_grouped_conv_out_channels_(module, n, optimizers, init)
        elif kind == GCONV_IN:
            grow_parameter_(module, "weight", module.weight.new_zeros((module.weight.shape[0], n,
                                                                       *module.weight.shape[2:])), 1, optimizers)
            module.in_channels += n * module.groups
        elif kind == CONV_IN:
            grow_conv_in_channels_(module, n, optimizers)
        else:
            grow_conv_out_channels_(module, n, optimizers, init)
