"""Small, seeded, learnable classification data for tests and smoke runs.

Each class ``c`` has a mean ``mu_c`` (random direction, norm ``class_sep``); a sample is
``mu_c + N(0, noise**2 I)``. Classes are well separated, so a small MLP reaches high accuracy in a
couple of epochs and accuracy in a test means something.

Example::

    dm = SyntheticDataModule(num_samples=512, input_shape=(1, 28, 28))
    trainer.fit(MLPClassifier(input_dim=784, hidden=(64,)), datamodule=dm)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import TensorDataset

from .base import SplitDataModule


def make_classification(num_samples: int, input_shape: Sequence[int], num_classes: int, generator: torch.Generator,
                        means: torch.Tensor, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` balanced (x, y) pairs around the class ``means`` (shape (num_classes, prod(input_shape)))."""
    y = torch.arange(num_samples) % num_classes
    y = y[torch.randperm(num_samples, generator=generator)]
    x = means[y] + noise * torch.randn(num_samples, means.shape[1], generator=generator)
    return x.reshape(num_samples, *input_shape), y


class SyntheticDataModule(SplitDataModule):
    """Gaussian class clusters: ``num_samples`` training samples, a quarter as many each for val and test.

    Args:
        num_samples: training samples (val and test get ``max(num_samples // 4, num_classes)`` each).
        input_shape: shape of one sample, e.g. (784,) or (1, 28, 28).
        num_classes: number of classes.
        batch_size: samples per batch.
        seed: seeds the class means, the samples and the training shuffle.
        num_workers: DataLoader worker processes.
        class_sep: distance of each class mean from the origin (in units of the noise std).
        noise: standard deviation of the per-feature Gaussian noise.
    """

    def __init__(self, num_samples: int = 512, input_shape: Sequence[int] = (784,), num_classes: int = 10,
                 batch_size: int = 64, seed: int = 0, num_workers: int = 0, class_sep: float = 8.0,
                 noise: float = 1.0) -> None:
        super().__init__()
        if int(num_samples) < 1 or int(num_classes) < 2 or int(batch_size) < 1 or int(num_workers) < 0:
            raise ValueError(f"need num_samples >= 1, num_classes >= 2, batch_size >= 1, num_workers >= 0; got "
                             f"{num_samples=}, {num_classes=}, {batch_size=}, {num_workers=}")
        self.save_hyperparameters()
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.input_dim = math.prod(self.input_shape)
        self.batch_size = int(batch_size)
        self.data_train: TensorDataset | None = None
        self.data_val: TensorDataset | None = None
        self.data_test: TensorDataset | None = None

    @property
    def dims(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return self.input_shape

    def setup(self, stage: str | None = None) -> None:
        """Generate all three splits deterministically from ``seed`` (idempotent)."""
        if self.data_train is not None:
            return
        hp = self.hparams
        g = torch.Generator().manual_seed(int(hp.seed))
        directions = torch.randn(self.num_classes, self.input_dim, generator=g)
        means = float(hp.class_sep) * directions / directions.norm(dim=1, keepdim=True)
        n_eval = max(int(hp.num_samples) // 4, self.num_classes)
        sizes = {"train": int(hp.num_samples), "val": n_eval, "test": n_eval}
        splits = {name: TensorDataset(*make_classification(n, self.input_shape, self.num_classes, g, means,
                                                            float(hp.noise)))
                  for name, n in sizes.items()}
        self.data_train, self.data_val, self.data_test = splits["train"], splits["val"], splits["test"]
