"""The importance criteria: magnitude, Taylor, and the useful trajectory.

Example::

    imp = build_importance("trajectory")
    imp.attach(model, groups)
    ...  # the callback forwards the optimizer-step hooks
    scores = imp.scores(model, groups[0])  # one value per unit, higher = keep
"""

from __future__ import annotations

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

    Accumulated since the last surgery event (Synaptic-Intelligence style path integral). Costs one
    saved copy of the parameters of the pruned layers (into buffers reused every step) and a product per
    step; the gradient is read in place after the optimizer step.
    """

    name = "trajectory"

    def before_optimizer_step(self, model: nn.Module) -> None:
        # Only the parameters are copied, into buffers kept from step to step (no allocation per step), in one
        # fused copy. The gradient is read again after the step: an optimizer step leaves ``.grad`` alone and
        # the next ``zero_grad`` comes after ``after_optimizer_step``.
        buffers: dict[str, Tensor] = getattr(self, "_buffers", {})
        saved: dict[str, Tensor] = {}
        weights: list[Tensor] = []
        for g in self.groups:
            for qname, p, _, _ in self.unit_slices(model, g):
                if qname in saved or p.grad is None:
                    continue
                w = full(p.detach())
                buf = buffers.get(qname)
                if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
                    buf = buffers[qname] = torch.empty_like(w)
                saved[qname] = buf
                weights.append(w)
        if saved:
            torch._foreach_copy_(list(saved.values()), weights)
        self._saved, self._buffers = saved, buffers

    def after_optimizer_step(self, model: nn.Module) -> None:
        saved = getattr(self, "_saved", {})
        if not saved:
            return
        slices = {g.name: self.unit_slices(model, g) for g in self.groups}
        live: dict[str, tuple[Tensor, Tensor]] = {}  # qname -> (θ_new, g), parameters still of the saved shape
        for qname, p, _, _ in (u for us in slices.values() for u in us):
            if qname in saved and qname not in live and saved[qname].shape == p.shape and p.grad is not None:
                live[qname] = (full(p.detach()), full(p.grad.detach()))
        if live:  # -g·(θ_new − θ_old) = g·(θ_old − θ_new), in place in the snapshot, fused over the tensors
            bufs = [saved[q] for q in live]
            torch._foreach_sub_(bufs, [w for w, _ in live.values()])
            torch._foreach_mul_(bufs, [gr for _, gr in live.values()])
        for g in self.groups:
            for qname, _, dim, units in slices[g.name]:
                if qname in live:
                    unit = reduce_to_units(saved[qname].float(), dim, units, self.acc[g.name].numel())
                    self.accumulator(g.name, unit.device).add_(unit)
        self._saved = {}

    def on_surgery(self, plan) -> None:
        """Restart the integral at each event (the kept units start equal)."""
        self._buffers = {}  # the cut layers have new shapes
        for name in self.acc:
            width = plan[name].numel() if name in plan else self.acc[name].numel()
            self.acc[name] = torch.zeros(width)
