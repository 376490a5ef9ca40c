"""Find the groups of tensor slices that must shrink together, and apply a plan to them.

Torch-Pruning's ``DependencyGraph`` is the coupling oracle (which slices are tied); our own executor
(:mod:`.shrink`) does the cutting so Parameters and optimizer state stay correct.

A group is named after the layer whose outputs it prunes (e.g. ``"net.1"``); a unit is one output
feature of that layer with every slice coupled to it (norm entries, input columns of the consumers).

Example::

    groups, skipped = discover_groups(model, model.example_input_array)
    apply_plan_(model, groups, {"net.1": torch.tensor([0, 3, 5])}, trainer.optimizers)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .shrink import NORM_TYPES, shrink_linear_in_features_, shrink_linear_out_features_, shrink_norm_

LINEAR_OUT, LINEAR_IN, NORM = "linear_out", "linear_in", "norm"


@dataclass(frozen=True)
class Slice:
    """One tensor slice of a group: ``module`` (qualified name) cut along ``kind``."""

    module: str
    kind: str  # LINEAR_OUT | LINEAR_IN | NORM


@dataclass(frozen=True)
class PrunableGroup:
    """Slices that shrink together; ``name`` is the producing layer."""

    name: str
    slices: tuple[Slice, ...]

    def width(self, model: nn.Module) -> int:
        return int(model.get_submodule(self.name).out_features)

    def param_slices(self, model: nn.Module) -> list[tuple[str, Tensor, int]]:
        """``(qualified parameter name, parameter, dim)`` for every parameter slice of one unit."""
        out = []
        for s in self.slices:
            mod = model.get_submodule(s.module)
            names = ("weight",) if s.kind == LINEAR_IN else ("weight", "bias")
            dim = 1 if s.kind == LINEAR_IN else 0
            for n in names:
                p = getattr(mod, n, None)
                if isinstance(p, Tensor):
                    out.append((f"{s.module}.{n}", p, dim))
        return out


def _matches(name: str, module: nn.Module, ignored: Sequence[str | type]) -> bool:
    for item in ignored:
        if isinstance(item, type) and isinstance(module, item):
            return True
        if isinstance(item, str) and (name == item or name.startswith(item + ".")):
            return True
    return False


def _slice_kind(module: nn.Module, handler: str) -> str | None:
    if isinstance(module, nn.Linear):
        return {"prune_out_channels": LINEAR_OUT, "prune_in_channels": LINEAR_IN}.get(handler)
    if isinstance(module, NORM_TYPES):
        return NORM
    return None


def discover_groups(
    model: nn.Module,
    example_inputs: object,
    ignored_layers: Sequence[str | type] = (),
    min_width: int = 1,
) -> tuple[list[PrunableGroup], list[tuple[str, str]]]:
    """Return the prunable groups and ``(layer, reason)`` for each layer left dense.

    The model is traced once in eval mode (no BatchNorm statistics change).
    """
    import torch_pruning as tp  # heavy import, only when a fit starts

    names = {m: n for n, m in model.named_modules()}
    ignored = [m for m, n in names.items() if n and _matches(n, m, ignored_layers)]
    was_training = model.training
    model.eval()
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        tp_groups = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Linear]))
    finally:
        model.train(was_training)

    groups: dict[str, PrunableGroup] = {}
    skipped: dict[str, str] = {}
    for tp_group in tp_groups:
        root = tp_group.items[0].dep.target.module
        root_name = names.get(root, "?")
        slices, reason = [], None
        for item in tp_group.items:
            module = item.dep.target.module
            if module not in names:  # Torch-Pruning's pseudo-modules for element-wise ops
                continue
            kind = _slice_kind(module, getattr(item.dep.handler, "__name__", ""))
            name = names[module]
            if kind is None:
                reason = f"coupled to {type(module).__name__} '{name}', which cannot be shrunk yet"
            elif module in ignored:
                reason = f"coupled to ignored layer '{name}'"
            elif len(item.idxs) != root.out_features:
                reason = f"partially coupled to '{name}' (concat/split)"
            if reason:
                break
            slices.append(Slice(name, kind))
        kinds = {s.kind for s in slices}
        if reason is None and LINEAR_IN not in kinds:
            reason = "output layer (its features leave the model)"
        if reason is None and root.out_features <= min_width:
            reason = f"too small (width {root.out_features} <= min_width {min_width})"
        if reason:
            skipped[root_name] = reason
        elif root_name not in groups:
            groups[root_name] = PrunableGroup(root_name, tuple(dict.fromkeys(slices)))
    for m in ignored:
        if isinstance(m, nn.Linear):
            skipped.setdefault(names[m], "ignored")
    in_groups = {s.module for g in groups.values() for s in g.slices}
    for m, n in names.items():
        if n and n not in in_groups and n not in skipped and any(True for _ in m.parameters(recurse=False)):
            skipped[n] = f"unsupported layer type {type(m).__name__}" if not isinstance(m, nn.Linear) else "not coupled"
    order = {n: i for i, n in enumerate(names.values())}
    return sorted(groups.values(), key=lambda g: order[g.name]), sorted(skipped.items(), key=lambda kv: order.get(kv[0], -1))


def apply_plan_(
    model: nn.Module,
    groups: Sequence[PrunableGroup],
    plan: Mapping[str, Tensor],
    optimizers: Iterable[Optimizer] = (),
) -> None:
    """Shrink every group named in ``plan`` to its kept indices (sorted, unique).

    Raises ``KeyError`` for a plan entry that names no group (nothing is changed then).
    """
    by_name = {g.name: g for g in groups}
    unknown = sorted(set(plan) - set(by_name))
    if unknown:
        raise KeyError(f"plan names unknown groups {unknown}; known groups: {sorted(by_name)}")
    optimizers = list(optimizers)
    for name, keep in plan.items():
        keep = torch.as_tensor(keep, dtype=torch.long).unique(sorted=True)
        for s in by_name[name].slices:
            module = model.get_submodule(s.module)
            if s.kind == LINEAR_OUT:
                shrink_linear_out_features_(module, keep, optimizers)
            elif s.kind == LINEAR_IN:
                shrink_linear_in_features_(module, keep, optimizers)
            else:
                shrink_norm_(module, keep, optimizers)


def arch_spec(model: nn.Module, groups: Sequence[PrunableGroup]) -> tuple[tuple[str, int], ...]:
    """A hashable description of the current widths (the FLOPs cache key)."""
    return tuple((g.name, g.width(model)) for g in groups)
