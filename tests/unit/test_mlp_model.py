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


class _LogsEveryStep(MLPClassifier):
    """The classifier as it was: ``self.log`` on every step, the accuracy metric logged from the step."""

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc.update(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        pass


@pytest.mark.parametrize("every, limit", [(5, 1.0), (3, 7), (50, 7)])
def test_the_loggers_read_the_same_rows_as_when_every_step_logged(tmp_path, every: int, limit: float) -> None:
    """``train/loss`` is logged only on the steps whose logs Lightning writes (and each epoch's last batch), and
    ``train/acc`` at the epoch's end: the CSV must hold the same rows and values as logging every step did (a rule
    off by one step drops or shifts rows); a run shorter than ``log_every_n_steps`` still ends with ``train/loss`` in
    ``callback_metrics`` (the epoch's last batch logs it)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    rows = {}
    for cls in (_LogsEveryStep, MLPClassifier):
        L.seed_everything(0, verbose=False)
        dm = SyntheticDataModule(num_samples=20 * 16, input_shape=(1, 8, 8), batch_size=16, seed=0)
        model = cls(input_dim=64, hidden=(16,), lr=3e-3)
        trainer = L.Trainer(accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, max_epochs=2, log_every_n_steps=every,
                            limit_train_batches=limit, logger=CSVLogger(tmp_path, name=cls.__name__))
        trainer.fit(model, datamodule=dm)
        with open(trainer.logger.log_dir + "/metrics.csv") as f:
            table = [r for r in csv.DictReader(f)]
        rows[cls] = [(r["step"], r.get("train/loss"), r.get("train/acc")) for r in table
                     if r.get("train/loss") or r.get("train/acc")]
        assert "train/loss" in trainer.callback_metrics and "train/acc" in trainer.callback_metrics
    assert len([r for r in rows[MLPClassifier] if r[1]]) >= (3 if every < 14 else 0)
    assert len([r for r in rows[MLPClassifier] if r[2]]) == 2  # one accuracy per epoch
    assert rows[MLPClassifier] == rows[_LogsEveryStep]
