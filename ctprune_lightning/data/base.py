"""What the data modules share: train/val/test splits served in whole batches with seeded shuffling.

A ``BatchSampler`` is the loader's sampler and ``batch_size=None``: the dataset is indexed once per
batch with all its indices (a ``TensorDataset`` slices its tensors in one go instead of collating
``batch_size`` single samples). Lightning's distributed sampler wrapping splits whole batches.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler


class SplitDataModule(L.LightningDataModule):
    """Subclasses fill ``data_train``/``data_val``/``data_test`` in ``setup`` and have ``batch_size`` and
    ``hparams.seed`` / ``hparams.num_workers``."""

    data_train: Any = None
    data_val: Any = None
    data_test: Any = None

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader | list:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if len(dataset) == 0:
            return []
        sampler = (RandomSampler(dataset, generator=torch.Generator().manual_seed(int(self.hparams.seed)))
                   if shuffle else SequentialSampler(dataset))
        workers = int(self.hparams.num_workers)
        return DataLoader(dataset, sampler=BatchSampler(sampler, self.batch_size, drop_last=False), batch_size=None,
                          num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.data_val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, shuffle=False)
