"""Baselines that are not ours, in the form a Lightning user would reach for them.

``HiddenLayerPruning`` is Lightning's own ``ModelPruning`` (masks via ``torch.nn.utils.prune``) set up
as a fair structured baseline: L2-structured pruning of whole output rows / channels of every hidden
``nn.Linear`` and ``nn.Conv*d`` (the output layer, the model's last Linear, is left alone, as ControlPruning
leaves it), ``keep_per_epoch`` of the remaining rows
kept at each of the first ``epochs`` epochs, made permanent at the end. The masked rows are zeros, not
removed: it saves no FLOPs, which is what its wall-clock measures.

    python train.py callbacks=model_pruning controller=none      # conf/callbacks/model_pruning.yaml
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelPruning
from torch import nn


class HiddenLayerPruning(ModelPruning):
    """``ModelPruning("ln_structured")`` on the rows of every hidden Linear and Conv (not the output layer)."""

    def __init__(self, keep_per_epoch: float = 0.8, epochs: int = 4, **kwargs: Any) -> None:
        self.epochs = int(epochs)
        super().__init__(pruning_fn="ln_structured", pruning_dim=0, pruning_norm=2, use_global_unstructured=False,
                         use_lottery_ticket_hypothesis=False, make_pruning_permanent=True,
                         amount=lambda epoch: (1.0 - keep_per_epoch) if epoch < self.epochs else 0.0, **kwargs)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        layers = [m for m in pl_module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        last_linear = max((i for i, m in enumerate(layers) if isinstance(m, nn.Linear)), default=None)
        self._parameters_to_prune = [(m, "weight") for i, m in enumerate(layers) if i != last_linear]
        super().setup(trainer, pl_module, stage)
