"""What the data modules share: train/val/test splits served in whole batches with seeded shuffling.

A ``BatchSampler`` is the loader's sampler and ``batch_size=None``: the dataset is indexed once per
batch with all its indices (a ``TensorDataset`` slices its tensors in one go instead of collating
``batch_size`` single samples). Lightning's distributed sampler wrapping splits whole batches.

With ``on_device`` in a module's hyperparameters, a ``TensorDataset`` split is copied once to the trainer's device
(an accelerator; on a CPU nothing changes): the batches are then gathered there, and the host neither slices nor
copies them at every step. A dense step of a small-input net on a GPU takes milliseconds; a 4096-image batch
gathered and copied from host memory takes about as long.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset


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
        dataset = self._placed(dataset)
        sampler = (RandomSampler(dataset, generator=torch.Generator().manual_seed(int(self.hparams.seed)))
                   if shuffle else SequentialSampler(dataset))
        workers = int(self.hparams.num_workers)
        return DataLoader(dataset, sampler=BatchSampler(sampler, self.batch_size, drop_last=False), batch_size=None,
                          num_workers=workers, persistent_workers=workers > 0)

    def _placed(self, dataset: Any) -> Any:
        """``dataset`` with its tensors on the trainer's accelerator when ``on_device`` is set (copied once per split)."""
        trainer = self.trainer
        if not self.hparams.get("on_device", False) or not isinstance(dataset, TensorDataset) or trainer is None:
            return dataset
        device = trainer.strategy.root_device
        if device.type == "cpu":
            return dataset
        placed: dict[int, tuple[TensorDataset, TensorDataset]] = self.__dict__.setdefault("_on_device", {})
        host, copy = placed.get(id(dataset), (None, None))
        if host is not dataset or copy is None or copy.tensors[0].device != device:  # a new split, or another device
            copy = TensorDataset(*(t.to(device) for t in dataset.tensors))
            placed[id(dataset)] = (dataset, copy)
        return copy

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.data_val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, shuffle=False)
