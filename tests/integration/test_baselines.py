"""The ModelPruning baseline of the evidence suite masks hidden rows only, and saves no FLOPs."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.baselines import HiddenLayerPruning  # noqa: E402

from ctprune_lightning.data import SyntheticDataModule  # noqa: E402
from ctprune_lightning.models import MLPClassifier  # noqa: E402


def test_model_pruning_baseline_zeroes_hidden_rows_and_never_the_output_layer() -> None:
    L.seed_everything(0)
    model = MLPClassifier(input_dim=32, hidden=(64, 64), num_classes=10)
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[HiddenLayerPruning(keep_per_epoch=0.75, epochs=4)])
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=256, input_shape=(32,), batch_size=32))
    for i in (1, 3):
        w = model.net[i].weight
        zero = int((w.abs().sum(dim=1) == 0).sum())
        assert 20 <= zero <= 48 and w.shape == (64, model.net[i].in_features)  # masked, not removed
    assert int((model.net[5].weight.abs().sum(dim=1) == 0).sum()) == 0
    assert not any("weight_orig" in n for n, _ in model.named_parameters())  # made permanent at the end
    assert torch.isfinite(model.net[5].weight).all()


def test_model_pruning_baseline_masks_conv_channels_too() -> None:
    from ctprune_lightning.models import ResNetClassifier

    L.seed_everything(0)
    model = ResNetClassifier(depth=8, widths=[8, 16, 16], num_classes=10, in_channels=1, image_size=8)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[HiddenLayerPruning(keep_per_epoch=0.5, epochs=2)])
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=64, input_shape=(1, 8, 8), batch_size=16))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    zeroed = [int((c.weight.flatten(1).abs().sum(dim=1) == 0).sum()) for c in convs]
    assert all(z >= c.out_channels // 2 for z, c in zip(zeroed, convs))  # 2 epochs at 50% kept
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert int((head.weight.abs().sum(dim=1) == 0).sum()) == 0
