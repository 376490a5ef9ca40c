"""A quality budget in a real fit: the loop stops where the budget says, short of a too-aggressive floor."""

from __future__ import annotations

import lightning as L
import pytest

from ctprune_lightning import FINAL_DAMAGE, ControlPruning
from ctprune_lightning.data import SyntheticDataModule
from ctprune_lightning.models import MLPClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def fit(cb: ControlPruning) -> tuple[float, dict, set[str]]:
    """Overlapping classes (class_sep=2): capacity matters, so cutting to 3% of the FLOPs hurts."""
    L.seed_everything(0)
    dm = SyntheticDataModule(num_samples=2048, input_shape=(32,), batch_size=64, class_sep=2.0)
    model = MLPClassifier(input_dim=32, hidden=(128, 128), num_classes=10, lr=3e-3)
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(model, datamodule=dm)
    logged = set(trainer.callback_metrics)
    return float(trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]), cb.summary(), logged


def test_the_budget_loop_stops_short_of_a_floor_that_breaks_the_budget() -> None:
    budget, floor = 0.02, 0.03
    dense, _, _ = fit(ControlPruning(controller="none", every_n_steps=4))
    ramp, ramp_s, _ = fit(ControlPruning(controller="gmp", target=floor, every_n_steps=4, min_width=2,
                                         controller_kwargs={"start": 0.0, "end": 0.3}))
    loop, s, logged = fit(ControlPruning(controller="lqr", target=floor, quality_budget=budget, every_n_steps=4,
                                          min_width=2))
    assert ramp_s["flops_fraction"] < 0.05 and ramp > dense * (1 + budget)  # the open-loop ramp breaks it
    assert loop <= dense * (1 + budget)  # the loop stays within it, on held-out data
    assert 0.3 < s["flops_fraction"] < 1.0 and s["surgeries"] >= 1  # it cut, and stopped far above the floor
    rows = s["trace"]
    assert all(r["budget"] == budget and r["final_damage"] is not None and r["final_std"] >= 0 for r in rows)
    held = [r for r in rows if r["action"] == 0 and r["compute"] > floor + 0.01]
    assert held and all(r["reason"].startswith("budget:") for r in held[-5:])  # and says why it held
    assert all(r["final_damage"] + 2 * r["final_std"] >= budget for r in held[-5:])
    assert FINAL_DAMAGE in logged
