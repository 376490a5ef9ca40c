"""Experiment models as LightningModules (not needed by users of the pruning callback)."""

from ctprune_lightning.models.mlp import MLPClassifier

__all__ = ["MLPClassifier"]
