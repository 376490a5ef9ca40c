"""A plain MLP classifier as a LightningModule (the Fashion-MNIST demo model).

Example::

    model = MLPClassifier(input_dim=784, hidden=(1024, 1024), optimizer="adamw", scheduler="cosine")
    lightning.Trainer(max_epochs=8).fit(model, datamodule=FashionMNISTDataModule())
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ctprune_lightning.models.classifier import ClassifierModule
from ctprune_lightning.models.common import OPTIMIZERS, SCHEDULERS, configure_optimizer_and_scheduler

NORMS = ("layernorm", "batchnorm")


def build_mlp(input_dim: int, hidden: Sequence[int], num_classes: int, dropout: float = 0.0,
              norm: str | None = None) -> nn.Sequential:
    """Flatten, then per hidden width: Linear, [norm], ReLU, [Dropout]; then the output Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_dim
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if norm == "layernorm":
            layers.append(nn.LayerNorm(h))
        elif norm == "batchnorm":
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class MLPClassifier(ClassifierModule):
    """MLP classifier with cross-entropy, accuracy metrics, AdamW/SGD and an optional warm-up + cosine LR.

    Accepts inputs of shape (B, input_dim) or any (B, ...) that flattens to it, e.g. (B, 1, 28, 28).
    """

    def __init__(self, input_dim: int = 784, hidden: Sequence[int] = (1024, 1024), num_classes: int = 10,
                 optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.01, momentum: float = 0.9,
                 scheduler: str = "cosine", warmup_steps: int = 0, dropout: float = 0.0,
                 norm: str | None = None) -> None:
        super().__init__()
        norm = None if norm in (None, "none") else norm
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not supported; choose one of {OPTIMIZERS}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r} is not supported; choose one of {SCHEDULERS}")
        if norm is not None and norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not supported; choose one of {NORMS} or None")
        hidden = [int(h) for h in hidden]
        if int(input_dim) < 1 or int(num_classes) < 2 or any(h < 1 for h in hidden):
            raise ValueError(f"need input_dim >= 1, num_classes >= 2 and hidden widths >= 1; got "
                             f"{input_dim=}, {num_classes=}, {hidden=}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if int(warmup_steps) < 0 or float(lr) <= 0:
            raise ValueError(f"need warmup_steps >= 0 and lr > 0; got {warmup_steps=}, {lr=}")
        self.save_hyperparameters()
        self.net = build_mlp(int(input_dim), hidden, int(num_classes), float(dropout), norm)
        self.init_metrics(int(num_classes))
        self.example_input_array = torch.zeros(2, int(input_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, num_classes)."""
        return self.net(x)

    def configure_optimizers(self) -> Any:
        return configure_optimizer_and_scheduler(self)
