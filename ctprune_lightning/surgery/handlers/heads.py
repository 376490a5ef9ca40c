"""Head-structured attention modules of one's own (nanoGPT's ``c_attn``/``c_proj``, ``q/k/v_proj`` + ``o_proj``).

A head group lives inside one module (:meth:`AttentionHandler.own_group`); the module's input and output
widths (the residual stream) are ``attention_in`` / ``attention_out`` slices of channel groups. New heads get
q/k/v rows drawn like ``nn.Linear``'s init and a zero output projection.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import attention as attn
from .. import hf
from ..optim import grow_parameter_
from .base import Claim, ClaimContext, GrowInit, OwnGroup, ParamSlice, SliceHandler, fan_in_bound, register
from .linear import grow_linear_in_features_, grow_linear_out_features_

HEADS, ATTN_IN, ATTN_OUT = "heads", "attention_in", "attention_out"


def layout_of(module: nn.Module) -> attn.HeadLayout | None:
    """The head layout of an own attention module (Hugging Face modules belong to their own handler)."""
    lay = attn.find_head_layout(module)
    return lay if lay is not None and hf.find_hf_head_layout(module) is None else None


def section_positions(n_old: int, n: int, dim: int, sections: int) -> Tensor:
    """Rows of the grown q/k/v tensor that hold ``n`` new heads appended to each of ``sections`` sections."""
    total = (n_old + n) * dim
    new = torch.arange(n_old * dim, total)
    return torch.cat([new + s * total for s in range(sections)])


def grow_attention_heads_(module: nn.Module, n: int, optimizers: Sequence[Optimizer], init: GrowInit,
                          layout: attn.HeadLayout | None = None) -> None:
    """Append ``n`` heads: q/k/v rows drawn like ``nn.Linear``'s init, zero output-projection columns."""
    layout = layout or attn.find_head_layout(module)
    n_old, dim = attn.head_count(module, layout), attn.head_dim(module, layout)
    sections = 3 if layout.fused else 1
    rows = section_positions(n_old, n, dim, sections)
    for name in layout.qkv:
        lin = getattr(module, name)
        bound = fan_in_bound(lin.in_features)
        grow_parameter_(lin, "weight", init.uniform(lin.weight, (rows.numel(), lin.in_features), bound), 0,
                        optimizers, rows)
        if lin.bias is not None:
            grow_parameter_(lin, "bias", init.uniform(lin.bias, (rows.numel(),), bound), 0, optimizers, rows)
        lin.out_features += int(rows.numel())
    grow_linear_in_features_(getattr(module, layout.out), n * dim, optimizers)
    setattr(module, layout.n_head_attr, n_old + n)
    for a in attn.INNER_WIDTH_ATTRS:
        if isinstance(getattr(module, a, None), int):
            setattr(module, a, (n_old + n) * dim)


@register
class AttentionHandler(SliceHandler):
    kinds = {HEADS: "out", ATTN_IN: "in", ATTN_OUT: "out"}
    size_attrs = ("num_heads", "n_head", "head_dim")
    units = {HEADS: "head"}
    priority = 40

    def owns(self, module: nn.Module, kind: str) -> bool:
        return layout_of(module) is not None

    def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
        lay = layout_of(module)
        return None if lay is None else Claim(ATTN_OUT if is_out else ATTN_IN, lay.parts)

    def own_group(self, module: nn.Module) -> OwnGroup | None:
        lay = layout_of(module)
        if lay is None:
            return None
        why = attn.check_head_layout(module, lay)
        return OwnGroup(HEADS, lay.parts, None if why is None else f"attention heads: {why}", lay.parts)

    def trace_as_layer(self, module: nn.Module) -> tuple[int, int] | None:
        lay = layout_of(module)
        if lay is None:
            return None
        return getattr(module, lay.qkv[0]).in_features, getattr(module, lay.out).out_features

    def _layout(self, module: nn.Module, parts: tuple[str, ...]) -> attn.HeadLayout:
        lay = layout_of(module)
        return attn.HeadLayout(parts[:-1], parts[-1], lay.n_head_attr if lay else "")

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        if kind == HEADS:
            return attn.head_count(module, self._layout(module, parts))
        if kind == ATTN_IN:
            return int(module.get_submodule(parts[0]).in_features)
        return int(module.get_submodule(parts[-1]).out_features)

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        if kind == ATTN_IN:
            return [ParamSlice(q, "weight", 1, None) for q in parts[:-1]]
        if kind == ATTN_OUT:
            return [ParamSlice(parts[-1], "weight", 0, None), ParamSlice(parts[-1], "bias", 0, None)]
        lay = self._layout(module, parts)
        n, dim = attn.head_count(module, lay), attn.head_dim(module, lay)
        units = attn.head_units(n, dim, lay.fused)
        out = [ParamSlice(q, a, 0, units) for q in lay.qkv for a in ("weight", "bias")]
        return out + [ParamSlice(lay.out, "weight", 1, attn.head_units(n, dim, False))]

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        lay = self._layout(module, parts)
        fn = {HEADS: attn.shrink_attention_heads_, ATTN_IN: attn.shrink_attention_in_features_,
              ATTN_OUT: attn.shrink_attention_out_features_}[kind]
        fn(module, keep, optimizers, lay)

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        lay = self._layout(module, parts)
        if kind == HEADS:
            grow_attention_heads_(module, n, optimizers, init, lay)
        elif kind == ATTN_IN:
            for q in lay.qkv:
                grow_linear_in_features_(module.get_submodule(q), n, optimizers)
        else:
            grow_linear_out_features_(module.get_submodule(lay.out), n, optimizers, init)

    def scaled_modules(self, module_name: str, kind: str, parts: tuple[str, ...]) -> list[str]:
        if kind == HEADS:  # the attention module itself (SDPA), its q/k/v and output projections
            return [module_name] + [f"{module_name}.{p}" for p in parts]
        if kind == ATTN_IN:
            return [f"{module_name}.{p}" for p in parts[:-1]] or [module_name]
        return [f"{module_name}.{parts[-1]}"]
