"""What a prunable group is made of: tensor slices of named modules, cut along one dimension each.

A :class:`Slice` names a module (qualified name) and the *kind* of cut (which dimension of which of its
tensors). A :class:`PrunableGroup` is the set of slices that shrink together; one *unit* of the group
(a hidden neuron, a conv channel with its BatchNorm entries, an attention head) owns one index of every
slice (``block`` consecutive elements for a Linear fed by a flattened conv map, ``head_dim`` rows per
q/k/v section for a head). This module is the plan executor: every width, slice list, cut and growth is
asked of the slice handler of the slice's kind (:mod:`.handlers`, one file per layer family).

Example::

    g = PrunableGroup("net.1", (Slice("net.1", LINEAR_OUT), Slice("net.3", LINEAR_IN)))
    g.width(model)                      # 64
    for name, p, dim, units in g.unit_slices(model): ...   # importance: one score per unit
    g.grow_(model, 8, optimizers)       # 72: eight new units, the outputs unchanged
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import hf
from .handlers import GrowInit, handler_for, handler_of_kind, role_of, unit_of
from .handlers.conv import CONV_IN, CONV_OUT, DEPTHWISE
from .handlers.embedding import EMBEDDING_DIM
from .handlers.heads import ATTN_IN, ATTN_OUT, HEADS
from .handlers.linear import LINEAR_IN, LINEAR_OUT
from .handlers.norm import NORM
from .handlers.ssm import SSM_STATE

__all__ = ["ATTN_IN", "ATTN_OUT", "CONV_IN", "CONV_OUT", "DEPTHWISE", "EMBEDDING_DIM", "HEADS", "LINEAR_IN",
           "LINEAR_OUT", "NORM", "SSM_STATE", "PrunableGroup", "Slice", "UnitSlice", "apply_plan_", "arch_spec",
           "tied_parameters"]


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
    kind: str  # a kind some registered handler knows (handlers.all_kinds())
    block: int = 1
    parts: tuple[str, ...] = ()  # attention kinds: (q/k/v projections..., output projection)

    @property
    def role(self) -> str:
        """``"out"`` (produces the group's units), ``"in"`` (consumes them) or ``"through"``."""
        return role_of(self.kind)

    def scaled_modules(self) -> list[str]:
        """Modules whose own FLOPs scale linearly with this slice's width (families sharing a kind agree)."""
        return handler_of_kind(self.kind).scaled_modules(self.module, self.kind, self.parts)

    def width(self, model: nn.Module) -> int:
        """Number of units along this slice."""
        m = model.get_submodule(self.module)
        return handler_for(m, self.kind).width(m, self.kind, self.block, self.parts)

    def unit_slices(self, model: nn.Module) -> list[UnitSlice]:
        m = model.get_submodule(self.module)
        out: list[UnitSlice] = []
        for owner, name, dim, units in handler_for(m, self.kind).unit_slices(m, self.kind, self.block, self.parts):
            qualified = f"{self.module}.{owner}" if owner else self.module
            p = getattr(model.get_submodule(qualified), name, None)
            if isinstance(p, Tensor):
                out.append(UnitSlice(f"{qualified}.{name}", p, dim, units))
        return out

    def shrink_(self, model: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
        """Cut this slice down to the units ``keep`` (sorted, unique)."""
        m = model.get_submodule(self.module)
        handler_for(m, self.kind).shrink_(m, self.kind, self.block, self.parts, keep, list(optimizers))

    def grow_(self, model: nn.Module, n: int, optimizers: Iterable[Optimizer] = (),
              init: GrowInit | None = None) -> None:
        """Append ``n`` units to this slice (function-preserving once every slice of the group has grown)."""
        m = model.get_submodule(self.module)
        handler_for(m, self.kind).grow_(m, self.kind, self.block, self.parts, n, list(optimizers), init or GrowInit())

    def grow_refusal(self, model: nn.Module) -> str | None:
        m = model.get_submodule(self.module)
        return handler_for(m, self.kind).grow_refusal(m, self.kind)


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
        return unit_of(self.slices[0].kind)

    def width(self, model: nn.Module) -> int:
        """Number of units the group has now."""
        return self.slices[0].width(model)

    def unit_slices(self, model: nn.Module) -> list[UnitSlice]:
        """Every parameter slice of the group with the unit of each index (for importance criteria)."""
        return [u for s in self.slices for u in s.unit_slices(model)]

    def scaled_modules(self) -> list[str]:
        return [m for s in self.slices for m in s.scaled_modules()]

    def grow_refusal(self, model: nn.Module, ties: Mapping[int, list[tuple[str, str]]] | None = None) -> str | None:
        """Why this group cannot grow function-preservingly, or None."""
        for s in self.slices:
            why = s.grow_refusal(model)
            if why:
                return f"'{s.module}': {why}"
        ties = tied_parameters(model) if ties is None else ties
        tied = sorted({u.name for u in self.unit_slices(model) if id(u.param) in ties})
        if tied:
            return f"tied weights {tied}: one tensor would get drawn and zero entries at once"
        return None

    def grow_(self, model: nn.Module, n: int, optimizers: Iterable[Optimizer] = (),
              init: GrowInit | None = None) -> None:
        """Add ``n`` units at the end of every slice; the model's function does not change (see
        :mod:`.handlers.base`). Raises ``ValueError`` (nothing changed) when the group cannot grow."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"group '{self.name}': the number of units to add must be an integer >= 1, got {n!r}")
        why = self.grow_refusal(model)
        if why:
            raise ValueError(f"group '{self.name}' cannot grow: {why}")
        optimizers, init = list(optimizers), init or GrowInit()
        for s in self.slices:
            s.grow_(model, n, optimizers, init)


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


def grow_seed(model: nn.Module, groups: Sequence[PrunableGroup], grow: Mapping[str, int]) -> int:
    """A seed for the new units' draws from the plan and the current widths: the same on every rank."""
    widths = {g.name: g.width(model) for g in groups if g.name in grow}
    return zlib.crc32(repr(sorted((n, widths[n], int(k)) for n, k in grow.items())).encode())


def apply_plan_(
    model: nn.Module,
    groups: Sequence[PrunableGroup],
    plan: Mapping[str, Tensor],
    optimizers: Iterable[Optimizer] = (),
    *,
    grow: Mapping[str, int] | None = None,
    init: GrowInit | None = None,
) -> None:
    """Shrink every group named in ``plan`` to its kept unit indices (sorted, unique), then add
    ``grow[name]`` units to every group named in ``grow`` (function-preserving, see :meth:`PrunableGroup.grow_`).

    Raises ``KeyError`` for an entry that names no group and ``ValueError`` for a growth that is not a
    positive int or that a group refuses (nothing is changed then). ``init`` draws the new incoming weights
    (default: ``GrowInit(seed=grow_seed(...))``, identical on every rank). Parameters tied across modules
    (same object) stay tied: all owners hold the one new Parameter the optimizer holds.
    """
    by_name = {g.name: g for g in groups}
    grow = dict(grow or {})
    unknown = sorted((set(plan) | set(grow)) - set(by_name))
    if unknown:
        raise KeyError(f"plan names unknown groups {unknown}; known groups: {sorted(by_name)}")
    bad = {n: k for n, k in grow.items() if isinstance(k, bool) or not isinstance(k, int) or k < 1}
    if bad:
        raise ValueError(f"grow: units to add must be integers >= 1, got {bad}")
    ties = tied_parameters(model)
    refusals = {n: why for n in grow if (why := by_name[n].grow_refusal(model, ties))}
    if refusals:
        raise ValueError(f"grow: these groups cannot grow function-preservingly: {refusals}")
    optimizers = list(optimizers)
    for name, keep in plan.items():
        keep = torch.as_tensor(keep, dtype=torch.long).unique(sorted=True)
        for s in by_name[name].slices:
            s.shrink_(model, keep, optimizers)
        if ties:
            _retie_(model, ties, optimizers)
    if grow:
        init = init or GrowInit(seed=grow_seed(model, groups, grow))
        for name, n in grow.items():
            by_name[name].grow_(model, int(n), optimizers, init)
    hf.sync_sizes_(model)  # per-layer sizes kept beside the tensors (a Llama MLP's intermediate_size)


def arch_spec(model: nn.Module, groups: Sequence[PrunableGroup]) -> tuple[tuple[str, int], ...]:
    """A hashable description of the current widths (the FLOPs cache key)."""
    return tuple((g.name, g.width(model)) for g in groups)
