"""Data modules: IDX parsing, the Arrow cache, lookup errors, splits, normalisation, synthetic data."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from ctprune_lightning.data import fashion_mnist as fm
from ctprune_lightning.data.fashion_mnist import FashionMNISTDataModule, IDXFormatError, read_idx, read_idx_split
from ctprune_lightning.data.synthetic import SyntheticDataModule

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
    monkeypatch.delenv(fm.ENV_DATA_DIR, raising=False)


def _idx_bytes(array: np.ndarray) -> bytes:
    """An independent IDX writer (struct, not the module's write_idx)."""
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_gz(path: Path, payload: bytes) -> Path:
    with gzip.open(path, "wb") as fh:
        fh.write(payload)
    return path


def _fake_fashion_dir(root: Path, n_train: int = 40, n_test: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_y": (np.arange(n_train) % 10).astype(np.uint8),
              "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_y": (np.arange(n_test) % 10).astype(np.uint8)}
    for (split, (img_name, lab_name)) in fm.IDX_FILES.items():
        _write_gz(root / f"{img_name}.gz", _idx_bytes(arrays[f"{split}_x"]))
        _write_gz(root / f"{lab_name}.gz", _idx_bytes(arrays[f"{split}_y"]))
    return arrays


# ---------------------------------------------------------------- IDX parsing

def test_read_idx_parses_gzip_and_plain(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28).astype(np.uint8)
    gz = _write_gz(tmp_path / "x-idx3-ubyte.gz", _idx_bytes(images))
    plain = tmp_path / "x-idx3-ubyte"
    plain.write_bytes(_idx_bytes(images))
    for path in (gz, plain):
        out = read_idx(path, ndim=3)
        assert out.dtype == np.uint8 and out.shape == (3, 28, 28)
        np.testing.assert_array_equal(out, images)
    labels = np.array([9, 0, 3], dtype=np.uint8)
    lab = _write_gz(tmp_path / "y-idx1-ubyte.gz", _idx_bytes(labels))
    x, y = read_idx_split(gz, lab)
    np.testing.assert_array_equal(y, labels)
    # the module's writer is the inverse of the reader
    np.testing.assert_array_equal(read_idx(fm.write_idx(tmp_path / "w.gz", images), ndim=3), images)


@pytest.mark.parametrize("damage", ["magic", "truncated", "trailing_bytes", "not_gzip", "wrong_ndim"])
def test_corrupt_idx_names_the_file(tmp_path: Path, damage: str) -> None:
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    payload = _idx_bytes(images)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    if damage == "magic":
        _write_gz(path, b"\x00\x00\x0d\x03" + payload[4:])  # dtype 0x0d (float) instead of 0x08
    elif damage == "truncated":
        _write_gz(path, payload[:-100])
    elif damage == "trailing_bytes":
        _write_gz(path, payload + b"\x00" * 7)
    elif damage == "not_gzip":
        path.write_bytes(b"this is not a gzip stream at all")
    else:
        _write_gz(path, _idx_bytes(np.zeros((4, 784), dtype=np.uint8)))
    with pytest.raises(IDXFormatError, match="train-images-idx3-ubyte.gz") as info:
        read_idx(path, ndim=3)
    assert isinstance(info.value, ValueError)


def test_split_with_mismatched_counts_is_rejected(tmp_path: Path) -> None:
    img = _write_gz(tmp_path / "i.gz", _idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8)))
    lab = _write_gz(tmp_path / "l.gz", _idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(IDXFormatError, match="5 images but .* 4 labels"):
        read_idx_split(img, lab)
    bad = _write_gz(tmp_path / "b.gz", _idx_bytes(np.array([1, 2, 3, 4, 12], dtype=np.uint8)))
    with pytest.raises(IDXFormatError, match="label 12"):
        read_idx_split(img, bad)


# ---------------------------------------------------------------- lookup and cache

def test_missing_files_error_lists_places_and_how_to_get_data(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    nowhere = tmp_path / "no-system-data"
    monkeypatch.setattr(fm, "DEFAULT_DATA_DIR", str(nowhere))
    env_dir = tmp_path / "env-dir"
    monkeypatch.setenv(fm.ENV_DATA_DIR, str(env_dir))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        FashionMNISTDataModule(data_dir=str(empty)).prepare_data()
    msg = str(info.value)
    for needle in (str(empty), str(env_dir), str(nowhere), "dataset-fashion-mnist", "data_dir=",
                   "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "zalando-datasets/fashion_mnist"):
        assert needle in msg, needle


def test_env_var_is_searched_after_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_fashion_dir(tmp_path / "via-env")
    monkeypatch.setattr(fm, "DEFAULT_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv(fm.ENV_DATA_DIR, str(tmp_path / "via-env"))
    assert fm.find_idx_dir() == tmp_path / "via-env"
    _fake_fashion_dir(tmp_path / "explicit")
    assert fm.find_idx_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_cache_is_built_once_beside_the_files_and_reloads_equal(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = _fake_fashion_dir(tmp_path / "fmnist")
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "fmnist"), val_size=10, batch_size=8)
    dm.prepare_data()
    root = tmp_path / "fmnist" / fm.CACHE_SUBDIR
    assert (root / "train" / "dataset_info.json").is_file() and (root / "test" / "dataset_info.json").is_file()
    for split in ("train", "test"):
        images, labels = fm.load_split(root, split)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        np.testing.assert_array_equal(images.numpy(), arrays[f"{split}_x"])
        np.testing.assert_array_equal(labels.numpy(), arrays[f"{split}_y"])

    def _no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache was rebuilt although it is valid")

    monkeypatch.setattr(fm, "build_arrow_cache", _no_rebuild)
    dm2 = FashionMNISTDataModule(data_dir=str(tmp_path / "fmnist"), val_size=10, batch_size=8)
    dm2.prepare_data()
    dm2.setup()
    expected = (arrays["test_x"].astype(np.float32) / 255 - fm.FASHION_MNIST_MEAN) / fm.FASHION_MNIST_STD
    np.testing.assert_allclose(dm2.data_test.tensors[0][:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_cache_goes_to_cache_dir_or_user_cache_when_data_dir_is_read_only(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "readonly"
    _fake_fashion_dir(src)
    real_access = fm.os.access
    monkeypatch.setattr(fm.os, "access", lambda p, mode: False if Path(p) == src else real_access(p, mode))
    assert fm.ensure_arrow_cache(src) == tmp_path / "xdg_cache" / "ctprune_lightning" / "fashion_mnist" / \
        fm.CACHE_SUBDIR
    assert not (src / fm.CACHE_SUBDIR).exists()
    assert fm.ensure_arrow_cache(src, tmp_path / "mine") == tmp_path / "xdg_cache" / "ctprune_lightning" / \
        "fashion_mnist" / fm.CACHE_SUBDIR, "a valid cache anywhere is reused"
    other = tmp_path / "other"
    _fake_fashion_dir(other, n_train=30)  # different sources: the user cache is stale for these
    assert fm.ensure_arrow_cache(other, tmp_path / "mine") == tmp_path / "mine" / fm.CACHE_SUBDIR
    assert len(fm.load_split(tmp_path / "mine" / fm.CACHE_SUBDIR, "train")[1]) == 30


# ---------------------------------------------------------------- split, batches, Lightning

def test_split_sizes_seed_determinism_and_batches(tmp_path: Path) -> None:
    _fake_fashion_dir(tmp_path / "fmnist", n_train=40, n_test=12)

    def make(seed: int) -> FashionMNISTDataModule:
        dm = FashionMNISTDataModule(data_dir=str(tmp_path / "fmnist"), val_size=10, seed=seed, batch_size=8)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    a, b, c = make(0), make(0), make(1)
    assert (len(a.data_train), len(a.data_val), a.data_test) == (30, 10, None)
    assert sorted(torch.cat([a.train_indices, a.val_indices]).tolist()) == list(range(40))
    assert torch.equal(a.val_indices, b.val_indices) and not torch.equal(a.val_indices, c.val_indices)
    loader = a.train_dataloader()
    batches = list(loader)
    assert [len(y) for _, y in batches] == [8, 8, 8, 6]
    x, y = batches[0]
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    epoch1 = torch.cat([x for x, _ in batches])
    epoch2 = torch.cat([x for x, _ in loader])
    assert torch.equal(epoch1.sort(0).values, a.data_train.tensors[0].sort(0).values), "each sample once per epoch"
    assert not torch.equal(epoch1, epoch2), "reshuffled every epoch"
    assert torch.equal(epoch1, torch.cat([x for x, _ in b.train_dataloader()])), "same seed, same order"
    a.setup("test")
    assert len(a.data_test) == 12 and sum(len(y) for _, y in a.test_dataloader()) == 12
    with pytest.raises(ValueError, match="val_size=40"):
        FashionMNISTDataModule(data_dir=str(tmp_path / "fmnist"), val_size=40).setup("fit")
    with pytest.raises(ValueError, match="batch_size"):
        FashionMNISTDataModule(batch_size=0)


def test_datamodule_drives_a_lightning_fit(tmp_path: Path) -> None:
    from ctprune_lightning.models.mlp import MLPClassifier

    _fake_fashion_dir(tmp_path / "fmnist", n_train=40, n_test=12)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "fmnist"), val_size=8, batch_size=16)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    model = MLPClassifier(hidden=(16,))
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and "val/acc" in trainer.callback_metrics  # 32 train samples / 16
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    model.eval()
    with torch.no_grad():  # the logged accuracy is the model's on exactly the 12 test images
        pairs = [(model(x).argmax(1), y) for x, y in dm.test_dataloader()]
    correct = sum(int((p == y).sum()) for p, y in pairs)
    assert sum(len(y) for _, y in pairs) == 12 and acc == pytest.approx(correct / 12, abs=1e-6)


def test_real_fashion_mnist_is_normalised(tmp_path: Path) -> None:
    """CI installs dataset-fashion-mnist, so this runs on the real files (no skip)."""
    dm = FashionMNISTDataModule(data_dir=str(REAL_DIR), cache_dir=str(tmp_path / "cache"), val_size=5000)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (55000, 5000, 10000)
    x = torch.cat([dm.data_train.tensors[0], dm.data_val.tensors[0]])
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1.0) < 0.01
    labels = torch.cat([dm.data_train.tensors[1], dm.data_val.tensors[1]])
    assert torch.bincount(labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(dm.data_test.tensors[1], minlength=10).tolist() == [1000] * 10
    assert (dm.input_shape, dm.num_classes, dm.input_dim) == ((1, 28, 28), 10, 784)


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_seeded_balanced_and_shaped() -> None:
    a, b, c = (SyntheticDataModule(num_samples=100, input_shape=(1, 28, 28), seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert (len(a.data_train), len(a.data_val), len(a.data_test)) == (100, 25, 25)
    assert torch.equal(a.data_train.tensors[0], b.data_train.tensors[0])
    assert not torch.equal(a.data_train.tensors[0], c.data_train.tensors[0])
    assert torch.bincount(a.data_train.tensors[1], minlength=10).tolist() == [10] * 10
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and y.dtype == torch.int64
    assert (a.input_shape, a.dims, a.num_classes, a.input_dim) == ((1, 28, 28), (1, 28, 28), 10, 784)
    # learnable: the class means are far apart compared with the noise
    xs, ys = a.data_train.tensors[0].flatten(1), a.data_train.tensors[1]
    centroids = torch.stack([xs[ys == k].mean(0) for k in range(10)])
    nearest = torch.cdist(a.data_val.tensors[0].flatten(1), centroids).argmin(1)
    assert (nearest == a.data_val.tensors[1]).float().mean() > 0.9


def test_datamodule_without_hf_datasets_reads_the_idx_files_alike(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare image (e.g. a GPU node) without `datasets`: the same tensors, parsed from the IDX files."""
    _fake_fashion_dir(tmp_path / "idx")
    with_arrow = FashionMNISTDataModule(data_dir=str(tmp_path / "idx"), val_size=8, cache_dir=str(tmp_path / "c"))
    with_arrow.setup()
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else find_spec(name, *a))
    bare = FashionMNISTDataModule(data_dir=str(tmp_path / "idx"), val_size=8, cache_dir=str(tmp_path / "none"))
    bare.prepare_data()
    bare.setup()
    assert not (tmp_path / "none").exists()  # no Arrow cache written
    for a, b in ((with_arrow.data_train, bare.data_train), (with_arrow.data_val, bare.data_val),
                 (with_arrow.data_test, bare.data_test)):
        assert len(a) == len(b) > 0
        for x, y in zip(a.tensors, b.tensors):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_on_device_serves_the_same_batches_from_one_copy_on_the_trainers_device(tmp_path: Path) -> None:
    """No accelerator here: a trainer whose root device is ``meta`` stands in for a GPU. The split is copied there
    once (the same copy every epoch), the batches come from it in the order a host-side loader gives, and on a CPU
    trainer, or with ``on_device`` off, the host tensors are served as before."""
    from types import SimpleNamespace

    _fake_fashion_dir(tmp_path / "fmnist", n_train=40, n_test=12)

    def make(on_device: bool, device: str) -> FashionMNISTDataModule:
        dm = FashionMNISTDataModule(data_dir=str(tmp_path / "fmnist"), val_size=10, batch_size=8, on_device=on_device)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))  # type: ignore[assignment]
        return dm

    placed, host = make(True, "meta"), make(False, "meta")
    batches = list(placed.train_dataloader())
    assert [x.device.type for x, _ in batches] == ["meta"] * 4 and [len(y) for _, y in batches] == [8, 8, 8, 6]
    assert placed.train_dataloader().dataset is placed.train_dataloader().dataset  # copied once, not per epoch
    assert placed.data_train.tensors[0].device.type == "cpu"  # the host split is kept as it was
    order = [y for _, y in host.train_dataloader()]  # the same sampler, so the same samples in the same order
    assert [y.shape for _, y in batches] == [y.shape for y in order]
    assert next(iter(placed.val_dataloader()))[0].device.type == "meta"
    assert next(iter(make(True, "cpu").train_dataloader()))[0].device.type == "cpu"
    assert next(iter(host.train_dataloader()))[0].device.type == "cpu"
    with pytest.raises(ValueError, match="num_workers=0"):
        FashionMNISTDataModule(on_device=True, num_workers=2)
    with pytest.raises(ValueError, match="on_device must be true or false"):
        FashionMNISTDataModule(on_device="yes")  # type: ignore[arg-type]
