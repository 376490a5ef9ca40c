"""Pixel-sequence classification: sequential Fashion-MNIST and sequential 8x8 digits (for SSM/LRU models).

Images are read row-major as sequences of 1-feature steps, shape (seq_len, 1):

- :class:`SequentialFashionMNISTDataModule` — 784 steps, or ``pool`` x ``pool`` average pooling first for
  quick runs (pool=2: 196 steps, pool=4: 49 steps); loading (IDX -> Arrow cache) is
  :class:`~ctprune_lightning.data.fashion_mnist.FashionMNISTDataModule`'s.
- :class:`SequentialDigitsDataModule` — scikit-learn's bundled 8x8 digits (1797 images, 64 steps, offline),
  a seconds-scale sequence task for tests.

Example::

    dm = SequentialFashionMNISTDataModule(pool=4, batch_size=128)   # input_shape == (49, 1)
    trainer.fit(LRUClassifier(input_dim=49, d_input=1), datamodule=dm)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ctprune_lightning.data.base import SplitDataModule
from ctprune_lightning.data.fashion_mnist import FashionMNISTDataModule

POOLS = (1, 2, 4, 7, 14, 28)


def images_to_sequences(images: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """(N, 1, H, W) float -> (N, (H/pool)·(W/pool), 1): optional average pooling, then row-major pixels."""
    if pool > 1:
        images = F.avg_pool2d(images, kernel_size=pool)
    return images.flatten(1).unsqueeze(-1).contiguous()


class SequentialFashionMNISTDataModule(FashionMNISTDataModule):
    """Fashion-MNIST as pixel sequences of shape (784 / pool², 1); same splits and arguments as the image
    data module plus ``pool`` (a divisor of 28)."""

    def __init__(self, data_dir: str | None = None, batch_size: int = 256, num_workers: int = 0,
                 val_size: int = 5000, seed: int = 0, cache_dir: str | None = None, pool: int = 1) -> None:
        if int(pool) not in POOLS:
            raise ValueError(f"pool={pool!r} is not supported; choose one of {POOLS}")
        super().__init__(data_dir=data_dir, batch_size=batch_size, num_workers=num_workers, val_size=val_size,
                         seed=seed, cache_dir=cache_dir)
        self.pool = int(pool)
        self.input_shape = ((28 // self.pool) ** 2, 1)
        self.input_dim = self.input_shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_shape[0]

    def setup(self, stage: str | None = None) -> None:
        """Load the image splits, then turn each (once) into sequences."""
        super().setup(stage)
        for attr in ("data_train", "data_val", "data_test"):
            ds = getattr(self, attr)
            if ds is not None and ds.tensors[0].dim() == 4:
                setattr(self, attr, TensorDataset(images_to_sequences(ds.tensors[0], self.pool), ds.tensors[1]))


class SequentialDigitsDataModule(SplitDataModule):
    """scikit-learn's 8x8 digits as 64-step pixel sequences (1797 samples, 10 classes), standardised.

    Args:
        batch_size: samples per batch.
        val_size: held-out validation samples.
        test_size: held-out test samples (the rest trains).
        seed: seeds the split and the training shuffle.
        num_workers: DataLoader worker processes.
    """

    num_classes = 10
    input_shape = (64, 1)
    input_dim = 64

    def __init__(self, batch_size: int = 64, val_size: int = 250, test_size: int = 250, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        if int(batch_size) < 1 or int(num_workers) < 0 or int(val_size) < 0 or int(test_size) < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers, val_size, test_size >= 0; got {batch_size=}, "
                             f"{num_workers=}, {val_size=}, {test_size=}")
        if int(val_size) + int(test_size) >= 1797:
            raise ValueError(f"val_size + test_size = {int(val_size) + int(test_size)} leaves no training data of 1797")
        self.save_hyperparameters()
        self.batch_size = int(batch_size)
        self.data_train: TensorDataset | None = None
        self.data_val: TensorDataset | None = None
        self.data_test: TensorDataset | None = None

    @property
    def dims(self) -> tuple[int, int]:
        return self.input_shape

    def setup(self, stage: str | None = None) -> None:
        """Split deterministically from ``seed`` and standardise with the training split's statistics."""
        if self.data_train is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32).unsqueeze(-1)  # (1797, 64, 1), values 0..16
        y = torch.as_tensor(digits.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(self.hparams.seed)))
        n_val, n_test = int(self.hparams.val_size), int(self.hparams.test_size)
        val, test, train = perm[:n_val], perm[n_val:n_val + n_test], perm[n_val + n_test:]
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        self.data_train, self.data_val, self.data_test = (TensorDataset(x[i], y[i]) for i in (train, val, test))
