"""What a prunable group is made of: tensor slices of named modules, cut along one dimension each.

A :class:`Slice` names a module (qualified name) and the *kind* of cut (which dimension of which of its
tensors). A :class:`PrunableGroup` is the set of slices that shrink together; one *unit* of the group
(a hidden neuron, a conv channel with its BatchNorm entries, an attention head) owns one index of every
slice (``block`` consecutive elements for a Linear fed by a flattened conv map, ``head_dim`` rows per
q/k/v section for a head).

Example::

    g = PrunableGroup("net.1", (Slice("net.1", LINEAR_OUT), Slice("net.3", LINEAR_IN)))
    g.width(model)                      # 64
    for name, p, dim, units in g.unit_slices(model): ...   # importance: one score per unit
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import attention as attn
from . import mha as pmha
from . import hf
from .balanced import reduce_lru_
from .shrink import (expand_units, shrink_conv_in_channels_, shrink_conv_out_channels_, shrink_embedding_dim_,
                     shrink_linear_in_features_, shrink_linear_out_features_, shrink_norm_)

LINEAR_OUT, LINEAR_IN, NORM = "linear_out", "linear_in", "norm"
CONV_OUT, CONV_IN = "conv_out", "conv_in"
EMBEDDING_DIM = "embedding_dim"
HEADS, ATTN_IN, ATTN_OUT = "heads", "attention_in", "attention_out"
SSM_STATE = "ssm_state"  # the state dimension of a diagonal SSM (LRU) layer, cut by balanced truncation
KINDS = (LINEAR_OUT, LINEAR_IN, NORM, CONV_OUT, CONV_IN, EMBEDDING_DIM, HEADS, ATTN_IN, ATTN_OUT, SSM_STATE)
OUT_KINDS = (LINEAR_OUT, CONV_OUT, EMBEDDING_DIM, HEADS, ATTN_OUT, SSM_STATE)  # kinds that produce the units
IN_KINDS = (LINEAR_IN, CONV_IN, ATTN_IN)  # kinds that consume them
KINDS, OUT_KINDS, IN_KINDS = (*KINDS, *hf.KINDS), (*OUT_KINDS, hf.CONV1D_OUT, hf.HF_HEADS), (*IN_KINDS, hf.CONV1D_IN)


class UnitSlice(NamedTuple):
    """One parameter slice: ``units[i]`` is the unit owning index ``i`` along ``dim`` (None: index = unit)."""

    name: str
    param: Tensor
    dim: int
    units: Tensor | None


@dataclass(frozen=True)
class Slice:
    """One module of a group, cut along ``kind``; ``block`` elements per unit; ``parts``: children it cuts."""

    module: str
    kind: str  # one of KINDS
    block: int = 1
    parts: tuple[str, ...] = ()  # attention kinds: (q/k/v projections..., output projection)

    def layout(self) -> attn.HeadLayout:
        return attn.HeadLayout(self.parts[:-1], self.parts[-1], "")

    def scaled_modules(self) -> list[str]:
        """Modules whose own FLOPs scale linearly with this slice's width."""
        if self.kind in hf.KINDS:
            return hf.scaled_modules(self.module, self.kind, self.parts)
        if self.kind == HEADS:  # the attention module itself (SDPA), its q/k/v and output projections
            return [self.module] + [f"{self.module}.{p}" for p in self.parts]
        if self.kind == ATTN_IN:  # a PrunableMultiheadAttention projects q/k/v in its own forward
            return [f"{self.module}.{p}" for p in self.parts[:-1]] or [self.module]
        if self.kind == ATTN_OUT:
            return [f"{self.module}.{self.parts[-1]}"]
        return [self.module]

    def width(self, model: nn.Module) -> int:
        """Number of units along this slice."""
        m = model.get_submodule(self.module)
        if self.kind in hf.KINDS:
            return hf.slice_width(m, self.kind)
        if isinstance(m, pmha.PrunableMultiheadAttention) and self.kind in (HEADS, ATTN_IN):
            return int(m.num_heads) if self.kind == HEADS else int(m.embed_dim)
        if self.kind == LINEAR_OUT:
            return int(m.out_features)
        if self.kind == LINEAR_IN:
            return int(m.in_features) // self.block
        if self.kind == CONV_OUT:
            return int(m.out_channels)
        if self.kind == CONV_IN:
            return int(m.in_channels)
        if self.kind == EMBEDDING_DIM:
            return int(m.embedding_dim)
        if self.kind == NORM:
            return int(m.normalized_shape[0]) if isinstance(m, nn.LayerNorm) else int(m.num_features)
        if self.kind == HEADS:
            return int(getattr(m, _head_attr(m)))
        if self.kind == ATTN_IN:
            return int(m.get_submodule(self.parts[0]).in_features)
        if self.kind == ATTN_OUT:
            return int(m.get_submodule(self.parts[-1]).out_features)
        if self.kind == SSM_STATE:
            return int(m.state_dim)
        raise ValueError(f"unknown slice kind {self.kind!r}; known: {KINDS}")

    def unit_slices(self, model: nn.Module) -> list[UnitSlice]:
        m = model.get_submodule(self.module)
        out: list[UnitSlice] = []

        def add(owner: str, name: str, dim: int, units: Tensor | None = None) -> None:
            p = getattr(model.get_submodule(owner), name, None)
            if isinstance(p, Tensor):
                out.append(UnitSlice(f"{owner}.{name}", p, dim, units))

        if self.kind in (LINEAR_OUT, CONV_OUT, NORM):
            add(self.module, "weight", 0)
            add(self.module, "bias", 0)
        elif self.kind in (LINEAR_IN, CONV_IN):
            units = None if self.block == 1 else torch.arange(self.width(model)).repeat_interleave(self.block)
            add(self.module, "weight", 1, units)
        elif self.kind == EMBEDDING_DIM:
            add(self.module, "weight", 1)
        elif isinstance(m, pmha.PrunableMultiheadAttention) and self.kind in (HEADS, ATTN_IN):
            for pname, dim, units in (pmha.mha_head_slices(m) if self.kind == HEADS else [("in_proj_weight", 1, None)]):
                owner, _, attr = f"{self.module}.{pname}".rpartition(".")
                add(owner, attr, dim, units)
        elif self.kind == HEADS:
            n = int(getattr(m, _head_attr(m)))
            dim = m.get_submodule(self.parts[-1]).in_features // n
            fused = len(self.parts) == 2
            for q in self.parts[:-1]:
                add(f"{self.module}.{q}", "weight", 0, attn.head_units(n, dim, fused))
                add(f"{self.module}.{q}", "bias", 0, attn.head_units(n, dim, fused))
            add(f"{self.module}.{self.parts[-1]}", "weight", 1, attn.head_units(n, dim, False))
        elif self.kind == ATTN_IN:
            for q in self.parts[:-1]:
                add(f"{self.module}.{q}", "weight", 1)
        elif self.kind == ATTN_OUT:
            add(f"{self.module}.{self.parts[-1]}", "weight", 0)
            add(f"{self.module}.{self.parts[-1]}", "bias", 0)
        elif self.kind in hf.KINDS:  # Conv1D, Hugging Face heads: the slices are listed by hf
            for ps in hf.param_slices(m, self.kind):
                add(f"{self.module}.{ps.owner}" if ps.owner else self.module, ps.name, ps.dim, ps.units)
        # SSM_STATE: a unit is a *balanced* state, owning no parameter slice (scores: Hankel singular values)
        return out

    def shrink_(self, model: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
        """Cut this slice down to the units ``keep`` (sorted, unique)."""
        m = model.get_submodule(self.module)
        if self.kind == LINEAR_OUT:
            shrink_linear_out_features_(m, keep, optimizers)
        elif self.kind == LINEAR_IN:
            shrink_linear_in_features_(m, expand_units(keep, self.block), optimizers)
        elif self.kind == CONV_OUT:
            shrink_conv_out_channels_(m, keep, optimizers)
        elif self.kind == CONV_IN:
            shrink_conv_in_channels_(m, keep, optimizers)
        elif self.kind == EMBEDDING_DIM:
            shrink_embedding_dim_(m, keep, optimizers)
        elif self.kind == NORM:
            shrink_norm_(m, keep, optimizers)
        elif isinstance(m, pmha.PrunableMultiheadAttention) and self.kind in (HEADS, ATTN_IN, ATTN_OUT):
            {HEADS: pmha.shrink_mha_heads_, ATTN_IN: pmha.shrink_mha_embed_in_,
             ATTN_OUT: pmha.shrink_mha_embed_out_}[self.kind](m, keep, optimizers)
        elif self.kind == HEADS:
            layout = attn.HeadLayout(self.parts[:-1], self.parts[-1], _head_attr(m))
            attn.shrink_attention_heads_(m, keep, optimizers, layout)
        elif self.kind == ATTN_IN:
            attn.shrink_attention_in_features_(m, keep, optimizers, self.layout())
        elif self.kind == ATTN_OUT:
            attn.shrink_attention_out_features_(m, keep, optimizers, self.layout())
        elif self.kind in hf.KINDS:
            hf.shrink_slice_(m, self.kind, keep, optimizers)
        elif self.kind == SSM_STATE:  # keep = balanced states (arange(r) keeps the r largest σ)
            reduce_lru_(m, keep, optimizers)
        else:
            raise ValueError(f"unknown slice kind {self.kind!r}; known: {KINDS}")


def _head_attr(module: nn.Module) -> str:
    return next(a for a in attn.HEAD_COUNT_ATTRS if isinstance(getattr(module, a, None), int))


@dataclass(frozen=True)
class PrunableGroup:
    """Slices that shrink together; ``name`` is the producing layer (the first slice).

    ``min_width`` / ``round_to``: this group's own limits (None: the planner's defaults apply).
    """

    name: str
    slices: tuple[Slice, ...]
    min_width: int | None = None
    round_to: int | None = None

    @property
    def unit(self) -> str:
        """What one unit is: ``"head"``, ``"state"`` (SSM, balanced basis) or ``"channel"``."""
        return {HEADS: "head", hf.HF_HEADS: "head", SSM_STATE: "state"}.get(self.slices[0].kind, "channel")

    def width(self, model: nn.Module) -> int:
        """Number of units the group has now."""
        return self.slices[0].width(model)

    def unit_slices(self, model: nn.Module) -> list[UnitSlice]:
        """Every parameter slice of the group with the unit of each index (for importance criteria)."""
        return [u for s in self.slices for u in s.unit_slices(model)]

    def param_slices(self, model: nn.Module) -> list[tuple[str, Tensor, int]]:
        """``(qualified parameter name, parameter, dim)`` for every parameter slice of the group.

        Along ``dim`` there is one index per unit, except for attention heads and flattened conv maps
        (several indices per unit): use :meth:`unit_slices` to map indices to units.
        """
        return [(u.name, u.param, u.dim) for u in self.unit_slices(model)]

    def scaled_modules(self) -> list[str]:
        return [m for s in self.slices for m in s.scaled_modules()]


def tied_parameters(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """Parameters owned by more than one module: ``id(param) -> [(module name, attribute), ...]``."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for mname, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, attr))
    return {k: v for k, v in owners.items() if len(v) > 1}


def _retie_(model: nn.Module, ties: Mapping[int, list[tuple[str, str]]], optimizers: Sequence[Optimizer]) -> None:
    """After a cut, make every owner of a tied Parameter hold the same (optimizer's) new Parameter."""
    in_opt = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    for owners in ties.values():
        params = [getattr(model.get_submodule(m), a) for m, a in owners]
        if all(p is params[0] for p in params):
            continue
        keep = next((p for p in params if id(p) in in_opt), params[0])
        if any(p.shape != keep.shape for p in params):
            names = [f"{m}.{a}" for m, a in owners]
            shapes = [tuple(p.shape) for p in params]
            raise RuntimeError(f"tied parameters {names} were cut to different shapes {shapes}")
        for (m, a), p in zip(owners, params):
            if p is not keep:
                setattr(model.get_submodule(m), a, keep)


def apply_plan_(
    model: nn.Module,
    groups: Sequence[PrunableGroup],
    plan: Mapping[str, Tensor],
    optimizers: Iterable[Optimizer] = (),
) -> None:
    """Shrink every group named in ``plan`` to its kept unit indices (sorted, unique).

    Raises ``KeyError`` for a plan entry that names no group (nothing is changed then). Parameters tied
    across modules (same object) stay tied: all owners hold the one new Parameter the optimizer holds.
    """
    by_name = {g.name: g for g in groups}
    unknown = sorted(set(plan) - set(by_name))
    if unknown:
        raise KeyError(f"plan names unknown groups {unknown}; known groups: {sorted(by_name)}")
    optimizers = list(optimizers)
    ties = tied_parameters(model)
    for name, keep in plan.items():
        keep = torch.as_tensor(keep, dtype=torch.long).unique(sorted=True)
        for s in by_name[name].slices:
            s.shrink_(model, keep, optimizers)
        if ties:
            _retie_(model, ties, optimizers)
    hf.sync_sizes_(model)  # per-layer sizes kept beside the tensors (a Llama MLP's intermediate_size)


def arch_spec(model: nn.Module, groups: Sequence[PrunableGroup]) -> tuple[tuple[str, int], ...]:
    """A hashable description of the current widths (the FLOPs cache key)."""
    return tuple((g.name, g.width(model)) for g in groups)
