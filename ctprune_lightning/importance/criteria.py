"""The importance criteria: magnitude, Taylor, and the useful trajectory.

Example::

    imp = build_importance("trajectory")
    imp.attach(model, groups)
    ...  # the callback forwards the optimizer-step hooks
    scores = imp.scores(model, groups[0])  # one value per unit, higher = keep
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..surgery.groups import PrunableGroup
from .base import AccumulatingImportance, Importance, full, reduce_to_units


class MagnitudeImportance(Importance):
    """L2 norm of all the weights of a unit, across every coupled slice."""

    name = "magnitude"

    def scores(self, model: nn.Module, group: PrunableGroup) -> Tensor:
        width = group.width(model)
        total = torch.zeros(width)
        for _, p, dim, units in group.unit_slices(model):
            total += reduce_to_units(full(p.detach()).float().pow(2), dim, units, width).cpu()
        return total.sqrt()


class TaylorImportance(AccumulatingImportance):
    """EMA over optimizer steps of |Σ_unit w·∂L/∂w| (first-order loss change of removing the unit)."""

    name = "taylor"

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"TaylorImportance: beta={beta!r} must lie in [0, 1)")
        self.beta = beta

    def before_optimizer_step(self, model: nn.Module) -> None:
        for g in self.groups:
            total = None
            for _, p, dim, units in self.unit_slices(model, g):
                if p.grad is not None:
                    wg = (full(p.detach()) * full(p.grad.detach())).float()
                    unit = reduce_to_units(wg, dim, units, self.acc[g.name].numel())
                    total = unit if total is None else total.add_(unit)
            acc = self.accumulator(g.name, total.device) if total is not None else self.acc[g.name]
            acc.mul_(self.beta)
            if total is not None:
                acc.add_(total.abs(), alpha=1 - self.beta)


class TrajectoryImportance(AccumulatingImportance):
    """The useful trajectory: Σ_t Σ_p −g_p(t)·Δθ_p(t), the loss decrease the unit's own motion produced.

    Accumulated since the last surgery event (Synaptic-Intelligence style path integral). Per element,
    −g·Δθ = g·θ_old − g·θ_new: each step adds g·θ before the optimizer step and subtracts it after (the gradient
    is read in place both times: an optimizer step leaves ``.grad`` alone and the next ``zero_grad`` comes after
    ``after_optimizer_step``), in one fused multiply-add over the tensors each time, into one fp32 accumulator
    per parameter of the pruned layers. The sums per unit are taken only when the scores are read (a cut) or
    saved, not at every step.
    """

    name = "trajectory"

    def attach(self, model: nn.Module, groups: Sequence[PrunableGroup]) -> None:
        self.flush()  # the sums so far belong to the units they were taken on
        super().attach(model, groups)

    @torch.no_grad()
    def before_optimizer_step(self, model: nn.Module) -> None:
        if getattr(self, "_open", None):  # a step whose after-hook never came (two optimizers): closed at θ now
            self.after_optimizer_step(model)
        reads: dict[str, list[tuple[str, int, Tensor | None, int]]] = {}  # parameter -> the slices that read it
        params: dict[str, Tensor] = {}
        for g in self.groups:
            width = self.acc[g.name].numel()
            for qname, p, dim, units in self.unit_slices(model, g):
                if p.grad is not None:
                    reads.setdefault(qname, []).append((g.name, dim, units, width))
                    params.setdefault(qname, p)
        weights = {q: full(p) for q, p in params.items()}
        elem: dict[str, Tensor] = getattr(self, "_elem", {})
        if any(q in elem and (elem[q].shape != w.shape or elem[q].device != w.device) for q, w in weights.items()):
            self.flush()  # a parameter was replaced by one of another shape or device (no surgery told us)
        for q, w in weights.items():
            if q not in elem:
                elem[q] = torch.zeros_like(w, dtype=torch.promote_types(w.dtype, torch.float32))
        self._elem, self._reads = elem, reads
        # the step's terms: (accumulator, g, the parameter); the gradient is the same tensor after the step
        self._open = {q: (elem[q], full(params[q].grad), params[q]) for q in weights}
        if self._open:
            accs, grads, _ = (list(t) for t in zip(*self._open.values()))
            torch._foreach_addcmul_(accs, grads, list(weights.values()))

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        opened: dict[str, tuple[Tensor, Tensor, Tensor]] = getattr(self, "_open", {})
        self._open = {}
        closed = {q: t for q, t in opened.items() if t[2].shape == t[0].shape}
        for qname in opened.keys() - closed.keys():  # reshaped in between: its half-step term is dropped
            self._elem.pop(qname, None)
        if closed:  # an FSDP2 gradient is not gathered again: the one read before the step is reused
            accs, grads, params = (list(t) for t in zip(*closed.values()))
            torch._foreach_addcmul_(accs, grads, [full(p) for p in params], value=-1.0)

    def flush(self) -> None:
        """Add the per-element sums to the per-unit accumulators and restart them (before scores are read): each
        slice that read a parameter sums it along its unit dimension; a group whose width changed since is
        skipped (a surgery restarts its integral anyway)."""
        elem: dict[str, Tensor] = getattr(self, "_elem", {})
        reads = getattr(self, "_reads", {})
        for qname, acc in elem.items():
            for name, dim, units, width in reads.get(qname, ()):
                if name in self.acc and self.acc[name].numel() == width:
                    unit = reduce_to_units(acc, dim, units, width)
                    self.accumulator(name, unit.device).add_(unit)
        elem.clear()

    def scores(self, model: nn.Module, group: PrunableGroup) -> Tensor:
        self.flush()
        return super().scores(model, group)

    def state_dict(self) -> dict:
        self.flush()
        return super().state_dict()

    def on_surgery(self, plan) -> None:
        """Restart the integral at each event (the kept units start equal)."""
        self._elem, self._open = {}, {}  # the cut layers have new shapes
        for name in self.acc:
            width = plan[name].numel() if name in plan else self.acc[name].numel()
            self.acc[name] = torch.zeros(width)
