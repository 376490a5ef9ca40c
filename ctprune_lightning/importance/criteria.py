"""The importance criteria: magnitude, Taylor, and the useful trajectory.

Example::

    imp = build_importance("trajectory")
    imp.attach(model, groups)
    ...  # the callback forwards the optimizer-step hooks
    scores = imp.scores(model, groups[0])  # one value per unit, higher = keep
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..surgery.groups import PrunableGroup
from .base import AccumulatingImportance, Importance, full, reduce_to_units


class MagnitudeImportance(Importance):
    """L2 norm of all the weights of a unit, across every coupled slice."""

    name = "magnitude"
    memory = 0.0  # the weights now: nothing to track

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

    @property
    def memory(self) -> float:
        """The EMA's time constant ``1 / (1 − β)`` in optimizer steps (10 at the default β = 0.9)."""
        return 1.0 / (1.0 - self.beta)

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


class _OpenStep(NamedTuple):
    """One parameter's term of an optimizer step between the two hooks."""

    acc: Tensor  # the per-element accumulator
    param: Tensor
    grad: Tensor  # the gradient tensor read before the step, and its version counter then
    version: int
    fused_grad: Tensor | None  # fused path: the gradient whose g·θ_old was added (gathered under FSDP2)
    theta_old: Tensor | None  # copy path: θ before the step


class TrajectoryImportance(AccumulatingImportance):
    """The useful trajectory: Σ_t Σ_p −g_p(t)·Δθ_p(t), the loss decrease the unit's own motion produced.

    Accumulated since the last surgery event (Synaptic-Intelligence style path integral), per element into one
    fp32 accumulator per parameter of the pruned layers; the sums per unit are taken only when the scores are
    read (a cut) or saved, not at every step. Per element −g·Δθ = g·θ_old − g·θ_new, so where nothing touches the
    gradient between ``before_optimizer_step`` and the optimizer's update, each step adds ``g·θ`` before and
    subtracts it after, one fused multiply-add each time (the gradient read in place both times). Lightning clips
    the gradient *after* the callbacks' ``on_before_optimizer_step``, in place, and a module's own hook may change
    it too: then ``g·θ_old`` would be read with the gradient before the change. So the first tracked step copies
    θ instead (``Δθ`` formed after the update, times the gradient as the optimizer used it) and watches the
    gradients' version counters between the hooks; only if they are unchanged do later steps take the fused
    path, and a step that finds them changed there drops the sums since the last read (never a corrupt term) and
    copies θ from then on. A change made through ``.data`` is not seen.
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
        buffers: dict[str, Tensor] = getattr(self, "_buffers", {})  # θ_old of the copy path, kept from step to step
        fused = getattr(self, "_mode", "first") == "fused"
        if not fused:
            for q, w in weights.items():
                if q not in buffers or buffers[q].shape != w.shape or buffers[q].device != w.device \
                        or buffers[q].dtype != elem[q].dtype:
                    buffers[q] = torch.empty_like(elem[q])
        self._buffers = buffers
        self._open = {q: _OpenStep(elem[q], p, p.grad, p.grad._version, full(p.grad) if fused else None,
                                   None if fused else buffers[q]) for q, p in params.items()}
        if not self._open:
            return
        if fused:
            torch._foreach_addcmul_([t.acc for t in self._open.values()],
                                    [t.fused_grad for t in self._open.values()], list(weights.values()))
        else:
            torch._foreach_copy_([t.theta_old for t in self._open.values()], list(weights.values()))

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        opened: dict[str, _OpenStep] = getattr(self, "_open", {})
        self._open = {}
        closed = {q: t for q, t in opened.items() if t.param.shape == t.acc.shape}
        for qname in opened.keys() - closed.keys():  # reshaped in between: its half-step term is dropped
            self._elem.pop(qname, None)
        # changed in place since the before-hook (clipped, zeroed): a new tensor in its place is not a change of the
        # one read, which the step's terms keep using (a step closed late, after the next backward, stays exact)
        touched = any(t.grad._version != t.version for t in closed.values())
        fused = [t for t in closed.values() if t.fused_grad is not None]
        copied = [t for t in closed.values() if t.theta_old is not None]
        if fused and touched:  # g·θ_old was read with the gradient before its change: drop, copy θ from now on
            for t in fused:
                t.acc.zero_()
        elif fused:  # an FSDP2 gradient is not gathered again: the one read before the step is reused
            torch._foreach_addcmul_([t.acc for t in fused], [t.fused_grad for t in fused],
                                    [full(t.param) for t in fused], value=-1.0)
        if copied:  # Δ = θ_old − θ_new in the buffer, times the gradient read before, as the optimizer used it
            bufs = [t.theta_old for t in copied]
            torch._foreach_sub_(bufs, [full(t.param) for t in copied])
            torch._foreach_addcmul_([t.acc for t in copied], [full(t.grad) for t in copied], bufs)
        if closed:  # "first" becomes "fused" unless the gradient changed between the hooks; "copy" stays
            self._mode = "copy" if touched or getattr(self, "_mode", "first") == "copy" else "fused"

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
        self._elem, self._open, self._buffers = {}, {}, {}  # the cut layers have new shapes
        for name in self.acc:
            width = plan[name].numel() if name in plan else self.acc[name].numel()
            self.acc[name] = torch.zeros(width)
