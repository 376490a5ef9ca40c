"""Copies of the model that other callbacks keep and update from it, cut alike (weight averaging).

Lightning's ``WeightAveraging`` (and ``EMAWeightAveraging``) keeps an ``AveragedModel`` of the LightningModule and
``StochasticWeightAveraging`` a deep copy; both update it tensor by tensor from the live model and swap or copy it
back for validation and at the end. After a surgery the copy must have the live model's shapes, or the next
update raises a size mismatch. Found by duck typing (a callback's ``_average_model``), so nothing here imports the
averaging callbacks.

A cut is mirrored with the same kept units, so the surviving units keep their averages. A group whose units own
no parameter slice (an SSM's balanced states: the cut is a change of basis computed from the weights) is not
mirrored, since the copy's own truncation would pick another basis than the live model's; its tensors, and any
other whose shape still differs (grown units, a rollback, a resume), restart their average from the live values.

Example::

    for shadow in shadow_models(trainer.callbacks):
        follow_(shadow, pl_module, groups, keep)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .surgery.arch import apply_arch_, capture_arch
from .surgery.slices import PrunableGroup, apply_plan_


def shadow_models(callbacks: Iterable[Any]) -> list[nn.Module]:
    """The model copies the callbacks keep (``_average_model``, unwrapped from an ``AveragedModel``)."""
    found = []
    for cb in callbacks:
        copy = getattr(cb, "_average_model", None)
        copy = getattr(copy, "module", copy) if isinstance(getattr(copy, "n_averaged", None), Tensor) else copy
        if isinstance(copy, nn.Module):
            found.append(copy)
    return found


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


def follow_(shadow: nn.Module, live: nn.Module, groups: Sequence[PrunableGroup] = (),
            keep: Mapping[str, Tensor] | None = None) -> list[str]:
    """Give ``shadow`` the shapes of ``live`` after a surgery: first the cut ``keep`` (group -> kept unit indices,
    the live model's plan), then every tensor whose shape still differs takes the live values. The names of the
    tensors that restarted."""
    sliced = {g.name for g in groups if g.unit_slices(live)}
    keep = {name: idx for name, idx in (keep or {}).items() if name in sliced}
    if keep:
        apply_plan_(shadow, groups, keep)
    own, theirs = _tensors(shadow), _tensors(live)
    changed = [n for n, t in theirs.items() if n in own and own[n].shape != t.shape]
    if not changed:
        return []
    apply_arch_(shadow, capture_arch(live), "the live model")
    own = _tensors(shadow)
    with torch.no_grad():
        for name in changed:
            own[name].copy_(theirs[name].detach().to(own[name].device))
    return changed
