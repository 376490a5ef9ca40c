"""BatchNorm and InstanceNorm channels, 1-D LayerNorm / RMSNorm features, GroupNorm channels (pass-through slices
of a group).

New BatchNorm (InstanceNorm) entries are neutral: weight 1, bias 0, running mean 0, running variance 1. A
LayerNorm's or an RMSNorm's features cannot grow function-preservingly (the new features enter every feature's
mean and variance, or root mean square), so a group that holds one refuses to grow. A GroupNorm of several groups
is cut and grown in whole groups (discovery makes each unit of its group one of its groups: :mod:`.blocked`); new
groups normalise only their own channels, so growth preserves the function. A GroupNorm of one group is cut per
channel and, like a LayerNorm, refuses to grow.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..optim import grow_buffer_, grow_parameter_
from ..shrink import CHANNEL_NORMS, FEATURE_NORMS, shrink_norm_
from .base import Claim, ClaimContext, GrowInit, ParamSlice, SliceHandler, register, stand_in

NORM = "norm"


def grow_batchnorm_(norm: nn.Module, n: int, optimizers: Sequence[Optimizer]) -> None:
    """Append ``n`` neutral channels (weight 1, bias 0, running mean 0, running variance 1); a GroupNorm's ``n``
    make ``n / (channels per group)`` new groups."""
    if isinstance(norm, nn.GroupNorm):
        per = norm.num_channels // norm.num_groups
        if n % per:
            raise ValueError(f"cannot grow {norm!r} by {n} channels: it grows in whole groups of {per}")
    for name, fill in (("weight", 1.0), ("bias", 0.0)):
        p = getattr(norm, name, None)
        if p is not None:
            grow_parameter_(norm, name, torch.full((n,), fill, dtype=p.dtype, device=p.device), 0, optimizers)
    for name, fill in (("running_mean", 0.0), ("running_var", 1.0)):
        b = getattr(norm, name, None)
        if b is not None:
            grow_buffer_(norm, name, torch.full((n,), fill, dtype=b.dtype, device=b.device))
    if isinstance(norm, nn.GroupNorm):
        norm.num_groups += n // per
        norm.num_channels += n
    else:
        norm.num_features += n


@register
class NormHandler(SliceHandler):
    kinds = {NORM: "through"}
    size_attrs = ("num_features", "normalized_shape", "num_channels", "num_groups")
    priority = 70

    def owns(self, module: nn.Module, kind: str) -> bool:
        return isinstance(module, (*CHANNEL_NORMS, *FEATURE_NORMS, nn.GroupNorm))

    def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
        if isinstance(module, (*CHANNEL_NORMS, nn.GroupNorm)):
            return Claim(NORM)
        if isinstance(module, FEATURE_NORMS):
            if len(module.normalized_shape) != 1:
                return f"coupled to {type(module).__name__} '{{}}' over {tuple(module.normalized_shape)} (1-D only)"
            return Claim(NORM)
        return None

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        if isinstance(module, nn.GroupNorm):
            return int(module.num_channels)
        return int(module.normalized_shape[0]) if isinstance(module, FEATURE_NORMS) else int(module.num_features)

    def trace_as_layer(self, module: nn.Module) -> tuple[int, int] | None:
        """torch's RMSNorm is unknown to the dependency tracer (its weight would read as a bare Parameter): one
        opaque pass-through layer instead."""
        if isinstance(module, nn.RMSNorm) and len(module.normalized_shape) == 1:
            return int(module.normalized_shape[0]), int(module.normalized_shape[0])
        return None

    def trace_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return stand_in(args[0], int(module.normalized_shape[0])) if args else None

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        return [ParamSlice("", "weight", 0, None), ParamSlice("", "bias", 0, None)]

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        shrink_norm_(module, keep, optimizers)

    def grow_refusal(self, module: nn.Module, kind: str) -> str | None:
        if isinstance(module, FEATURE_NORMS) or (isinstance(module, nn.GroupNorm) and module.num_groups == 1):
            return (f"a {type(module).__name__} normalises over the grown features: new features would change every "
                    "feature's normalisation, so growth would not preserve the model's function")
        return None

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        why = self.grow_refusal(module, kind)
        if why:
            raise ValueError(f"cannot grow {type(module).__name__}: {why}")
        grow_batchnorm_(module, n, optimizers)
