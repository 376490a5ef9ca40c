"""The training, evaluation and prediction steps shared by the classifiers (MLP, ResNet, LRU).

Cross-entropy on ``(inputs, labels)`` batches, torchmetrics accuracy per stage, and the logging keys
every experiment reads: ``train/loss`` (per step, on the steps the loggers write:
:func:`~ctprune_lightning.models.common.step_log_due`), ``train/acc``, ``val/loss``, ``val/acc``,
``test/loss``, ``test/acc`` (per epoch).

Example::

    class MyClassifier(ClassifierModule):
        def __init__(self, num_classes: int = 10):
            super().__init__()
            self.init_metrics(num_classes)
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from ctprune_lightning.models.common import step_log_due


class ClassifierModule(L.LightningModule):
    """A LightningModule with the shared classification steps; subclasses define ``forward``."""

    def init_metrics(self, num_classes: int) -> None:
        """One accuracy metric per stage (separate objects: their states must not mix)."""
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes=int(num_classes), average="micro"))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc.update(logits.detach(), y)  # accumulate only: logged (computed, reset) at the epoch's end
        if step_log_due(self):
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_step=False, on_epoch=True, prog_bar=True,
                 sync_dist=True)
        metric(logits, y)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=-1)
