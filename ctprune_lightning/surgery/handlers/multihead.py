"""``nn.MultiheadAttention`` (refused, with the way out) and its prunable drop-in
:class:`~ctprune_lightning.surgery.mha.PrunableMultiheadAttention`: heads, and the residual (embed) width.

New heads get q/k/v rows drawn like the module's xavier init, zero ``in_proj_bias`` entries, and zero
output-projection columns.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from torch import Tensor, nn
from torch.optim import Optimizer

from .. import attention as attn
from .. import mha as pmha
from ..optim import grow_parameter_
from .base import Claim, ClaimContext, GrowInit, OwnGroup, ParamSlice, SliceHandler, fan_in_bound, register
from .heads import ATTN_IN, ATTN_OUT, HEADS, section_positions
from .linear import grow_linear_in_features_


def grow_mha_heads_(module: pmha.PrunableMultiheadAttention, n: int, optimizers: Sequence[Optimizer],
                    init: GrowInit) -> None:
    """Append ``n`` heads to a :class:`PrunableMultiheadAttention` (``embed_dim`` unchanged)."""
    n_old, dim = module.num_heads, module.head_dim
    inner = n_old * dim
    packed, section = section_positions(n_old, n, dim, 3), section_positions(n_old, n, dim, 1)
    if module.in_proj_weight is not None:
        w = module.in_proj_weight
        bound = math.sqrt(6.0 / (w.shape[1] + w.shape[0]))
        grow_parameter_(module, "in_proj_weight", init.uniform(w, (packed.numel(), w.shape[1]), bound), 0,
                        optimizers, packed)
    else:
        for name in pmha.PROJ_WEIGHTS:
            w = getattr(module, name)
            bound = math.sqrt(6.0 / (w.shape[1] + w.shape[0]))
            grow_parameter_(module, name, init.uniform(w, (section.numel(), w.shape[1]), bound), 0, optimizers)
    if module.in_proj_bias is not None:
        grow_parameter_(module, "in_proj_bias", module.in_proj_bias.new_zeros(packed.numel()), 0, optimizers, packed)
    for name in ("bias_k", "bias_v"):
        b = getattr(module, name)
        if b is not None:
            std = math.sqrt(2.0 / (1 + inner))
            grow_parameter_(module, name, init.normal(b, (1, 1, n * dim), std), 2, optimizers)
    grow_linear_in_features_(module.out_proj, n * dim, optimizers)
    module.num_heads = n_old + n


@register
class MultiheadAttentionHandler(SliceHandler):
    kinds = {HEADS: "out", ATTN_IN: "in", ATTN_OUT: "out"}
    size_attrs = ("embed_dim", "kdim", "vdim", "num_heads", "head_dim")
    units = {HEADS: "head"}
    priority = 30

    def owns(self, module: nn.Module, kind: str) -> bool:
        return isinstance(module, pmha.PrunableMultiheadAttention)

    def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
        if isinstance(module, pmha.PrunableMultiheadAttention):  # its residual (embed_dim) side
            why = pmha.embed_refusal(module)
            if why is not None:
                return f"coupled to the residual width of attention '{{}}' ({why})"
            return Claim(ATTN_OUT if is_out else ATTN_IN, pmha.MHA_PARTS)
        if isinstance(module, nn.MultiheadAttention):
            return ("coupled to nn.MultiheadAttention '{}', whose embed_dim ties its input, q/k/v and output "
                    "widths (not supported; convert_multihead_attention_ makes it prunable)")
        return None

    def own_group(self, module: nn.Module) -> OwnGroup | None:
        if isinstance(module, pmha.PrunableMultiheadAttention):
            return OwnGroup(HEADS, pmha.MHA_PARTS, None, ("out_proj",))
        if isinstance(module, nn.MultiheadAttention):  # left dense with the way out, every child covered
            return OwnGroup(HEADS, (), attn.MHA_REASON, tuple(n for n, _ in module.named_modules() if n))
        return None

    def trace_as_layer(self, module: nn.Module) -> tuple[int, int] | None:
        if not isinstance(module, pmha.PrunableMultiheadAttention):
            return None
        w = module.in_proj_weight if module.in_proj_weight is not None else module.q_proj_weight
        return int(w.shape[1]), int(module.out_proj.out_features)

    def trace_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return pmha._stand_in(module, args, kwargs, output)

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        if kind == HEADS:
            return int(module.num_heads)
        return int(module.embed_dim) if kind == ATTN_IN else int(module.out_proj.out_features)

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        if kind == ATTN_IN:
            return [ParamSlice("", "in_proj_weight", 1, None)]
        if kind == ATTN_OUT:
            return [ParamSlice("out_proj", "weight", 0, None), ParamSlice("out_proj", "bias", 0, None)]
        out = []
        for pname, dim, units in pmha.mha_head_slices(module):
            owner, _, attr = pname.rpartition(".")
            out.append(ParamSlice(owner, attr, dim, units))
        return out

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        fn = {HEADS: pmha.shrink_mha_heads_, ATTN_IN: pmha.shrink_mha_embed_in_,
              ATTN_OUT: pmha.shrink_mha_embed_out_}[kind]
        fn(module, keep, optimizers)

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        if kind == HEADS:
            grow_mha_heads_(module, n, optimizers, init)
        elif kind == ATTN_IN:
            w = module.in_proj_weight
            grow_parameter_(module, "in_proj_weight", w.new_zeros(w.shape[0], n), 1, optimizers)
            module.embed_dim = module.kdim = module.vdim = int(module.in_proj_weight.shape[1])
        else:
            out = module.out_proj
            bound = fan_in_bound(out.in_features)
            grow_parameter_(out, "weight", init.uniform(out.weight, (n, out.in_features), bound), 0, optimizers)
            if out.bias is not None:
                grow_parameter_(out, "bias", out.bias.new_zeros(n), 0, optimizers)
            out.out_features = module.embed_dim = int(out.weight.shape[0])

    def scaled_modules(self, module_name: str, kind: str, parts: tuple[str, ...]) -> list[str]:
        if kind == HEADS:
            return [module_name, f"{module_name}.out_proj"]
        if kind == ATTN_IN:  # the module projects q/k/v in its own forward
            return [module_name]
        return [f"{module_name}.out_proj"]
