"""LightningDataModules for the experiments (not needed by users of the pruning callback).

``datasets`` is imported lazily, so importing this package stays cheap.
"""

from ctprune_lightning.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNISTDataModule
from ctprune_lightning.data.sequential import SequentialDigitsDataModule, SequentialFashionMNISTDataModule
from ctprune_lightning.data.shakespeare import ShakespeareDataModule
from ctprune_lightning.data.synthetic import SyntheticDataModule

__all__ = ["FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "FashionMNISTDataModule", "SequentialDigitsDataModule",
           "SequentialFashionMNISTDataModule", "ShakespeareDataModule", "SyntheticDataModule"]
