"""MLPClassifier: structure, learning on synthetic data, optimizer/scheduler choices, argument errors."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from ctprune_lightning.data.synthetic import SyntheticDataModule
from ctprune_lightning.models.common import WarmupCosine
from ctprune_lightning.models.mlp import MLPClassifier


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def _trainer(**kwargs: object) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


class _RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_structure_norms_dropout_and_input_shapes() -> None:
    model = MLPClassifier(input_dim=784, hidden=(32, 16), num_classes=10)
    kinds = [type(m) for m in model.net]
    assert kinds == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [m.out_features for m in model.net if isinstance(m, nn.Linear)] == [32, 16, 10]
    assert model.example_input_array.shape == (2, 784)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10) and model(torch.zeros(3, 784)).shape == (3, 10)
    ln = MLPClassifier(hidden=(8,), norm="layernorm", dropout=0.1)
    assert [type(m) for m in ln.net] == [nn.Flatten, nn.Linear, nn.LayerNorm, nn.ReLU, nn.Dropout, nn.Linear]
    bn = MLPClassifier(hidden=(8,), norm="batchnorm")
    assert isinstance(bn.net[2], nn.BatchNorm1d) and bn.net[2].num_features == 8
    assert [type(m) for m in MLPClassifier(hidden=(8,), norm="none").net] == [nn.Flatten, nn.Linear, nn.ReLU,
                                                                               nn.Linear]
    # hyper-parameters are saved and rebuild the same model
    clone = MLPClassifier(**model.hparams)
    assert [p.shape for p in clone.parameters()] == [p.shape for p in model.parameters()]
    assert model.train_acc is not model.val_acc and model.val_acc is not model.test_acc


def test_learns_synthetic_data_and_logs_all_keys() -> None:
    L.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(num_samples=512, input_shape=(1, 28, 28), batch_size=64, seed=0)
    model = MLPClassifier(input_dim=784, hidden=(64,), lr=3e-3, warmup_steps=2)
    trainer = _trainer(max_epochs=2)
    trainer.validate(model, datamodule=dm, verbose=False)
    acc_before = trainer.callback_metrics["val/acc"].item()
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    assert acc_before < 0.3, "an untrained model is near chance (0.1)"
    assert metrics["val/acc"].item() > 0.8, metrics
    assert metrics["train/loss"].item() < math.log(10)
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert set(test) == {"test/loss", "test/acc"} and test["test/acc"] > 0.8


def test_adamw_with_warmup_cosine_schedule_steps_per_batch() -> None:
    dm = SyntheticDataModule(num_samples=160, batch_size=16)
    model = MLPClassifier(hidden=(16,), lr=0.01, weight_decay=0.05, warmup_steps=4)
    lr_log = _RecordLR()
    trainer = _trainer(max_epochs=2, limit_val_batches=0, callbacks=[lr_log])
    trainer.fit(model, datamodule=dm)
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.05
    assert trainer.lr_scheduler_configs[0].interval == "step"
    lrs = lr_log.lrs
    assert len(lrs) == 20  # 10 batches x 2 epochs
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])), "cosine decays monotonically"
    assert lrs[-1] < 0.001 and opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_sgd_momentum_without_scheduler() -> None:
    model = MLPClassifier(hidden=(16,), optimizer="sgd", lr=0.05, momentum=0.8, weight_decay=0.0, scheduler="none")
    lr_log = _RecordLR()
    trainer = _trainer(max_steps=5, limit_val_batches=0, callbacks=[lr_log])
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=128, batch_size=16))
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.8
    assert trainer.lr_scheduler_configs == [] and lr_log.lrs == [0.05] * 5
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


def test_warmup_cosine_values_and_state_dict() -> None:
    f = WarmupCosine(warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert f(500) == pytest.approx(0.0)
    assert WarmupCosine(0, None)(10**6) == 1.0
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(10, 110))
    state = sched.state_dict()
    assert state["lr_lambdas"][0] == {"warmup_steps": 10, "total_steps": 110}


@pytest.mark.parametrize(("kwargs", "bad", "allowed"), [
    ({"optimizer": "adam"}, "'adam'", "adamw"),
    ({"scheduler": "step"}, "'step'", "cosine"),
    ({"norm": "groupnorm"}, "'groupnorm'", "batchnorm"),
])
def test_bad_names_raise_with_allowed_values(kwargs: dict, bad: str, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        MLPClassifier(**kwargs)
    assert bad in str(info.value) and allowed in str(info.value)


def test_bad_numbers_raise() -> None:
    for kwargs in ({"dropout": 1.0}, {"hidden": (0,)}, {"lr": 0.0}, {"warmup_steps": -1}):
        with pytest.raises(ValueError):
            MLPClassifier(**kwargs)
