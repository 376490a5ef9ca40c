"""Fashion-MNIST as a LightningDataModule, read offline from the four gzipped IDX files.

The IDX files (Debian package ``dataset-fashion-mnist``) are parsed once into an HF ``datasets``
Arrow cache (``<dir>/ctprune_arrow_v1/{train,test}``); later runs ``load_from_disk`` it. Batches are
served from in-memory tensors, a whole batch per index lookup, which is far faster on a CPU than
collating 256 single samples.

Example::

    dm = FashionMNISTDataModule(batch_size=256)
    trainer.fit(model, datamodule=dm)
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .base import SplitDataModule

log = logging.getLogger(__name__)

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
ENV_DATA_DIR = "CTPRUNE_FASHION_MNIST_DIR"
CACHE_SUBDIR = "ctprune_arrow_v1"
CACHE_VERSION = 1
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_UBYTE = 0x08


class IDXFormatError(ValueError):
    """An IDX file is truncated, corrupt or not the expected kind."""


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (gzipped or plain) with ``ndim`` dimensions into a uint8 array."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:  # bad gzip stream, truncated archive
        raise IDXFormatError(f"{path}: cannot read IDX file ({err})") from err
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path}: {len(raw)} bytes is shorter than the {header}-byte IDX header")
    zero, dtype, dims_in_file = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype != _IDX_UBYTE or dims_in_file != ndim:
        magic = int.from_bytes(raw[0:4], "big")
        raise IDXFormatError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{0x800 + ndim:08x} "
                             f"(unsigned bytes, {ndim} dimension(s))")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise IDXFormatError(f"{path}: header says shape {shape} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_split(images_path: str | os.PathLike, labels_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check one split: images (N, 28, 28) uint8 and labels (N,) in [0, 10)."""
    images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
    if images.shape[1:] != (28, 28):
        raise IDXFormatError(f"{images_path}: images are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise IDXFormatError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise IDXFormatError(f"{labels_path}: label {int(labels.max())} outside [0, {len(CLASS_NAMES)})")
    return images, labels


def _idx_path(directory: Path, base: str) -> Path | None:
    for name in (base + ".gz", base):
        if (directory / name).is_file():
            return directory / name
    return None


def _idx_paths(directory: Path) -> dict[str, tuple[Path, Path]] | None:
    found = {split: (_idx_path(directory, img), _idx_path(directory, lab)) for split, (img, lab) in IDX_FILES.items()}
    return None if any(p is None for pair in found.values() for p in pair) else found  # type: ignore[return-value]


def find_idx_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """First directory holding all four IDX files: ``data_dir``, ``$CTPRUNE_FASHION_MNIST_DIR``, the Debian path."""
    candidates = [(f"data_dir={data_dir!s}", data_dir), (f"${ENV_DATA_DIR}", os.environ.get(ENV_DATA_DIR)),
                  ("default", DEFAULT_DATA_DIR)]
    searched = []
    for i, (origin, directory) in enumerate(candidates):
        if not directory:
            continue
        path = Path(directory).expanduser()
        if _idx_paths(path) is not None:
            if data_dir and i > 0:
                log.warning("Fashion-MNIST IDX files not found in data_dir=%s; using %s", data_dir, path)
            return path
        searched.append(f"{path} ({origin})")
    names = ", ".join(f"{b}.gz" for pair in IDX_FILES.values() for b in pair)
    raise FileNotFoundError(
        "Fashion-MNIST IDX files not found. Searched: " + "; ".join(searched) + ". To get them: "
        f"`apt-get install dataset-fashion-mnist` (installs them in {DEFAULT_DATA_DIR}); or pass data_dir= "
        f"(or set ${ENV_DATA_DIR}) to a folder holding {names}; or, with network, fetch "
        "`datasets.load_dataset(\"zalando-datasets/fashion_mnist\")` and write the IDX files with "
        "`ctprune_lightning.data.fashion_mnist.export_idx_from_hub(folder)`.")


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzipped when ``path`` ends in .gz); the inverse of :func:`read_idx`."""
    path, array = Path(path), np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(header + array.tobytes())
    return path


def export_idx_from_hub(out_dir: str | os.PathLike, repo: str = "zalando-datasets/fashion_mnist") -> Path:
    """Download Fashion-MNIST from the HF hub (needs network) and write the four IDX files to ``out_dir``."""
    from datasets import load_dataset

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, hub_split in (("train", "train"), ("test", "test")):
        ds = load_dataset(repo, split=hub_split)
        images = np.stack([np.asarray(img, dtype=np.uint8) for img in ds["image"]])
        images_name, labels_name = IDX_FILES[split]
        write_idx(out_dir / f"{images_name}.gz", images)
        write_idx(out_dir / f"{labels_name}.gz", np.asarray(ds["label"], dtype=np.uint8))
    return out_dir


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "ctprune_lightning" / "fashion_mnist"


def _source_signature(idx_dir: Path) -> dict[str, int]:
    paths = _idx_paths(idx_dir) or {}
    return {p.name: p.stat().st_size for pair in paths.values() for p in pair}


def _cache_is_valid(root: Path, idx_dir: Path) -> bool:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("version") == CACHE_VERSION and meta.get("sources") == _source_signature(idx_dir)
            and all((root / s / "dataset_info.json").is_file() for s in IDX_FILES))


def build_arrow_cache(idx_dir: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Parse the IDX files in ``idx_dir`` and save them as Arrow datasets ``root/{train,test}`` (atomically)."""
    import datasets
    from datasets import Array2D, ClassLabel, Dataset, Features

    idx_dir, root = Path(idx_dir), Path(root)
    paths = _idx_paths(idx_dir)
    if paths is None:
        raise FileNotFoundError(f"{idx_dir} does not hold the four Fashion-MNIST IDX files")
    features = Features({"image": Array2D((28, 28), "uint8"), "label": ClassLabel(names=list(CLASS_NAMES))})
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        for split, (images_path, labels_path) in paths.items():
            images, labels = read_idx_split(images_path, labels_path)
            ds = Dataset.from_dict({"image": images, "label": labels.astype(np.int64)}, features=features)
            ds.save_to_disk(str(tmp / split))
        (tmp / "meta.json").write_text(json.dumps({"version": CACHE_VERSION, "sources": _source_signature(idx_dir)}))
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:  # another process published a cache first
            if not _cache_is_valid(root, idx_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars_were_on:
            datasets.enable_progress_bars()
    log.info("Cached Fashion-MNIST from %s as Arrow in %s", idx_dir, root)
    return root


def ensure_arrow_cache(idx_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a valid Arrow cache for ``idx_dir``, building it where allowed.

    Places, in order: ``cache_dir`` (when given), beside the IDX files, ``~/.cache/ctprune_lightning/
    fashion_mnist``. A valid cache in any of them is reused; otherwise it is built in the first writable one.
    """
    idx_dir = Path(idx_dir)
    roots = [Path(cache_dir).expanduser()] if cache_dir else []
    roots += [idx_dir, _user_cache_dir()]
    roots = [r / CACHE_SUBDIR for r in roots]
    for root in roots:
        if _cache_is_valid(root, idx_dir):
            return root
    errors = []
    for root in roots:
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(root.parent, os.W_OK):
                raise PermissionError("not writable")
            return build_arrow_cache(idx_dir, root)
        except OSError as err:  # not writable, read-only file system, ...: try the next place
            errors.append(f"{root}: {err}")
    raise PermissionError("cannot write the Fashion-MNIST Arrow cache anywhere: " + "; ".join(errors))


def load_split(root: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one cached split as (uint8 images (N, 28, 28), int64 labels (N,)) tensors."""
    from datasets import load_from_disk

    ds = load_from_disk(str(Path(root) / split))
    images = ds.with_format("numpy", columns=["image"], dtype=np.uint8)[:]["image"]
    labels = ds.with_format("numpy", columns=["label"])[:]["label"]
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), standardised with the Fashion-MNIST statistics."""
    x = images.to(torch.float32).unsqueeze(1)
    return x.mul_(1.0 / (255.0 * FASHION_MNIST_STD)).sub_(FASHION_MNIST_MEAN / FASHION_MNIST_STD)


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST (55k train / 5k val / 10k test by default), normalised, offline.

    Args:
        data_dir: folder with the IDX files; else ``$CTPRUNE_FASHION_MNIST_DIR``, else the Debian path.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (persistent when > 0).
        val_size: samples held out of the 60k training set for validation (0: no validation set).
        seed: seed of the train/val split and of the training shuffle.
        cache_dir: preferred place for the Arrow cache (default: beside the IDX files, else ~/.cache).
        on_device: keep the splits on the trainer's accelerator (188 MB; batches gathered there); needs
            ``num_workers=0`` (worker processes cannot hold CUDA tensors).
    """

    input_shape = (1, 28, 28)
    num_classes = len(CLASS_NAMES)
    input_dim = 28 * 28
    class_names = CLASS_NAMES

    def __init__(self, data_dir: str | None = None, batch_size: int = 256, num_workers: int = 0,
                 val_size: int = 5000, seed: int = 0, cache_dir: str | None = None, on_device: bool = False) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if int(val_size) < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        if not isinstance(on_device, bool):
            raise ValueError(f"on_device must be true or false, got {on_device!r}")
        if on_device and int(num_workers) > 0:
            raise ValueError(f"on_device=True needs num_workers=0 (got {num_workers}): worker processes cannot hold "
                             "the accelerator's tensors")
        self.save_hyperparameters()
        self.batch_size = int(batch_size)
        self.data_train: TensorDataset | None = None
        self.data_val: TensorDataset | None = None
        self.data_test: TensorDataset | None = None
        self.train_indices: torch.Tensor | None = None
        self.val_indices: torch.Tensor | None = None

    @property
    def dims(self) -> tuple[int, int, int]:
        """Shape of one sample, (1, 28, 28)."""
        return self.input_shape

    def _cache_root(self) -> Path:
        return ensure_arrow_cache(find_idx_dir(self.hparams.data_dir), self.hparams.cache_dir)

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One split as uint8 images and int64 labels: from the Arrow cache, or the IDX files without HF datasets."""
        if importlib.util.find_spec("datasets") is None:  # e.g. a bare GPU image: parse the IDX files each time
            images, labels = read_idx_split(*_idx_paths(find_idx_dir(self.hparams.data_dir))[split])  # type: ignore[index]
            return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
        return load_split(self._cache_root(), split)

    def prepare_data(self) -> None:
        """Build the Arrow cache once (rank zero only under Lightning); without HF datasets, check the files."""
        if importlib.util.find_spec("datasets") is None:
            find_idx_dir(self.hparams.data_dir)
        else:
            self._cache_root()

    def setup(self, stage: str | None = None) -> None:
        """Load the splits ``stage`` needs as normalised tensors; idempotent."""
        if stage in (None, "fit", "validate") and self.data_train is None:
            images, labels = self._load("train")
            val_size = int(self.hparams.val_size)
            if val_size >= len(labels):
                raise ValueError(f"val_size={val_size} leaves no training data out of {len(labels)} samples")
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(int(self.hparams.seed)))
            self.val_indices, self.train_indices = perm[:val_size], perm[val_size:]
            self.data_train = TensorDataset(normalize(images[self.train_indices]), labels[self.train_indices])
            self.data_val = TensorDataset(normalize(images[self.val_indices]), labels[self.val_indices])
        if stage in (None, "test", "predict") and self.data_test is None:
            images, labels = self._load("test")
            self.data_test = TensorDataset(normalize(images), labels)
