"""Transposed convolutions (ConvTranspose1d/2d/3d, ``groups=1``): output and input channels.

Their weight is ``[in, out, *k]``, the transpose of a convolution's: the output channels are dimension 1 of the
weight (and the bias), the input channels dimension 0. Decoders, U-Nets and GAN generators upsample with them.
A grouped transposed convolution is refused.

Example::

    up = nn.ConvTranspose2d(32, 16, 2, stride=2)
    handler_for(up, TCONV_OUT).shrink_(up, TCONV_OUT, 0, (), torch.tensor([0, 3, 7]), optimizers)  # 16 -> 3
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn
from torch.optim import Optimizer

from ..optim import grow_parameter_, replace_parameter_
from ..shrink import _check_keep
from .base import Claim, ClaimContext, GrowInit, ParamSlice, SliceHandler, fan_in_bound, register

TCONV_OUT, TCONV_IN = "tconv_out", "tconv_in"
TCONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@register
class TransposedConvHandler(SliceHandler):
    kinds = {TCONV_OUT: "out", TCONV_IN: "in"}
    size_attrs = ("in_channels", "out_channels")
    priority = 79  # after ConvHandler, which leaves the transposed convolutions to this one

    def owns(self, module: nn.Module, kind: str) -> bool:
        return isinstance(module, TCONV_TYPES)

    def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
        if not isinstance(module, TCONV_TYPES):
            return None
        if module.groups != 1:
            return f"coupled to {type(module).__name__} '{{}}' (grouped transposed convolutions are not supported)"
        return Claim(TCONV_OUT if is_out else TCONV_IN)

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        return int(module.out_channels if kind == TCONV_OUT else module.in_channels)

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        if kind == TCONV_OUT:
            return [ParamSlice("", "weight", 1, None), ParamSlice("", "bias", 0, None)]
        return [ParamSlice("", "weight", 0, None)]

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        _check_keep(keep, self.width(module, kind, block, parts), f"{type(module).__name__} ({kind})")
        if kind == TCONV_OUT:
            replace_parameter_(module, "weight", keep, 1, optimizers)
            if module.bias is not None:
                replace_parameter_(module, "bias", keep, 0, optimizers)
            module.out_channels = int(keep.numel())
        else:
            replace_parameter_(module, "weight", keep, 0, optimizers)
            module.in_channels = int(keep.numel())

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        w = module.weight
        if kind == TCONV_IN:  # new inputs with zero weights: the output does not change
            grow_parameter_(module, "weight", w.new_zeros((n, *w.shape[1:])), 0, optimizers)
            module.in_channels += n
            return
        bound = fan_in_bound(nn.init._calculate_fan_in_and_fan_out(w)[0])  # torch's own init of the layer
        grow_parameter_(module, "weight", init.uniform(w, (w.shape[0], n, *w.shape[2:]), bound), 1, optimizers)
        if module.bias is not None:
            grow_parameter_(module, "bias", init.uniform(module.bias, (n,), bound), 0, optimizers)
        module.out_channels += n
