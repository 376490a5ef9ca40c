"""Attention heads as prunable units.

A *head-structured* attention module keeps its head count in an integer attribute (``n_head`` or
``num_heads``) that its forward reads, and projects with Linear children, either fused (``c_attn`` laid out
[q | k | v], each head-major, as in nanoGPT, or timm's ``qkv``) or separate (``q_proj``, ``k_proj``,
``v_proj``), then an output projection (``c_proj``, ``out_proj``, ``o_proj`` or timm's ``proj``). Removing
head ``h`` removes its rows of every q/k/v projection and its input columns of the output projection; the
module's input and output widths (the residual stream) do not change.

``nn.MultiheadAttention`` is *not* head-prunable: ``F.multi_head_attention_forward`` requires
``in_proj_weight`` of shape (3E, E) and ``head_dim = E // num_heads``, where E = ``embed_dim`` is also
the width of its input and output, so dropping a head would change the residual width. It is left
dense (see :data:`MHA_REASON`) unless converted to the drop-in
:class:`ctprune_lightning.surgery.mha.PrunableMultiheadAttention` (same forward and state dict, free
inner width) with :func:`ctprune_lightning.surgery.mha.convert_multihead_attention_`.

Example::

    layout = find_head_layout(block.attn)          # HeadLayout(qkv=('c_attn',), out='c_proj', ...)
    shrink_attention_heads_(block.attn, torch.tensor([0, 2]), optimizers)   # 4 heads -> 2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .shrink import _check_keep, expand_units, shrink_linear_in_features_, shrink_linear_out_features_

MHA_REASON = ("nn.MultiheadAttention heads cannot be pruned without changing embed_dim, its input/output (residual) "
              "width: F.multi_head_attention_forward requires in_proj_weight of shape (3*embed_dim, embed_dim) and "
              "head_dim = embed_dim // num_heads; left dense. To prune its heads, convert it before the optimizer is "
              "built: ctprune_lightning.surgery.convert_multihead_attention_(model) replaces every "
              "nn.MultiheadAttention by PrunableMultiheadAttention (same forward and state dict)")
HEAD_COUNT_ATTRS = ("n_head", "num_heads")
OUT_NAMES = ("c_proj", "out_proj", "o_proj", "proj")
FUSED_NAMES = ("c_attn", "qkv")  # one Linear laid out [q | k | v], each head-major
INNER_WIDTH_ATTRS = ("inner_dim", "all_head_size")  # bookkeeping some modules keep; updated when present


@dataclass(frozen=True)
class HeadLayout:
    """Where a head-structured attention module keeps its projections and head count."""

    qkv: tuple[str, ...]  # ("c_attn",) fused [q|k|v] or ("q_proj", "k_proj", "v_proj")
    out: str
    n_head_attr: str

    @property
    def fused(self) -> bool:
        return len(self.qkv) == 1

    @property
    def parts(self) -> tuple[str, ...]:
        return (*self.qkv, self.out)


def _linear_child(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def find_head_layout(module: nn.Module) -> HeadLayout | None:
    """The layout of a head-structured attention module, or None when ``module`` is not one."""
    if isinstance(module, nn.MultiheadAttention):
        return None
    attr = next((a for a in HEAD_COUNT_ATTRS if isinstance(getattr(module, a, None), int)
                 and not isinstance(getattr(module, a), bool)), None)
    out = next((n for n in OUT_NAMES if _linear_child(module, n) is not None), None)
    if attr is None or out is None:
        return None
    fused = next((n for n in FUSED_NAMES if _linear_child(module, n) is not None), None)
    if fused is not None:
        return HeadLayout((fused,), out, attr)
    if all(_linear_child(module, n) is not None for n in ("q_proj", "k_proj", "v_proj")):
        return HeadLayout(("q_proj", "k_proj", "v_proj"), out, attr)
    return None


def head_count(module: nn.Module, layout: HeadLayout) -> int:
    return int(getattr(module, layout.n_head_attr))


def head_dim(module: nn.Module, layout: HeadLayout) -> int:
    """Width of one head (the output projection's inputs per head)."""
    return getattr(module, layout.out).in_features // head_count(module, layout)


def check_head_layout(module: nn.Module, layout: HeadLayout) -> str | None:
    """Why the heads of ``module`` cannot be pruned (shapes disagree with the head count), or None."""
    n, out = head_count(module, layout), getattr(module, layout.out)
    if n < 1 or out.in_features % n:
        return f"output projection width {out.in_features} is not a multiple of {layout.n_head_attr}={n}"
    inner = out.in_features
    for kv_attr in ("num_key_value_heads", "n_kv_head", "n_kv_heads"):
        kv = getattr(module, kv_attr, None)
        if isinstance(kv, int) and kv != n:
            return f"grouped-query attention ({kv_attr}={kv} != {layout.n_head_attr}={n}) is not supported"
    widths = [getattr(module, q).out_features for q in layout.qkv]
    expected = [3 * inner] if layout.fused else [inner] * 3
    if widths != expected:
        return f"q/k/v projection widths {widths} do not match {n} heads of width {inner // n}"
    return None


def head_rows(keep: Tensor, n_head: int, dim: int, fused: bool) -> Tensor:
    """Rows of a q/k/v projection that belong to the heads ``keep`` (all three sections when fused)."""
    rows = expand_units(keep, dim)
    if not fused:
        return rows
    return torch.cat([rows + s * n_head * dim for s in range(3)])


def head_units(n_head: int, dim: int, fused: bool) -> Tensor:
    """Head index of every row of a q/k/v projection (or column of the output projection if not fused)."""
    units = torch.arange(n_head).repeat_interleave(dim)
    return units.repeat(3) if fused else units


def shrink_attention_heads_(attn: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = (),
                            layout: HeadLayout | None = None) -> None:
    """Keep only the heads ``keep`` of a head-structured attention module (``n_head`` is updated)."""
    layout = layout or find_head_layout(attn)
    if layout is None:
        raise TypeError(f"shrink_attention_heads_: {type(attn).__name__} is not a head-structured attention module "
                        f"(needs an int {' or '.join(HEAD_COUNT_ATTRS)} and Linear {' or '.join(FUSED_NAMES)} or "
                        f"q/k/v_proj and {'/'.join(OUT_NAMES)})"
                        + (f"; {MHA_REASON}" if isinstance(attn, nn.MultiheadAttention) else ""))
    reason = check_head_layout(attn, layout)
    if reason:
        raise ValueError(f"shrink_attention_heads_: {reason}")
    n, dim = head_count(attn, layout), head_dim(attn, layout)
    _check_keep(keep, n, "shrink_attention_heads_")
    optimizers = list(optimizers)
    rows = head_rows(keep, n, dim, layout.fused)
    for name in layout.qkv:
        shrink_linear_out_features_(getattr(attn, name), rows, optimizers)
    shrink_linear_in_features_(getattr(attn, layout.out), expand_units(keep, dim), optimizers)
    setattr(attn, layout.n_head_attr, int(keep.numel()))
    for attr in INNER_WIDTH_ATTRS:
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, int(keep.numel()) * dim)


def shrink_attention_in_features_(attn: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = (),
                                  layout: HeadLayout | None = None) -> None:
    """Keep only the input features ``keep`` of every q/k/v projection (the residual width going in)."""
    layout = layout or find_head_layout(attn)
    optimizers = list(optimizers)
    for name in layout.qkv:
        shrink_linear_in_features_(getattr(attn, name), keep, optimizers)


def shrink_attention_out_features_(attn: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = (),
                                   layout: HeadLayout | None = None) -> None:
    """Keep only the output features ``keep`` of the output projection (the residual width coming out)."""
    layout = layout or find_head_layout(attn)
    shrink_linear_out_features_(getattr(attn, layout.out), keep, optimizers)
