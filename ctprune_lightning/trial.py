"""Trial cuts: what a cut would do to a reading, with nothing committed.

:func:`read_cut` makes the cut on the live model (no optimizer given, so no optimizer state moves), takes
the reading, and puts every module back exactly as it was: the same Parameter and buffer objects, the
same size attributes, so optimizers, DDP's buckets and hooks never see a change. Surgery swaps in new
tensors and never writes into the old ones, which is what makes the undo exact. Sharded parameters
(FSDP2's DTensors) cannot be cut without collectives: :func:`can_trial` says no there.

Example::

    after = read_cut(model, groups, {"net.1": [0, 2, 5]}, store.loss)
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .surgery.groups import PrunableGroup, apply_plan_

__all__ = ["can_trial", "read_cut"]


def can_trial(model: nn.Module) -> bool:
    """Whether a trial cut can run here (no sharded DTensor parameters)."""
    return not any(type(p).__name__ == "DTensor" for p in model.parameters())


@torch.no_grad()
def read_cut(model: nn.Module, groups: Sequence[PrunableGroup], keep: Mapping[str, Sequence[int]],
             read: Callable[[nn.Module], float]) -> float:
    """``read(model)`` with the groups of ``keep`` cut to those units; the model is restored afterwards."""
    saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()]
    try:
        apply_plan_(model, groups, {n: torch.as_tensor(list(i), dtype=torch.long) for n, i in keep.items()}, ())
        return read(model)
    finally:
        for m, attrs, params, buffers, modules in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m.__dict__.update(_parameters=params, _buffers=buffers, _modules=modules)
