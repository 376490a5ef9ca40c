"""The importance protocol: one score per unit of each group; higher means keep.

Stateless criteria only implement :meth:`Importance.scores`. Criteria that integrate over training
(Taylor, trajectory) also receive the optimizer-step hooks and must follow surgery
(:meth:`Importance.on_surgery`) so their accumulators keep the surviving units' history.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..surgery.groups import PrunableGroup
from ..surgery.slices import UnitSlice


def full(t: Tensor) -> Tensor:
    """The whole tensor of an FSDP2-sharded DTensor (``full_tensor()``, a collective), else ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def reduce_to_units(t: Tensor, dim: int, units: Tensor | None = None, width: int | None = None) -> Tensor:
    """Sum an element-wise tensor over every dimension but ``dim`` -> one value per index of ``dim``.

    With ``units`` (the unit owning each index along ``dim``, e.g. the head of each q/k/v row), the
    values of a unit's indices are summed too -> one value per unit (``width`` units).
    """
    if t.dim() > 1:
        t = t.sum(dim=[d for d in range(t.dim()) if d != dim])
    if units is None:
        return t
    out = torch.zeros(int(width) if width is not None else int(units.max()) + 1, dtype=t.dtype, device=t.device)
    return out.index_add_(0, units.to(t.device), t)


class Importance:
    """Base class. Subclasses set ``name`` and implement :meth:`scores`."""

    name: str = "base"
    #: how many optimizer steps back the scores remember (an EMA's time constant): a quality budget tracks only the
    #: control intervals that many steps before a reading (:meth:`ControlLoop.expect_reading`); None: every step since
    #: the last cut counts (a path integral), 0: the hooks do nothing (the scores read the weights alone)
    memory: float | None = None

    def attach(self, model: nn.Module, groups: Sequence[PrunableGroup]) -> None:
        """Called once the groups are known (and again after a resume)."""
        self.groups = list(groups)

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Gradients are ready, parameters not yet updated."""

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Parameters were just updated."""

    def scores(self, model: nn.Module, group: PrunableGroup) -> Tensor:
        raise NotImplementedError

    def on_surgery(self, plan: Mapping[str, Tensor]) -> None:
        """The groups in ``plan`` now hold only the kept units."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass


class AccumulatingImportance(Importance):
    """Shared bookkeeping for criteria that keep one accumulator vector per group.

    An accumulator lives on the device of the parameters it sums (moved there on first use), so the per-step
    update never waits for the accelerator; :meth:`scores` and :meth:`state_dict` bring it to the host.
    """

    def attach(self, model: nn.Module, groups: Sequence[PrunableGroup]) -> None:
        super().attach(model, groups)
        self._slices: dict[str, list[tuple[nn.Module, str, UnitSlice]]] = {}
        self.acc: dict[str, Tensor] = getattr(self, "acc", {})
        for g in groups:
            width = g.width(model)
            if g.name not in self.acc or self.acc[g.name].numel() != width:
                self.acc[g.name] = torch.zeros(width)

    def unit_slices(self, model: nn.Module, group: PrunableGroup) -> list[UnitSlice]:
        """``group.unit_slices(model)``, kept from step to step while every slice's parameter is still the one its
        module holds (a surgery, a re-wrap, a restore or an FSDP2 reshard registers new ones: then it is rebuilt).
        Rebuilding it every step cost more than the per-step arithmetic (a module path walk per slice)."""
        cache = getattr(self, "_slices", None)
        if cache is None:
            cache = self._slices = {}
        hit = cache.get(group.name)
        if hit is not None and all(getattr(owner, attr, None) is u.param for owner, attr, u in hit):
            return [u for _, _, u in hit]
        slices = group.unit_slices(model)
        cache[group.name] = [(model.get_submodule(u.name.rpartition(".")[0]), u.name.rpartition(".")[2], u)
                             for u in slices]
        return slices

    def accumulator(self, name: str, device: torch.device) -> Tensor:
        """The accumulator of group ``name``, on ``device``."""
        if self.acc[name].device != device:
            self.acc[name] = self.acc[name].to(device)
        return self.acc[name]

    def on_surgery(self, plan: Mapping[str, Tensor]) -> None:
        self._slices = {}
        for name, keep in plan.items():
            if name in self.acc:
                acc = self.acc[name]
                self.acc[name] = acc[torch.as_tensor(keep, dtype=torch.long, device=acc.device)].clone()

    def scores(self, model: nn.Module, group: PrunableGroup) -> Tensor:
        return self.acc[group.name].detach().to("cpu", copy=True)

    def state_dict(self) -> dict:  # before `attach` too: a tuner's checkpoint at the start of fit
        return {"acc": {k: v.tolist() for k, v in getattr(self, "acc", {}).items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.acc = {k: torch.tensor(v, dtype=torch.float32) for k, v in state.get("acc", {}).items()}
