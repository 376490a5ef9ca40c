"""Snapshots for CompreSSM's validation-guided rollback: undo a reduction that hurt validation.

A snapshot holds the architecture spec, the weights and the optimizer states. Restoring rebuilds the
model to the snapshot's shapes (growing the reduced layers back), loads the weights, puts the rebuilt
Parameters in the same optimizer slots and loads the optimizer states, so training continues exactly
from the snapshot.

Example::

    snap = Snapshot.take(model, trainer.optimizers)
    ...  # reduce, train, validate
    snap.restore_(model, trainer.optimizers)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn
from torch.optim import Optimizer

from .surgery.arch import apply_arch_, capture_arch
from .surgery.optim import swap_in_optimizers_


@dataclass
class Snapshot:
    arch: dict[str, Any]
    weights: dict[str, Any]
    optimizer_states: list[dict[str, Any]]

    @classmethod
    def take(cls, model: nn.Module, optimizers: Iterable[Optimizer]) -> "Snapshot":
        return cls(capture_arch(model), {k: v.detach().clone() for k, v in model.state_dict().items()},
                   [copy.deepcopy(opt.state_dict()) for opt in optimizers])

    def restore_(self, model: nn.Module, optimizers: Iterable[Optimizer]) -> None:
        optimizers = list(optimizers)
        before = dict(model.named_parameters())
        apply_arch_(model, self.arch, "rollback snapshot")
        model.load_state_dict(self.weights)
        after = dict(model.named_parameters())
        for name, old in before.items():
            new = after[name]
            if new is old:
                continue
            swap_in_optimizers_(old, new, optimizers, state_fn=None)  # the saved states are loaded next
        for opt, state in zip(optimizers, self.optimizer_states):
            opt.load_state_dict(state)
