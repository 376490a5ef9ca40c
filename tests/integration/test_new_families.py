"""Layer families added through the handler registry shrink during a short fit: nn.GRU / nn.LSTM hidden
units (the tracer used to die on them), a depthwise-separable convolution (used to be refused), grouped
convolutions, and GroupNorm in whole groups (used to be left dense)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_any_module import CLASSES, DIM, Base, fit
from torch import nn

from ctprune_lightning import load_pruned
from ctprune_lightning.surgery.optim import live_parameters_missing


class Recurrent(Base):
    def __init__(self, kind: str = "GRU") -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, 32)
        self.rnn = getattr(nn, kind)(32, 48, num_layers=2, batch_first=True)
        self.head = nn.Linear(48, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(torch.relu(self.inp(tokens)))
        return self.head(out[:, -1])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        tokens = batch["features"].unsqueeze(1).expand(-1, 4, -1) * torch.linspace(0.5, 1.5, 4)[None, :, None]
        return self.record(F.cross_entropy(self(tokens), batch["label"]))


class Image(Base):
    """The features as one-channel 4x4 images."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.record(F.cross_entropy(self(batch["features"].view(-1, 1, 4, 4)), batch["label"]))


class Separable(Image):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.dw, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32)
        self.pw, self.bn3 = nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.dw(x)))
        x = F.relu(self.bn3(self.pw(x)))
        return self.head(x.mean((2, 3)))


class Grouped(Image):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.gc, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.gc(x)))
        return self.head(x.mean((2, 3)))


class GroupNormed(Image):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.gn1 = nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(8, 32)
        self.conv, self.gn2 = nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.gn1(self.stem(x)))
        x = F.silu(self.gn2(self.conv(x)))
        return self.head(x.mean((2, 3)))


def _check(module: Base, trainer: object, cb: object, tmp_path: Path, shrunk: dict[str, int]) -> None:
    s = cb.summary()
    assert s["surgeries"] >= 2 and s["train_flops_saved"] > 0.1, s
    for name, dense in shrunk.items():
        assert s["widths"][name] < dense == s["dense_widths"][name], (name, s["widths"])
    assert live_parameters_missing(module, trainer.optimizers) == []
    held = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert len(held) == len(list(module.parameters()))
    losses = torch.tensor(module.losses)
    assert torch.isfinite(losses).all() and losses[-8:].mean() < losses[:4].mean()
    rebuilt = load_pruned(type(module), tmp_path / "last.ckpt", **module.hparams)
    for (name, a), (_, b) in zip(module.state_dict().items(), rebuilt.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a.cpu(), b), name


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_recurrent_hidden_units_shrink_in_a_fit(kind: str, tmp_path: Path) -> None:
    module = Recurrent(kind)
    trainer, cb = fit(module, tmp_path, target=0.5, round_to=1)
    assert {g.name: [s.kind for s in g.slices] for g in cb.groups}["rnn"] == ["rnn_hidden", "linear_in"]
    _check(module, trainer, cb, tmp_path, {"rnn": 48})
    assert module.rnn.hidden_size == module.head.in_features == module.rnn.weight_hh_l1.shape[1] < 48
    assert module.rnn.weight_ih_l1.shape == (module.rnn.weight_hh_l1.shape[0], module.rnn.hidden_size)


def test_depthwise_separable_convolution_shrinks_in_a_fit(tmp_path: Path) -> None:
    module = Separable()
    trainer, cb = fit(module, tmp_path, target=0.5, round_to=1)
    slices = {g.name: {(s.module, s.kind) for s in g.slices} for g in cb.groups}
    assert slices["stem"] == {("stem", "conv_out"), ("bn1", "norm"), ("dw", "depthwise"), ("bn2", "norm"),
                              ("pw", "conv_in")}, slices
    _check(module, trainer, cb, tmp_path, {"stem": 32})
    assert module.dw.groups == module.dw.in_channels == module.dw.out_channels == module.stem.out_channels < 32


def test_grouped_convolution_shrinks_uniformly_per_group_in_a_fit(tmp_path: Path) -> None:
    module = Grouped()
    trainer, cb = fit(module, tmp_path, target=0.5, round_to=1)
    slices = {g.name: {(s.module, s.kind) for s in g.slices} for g in cb.groups}
    assert slices["stem"] == {("stem", "tiled4:conv_out"), ("bn1", "tiled4:norm"), ("gc", "gconv_in")}, slices
    assert slices["gc"] == {("gc", "gconv_out"), ("bn2", "tiled4:norm"), ("head", "tiled4:linear_in")}, slices
    s = cb.summary()
    assert any(s["widths"][n] < s["dense_widths"][n] == 8 for n in ("stem", "gc")), s["widths"]
    _check(module, trainer, cb, tmp_path, {})
    gc = module.gc
    assert gc.groups == 4 and gc.in_channels == module.stem.out_channels == 4 * gc.weight.shape[1]
    assert gc.out_channels == module.bn2.num_features == module.head.in_features
    assert gc.out_channels % 4 == 0 and gc.in_channels * gc.out_channels < 32 * 32


def test_groupnorm_shrinks_in_whole_groups_in_a_fit(tmp_path: Path) -> None:
    module = GroupNormed()
    trainer, cb = fit(module, tmp_path, target=0.5, round_to=1, min_width=2)
    slices = {g.name: {(s.module, s.kind) for s in g.slices} for g in cb.groups}
    assert slices["stem"] == {("stem", "blocked4:conv_out"), ("gn1", "blocked4:norm"), ("conv", "blocked4:conv_in")}
    assert slices["conv"] == {("conv", "blocked4:conv_out"), ("gn2", "blocked4:norm"), ("head", "blocked4:linear_in")}
    _check(module, trainer, cb, tmp_path, {"stem": 8, "conv": 8})
    for conv, gn in ((module.stem, module.gn1), (module.conv, module.gn2)):
        assert gn.num_channels == conv.out_channels == 4 * gn.num_groups < 32
