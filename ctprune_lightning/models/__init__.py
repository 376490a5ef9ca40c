"""Experiment models as LightningModules (not needed by users of the pruning callback)."""

from ctprune_lightning.models.gpt import GPTLanguageModel
from ctprune_lightning.models.lru import LRUClassifier
from ctprune_lightning.models.mlp import MLPClassifier
from ctprune_lightning.models.resnet import ResNetClassifier

__all__ = ["GPTLanguageModel", "LRUClassifier", "MLPClassifier", "ResNetClassifier"]
