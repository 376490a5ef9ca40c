"""A plain MLP classifier as a LightningModule (the Fashion-MNIST demo model).

Example::

    model = MLPClassifier(input_dim=784, hidden=(1024, 1024), optimizer="adamw", scheduler="cosine")
    lightning.Trainer(max_epochs=8).fit(model, datamodule=FashionMNISTDataModule())
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "none")
NORMS = ("layernorm", "batchnorm")


class WarmupCosine:
    """LR multiplier: linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``.

    A callable object (not a lambda) so ``LambdaLR.state_dict()`` saves and restores it.
    ``total_steps=None`` keeps the LR constant after warm-up.
    """

    def __init__(self, warmup_steps: int, total_steps: int | None) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = None if total_steps is None else int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


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


class MLPClassifier(L.LightningModule):
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
        self.train_acc = MulticlassAccuracy(num_classes=int(num_classes), average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=int(num_classes), average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=int(num_classes), average="micro")
        self.example_input_array = torch.zeros(2, int(input_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, num_classes)."""
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_step=False, on_epoch=True, prog_bar=True,
                 sync_dist=True)
        metric(logits, y)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return opt
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            rank_zero_warn("scheduler='cosine' needs a finite number of steps (set max_epochs or max_steps); "
                           "keeping the LR constant after warm-up.")
            total = None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(hp.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
