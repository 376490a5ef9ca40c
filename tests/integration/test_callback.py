"""ControlPruning inside a real Lightning fit (synthetic data, seconds)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ctprune_lightning import ControlPruning
from ctprune_lightning.callback import ACTION, DAMAGE, FLOPS_RATIO, SAVED
from ctprune_lightning.data import SyntheticDataModule
from ctprune_lightning.models import MLPClassifier
from ctprune_lightning.surgery.optim import optimizer_params


def fit(callback: ControlPruning, epochs: int = 2, hidden=(64, 64), **trainer_kwargs):
    L.seed_everything(0)
    dm = SyntheticDataModule(num_samples=512, input_shape=(32,), batch_size=32)
    model = MLPClassifier(input_dim=32, hidden=hidden, num_classes=10)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        **trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    return trainer, model


def test_lqr_shrinks_to_the_setpoint_and_keeps_the_optimizer_whole() -> None:
    cb = ControlPruning(controller="lqr", target=0.3, every_n_steps=2, round_to=4, importance="magnitude")
    trainer, model = fit(cb)
    s = cb.summary()
    assert s["surgeries"] >= 3
    assert 0.3 <= s["flops_fraction"] < 0.45  # reached near the setpoint, never below it
    assert all(r["compute"] >= 0.3 - 1e-9 for r in cb.trace)
    assert all(w % 4 == 0 and w < 64 for w in s["widths"].values())
    assert model.net[1].out_features == s["widths"]["net.1"] and model.net[3].in_features == s["widths"]["net.1"]
    assert 0.4 < s["train_flops_saved"] < 0.7 and s["train_time_s"] > 0
    live = list(model.parameters())
    in_opt = optimizer_params(trainer.optimizers)
    assert len(in_opt) == len(live) and all(any(p is q for q in in_opt) for p in live)
    for key in (FLOPS_RATIO, SAVED, DAMAGE, ACTION):
        assert key in trainer.callback_metrics
    assert trainer.callback_metrics[FLOPS_RATIO].item() == pytest.approx(s["flops_fraction"])
    assert trainer.progress_bar_metrics[FLOPS_RATIO] == pytest.approx(s["flops_fraction"])


def test_dense_baseline_measures_the_same_quantities_without_cutting() -> None:
    cb = ControlPruning(controller="none", every_n_steps=2)
    trainer, model = fit(cb, epochs=1)
    s = cb.summary()
    assert s["surgeries"] == 0 and s["widths"] == s["dense_widths"] == {"net.1": 64, "net.3": 64}
    assert s["train_flops_saved"] == 0.0 and s["train_flops"] == s["dense_train_flops"] > 0
    assert s["flops_fraction"] == 1.0 and len(s["trace"]) == trainer.global_step // 2


def test_control_clock_is_the_optimizer_step_under_gradient_accumulation() -> None:
    cb = ControlPruning(controller="gmp", target=0.5, every_n_steps=2, importance="taylor")
    trainer, _ = fit(cb, epochs=1, accumulate_grad_batches=2)
    steps = [r["step"] for r in cb.trace]
    assert steps == list(range(2, trainer.global_step + 1, 2))
    assert trainer.global_step == 8  # 16 batches / 2


def test_cut_units_are_the_least_important() -> None:
    """With magnitude importance, units whose weights were zeroed are the first to go."""
    L.seed_everything(0)
    model = MLPClassifier(input_dim=32, hidden=(64, 64), num_classes=10, lr=1e-6)
    with torch.no_grad():
        model.net[1].weight[40:] = 0
        model.net[1].bias[40:] = 0
        model.net[3].weight[:, 40:] = 0
    marker = model.net[1].weight[:40].clone()
    cb = ControlPruning(controller="gmp", target=0.3, every_n_steps=1, importance="magnitude",
                        controller_kwargs={"start": 0.0, "end": 0.01})
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb])
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=256, input_shape=(32,), batch_size=32))
    width = model.net[1].out_features
    assert 8 <= width <= 40, width
    # every survivor is one of the 40 live units (lr 1e-6: the values barely moved)
    dist = torch.cdist(model.net[1].weight.detach(), marker)
    assert torch.all(dist.min(dim=1).values < 1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": 0.0}, r"`target` must be in \(0.0, 1.0\], got 0.0"),
        ({"target": 1.5}, r"got 1.5"),
        ({"controller": "bang"}, "Unknown controller 'bang'. Choose one of: none, gmp, linear, pid, lqr"),
        ({"importance": "random"}, "Unknown importance 'random'. Choose one of: magnitude, taylor, trajectory"),
        ({"every_n_steps": 0}, "`every_n_steps` must be an integer >= 1, got 0"),
        ({"round_to": 2.5}, "`round_to` must be an integer >= 1, got 2.5"),
        ({"controller_kwargs": {"gain": 1}}, r"Unexpected argument\(s\) \['gain'\] for controller 'lqr'"),
    ],
)
def test_bad_arguments_fail_eagerly_with_the_allowed_values(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        ControlPruning(**kwargs)


def test_a_model_with_nothing_prunable_is_refused_at_setup() -> None:
    class Linear(MLPClassifier):
        pass

    model = Linear(input_dim=32, hidden=(), num_classes=10)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ControlPruning()])
    with pytest.raises(ValueError, match=r"Linear has nothing prunable \(net.1: output layer"):
        trainer.fit(model, datamodule=SyntheticDataModule(num_samples=64, input_shape=(32,), batch_size=32))
    assert model.net[1].weight.shape == (10, 32)


def test_importance_stops_once_no_cut_is_possible() -> None:
    """Dense baseline and saturated runs do not pay for importance tracking."""
    calls: list[int] = []

    class Counting(ControlPruning):
        pass

    cb = Counting(controller="none", every_n_steps=2, importance="trajectory")
    original = cb.importance.before_optimizer_step
    cb.importance.before_optimizer_step = lambda m: (calls.append(1), original(m))  # type: ignore[method-assign]
    fit(cb, epochs=1)
    assert calls == [] and cb._saturated
