"""A quality budget in a real fit: the loop stops where the budget says, short of a too-aggressive floor."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from ctprune_lightning import FINAL_DAMAGE, ControlPruning
from ctprune_lightning.controllers import Observation
from ctprune_lightning.data import SyntheticDataModule
from ctprune_lightning.models import MLPClassifier
from ctprune_lightning.trial import read_cut

pytestmark = pytest.mark.usefixtures("one_thread")


def fit(cb: ControlPruning, metric: str = "val/loss") -> tuple[float, dict, set[str]]:
    """Overlapping classes (class_sep=2): capacity matters, so cutting to 3% of the FLOPs hurts."""
    L.seed_everything(0)
    dm = SyntheticDataModule(num_samples=2048, input_shape=(32,), batch_size=64, class_sep=2.0)
    model = MLPClassifier(input_dim=32, hidden=(128, 128), num_classes=10, lr=3e-3)
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(model, datamodule=dm)
    logged = set(trainer.callback_metrics)
    return float(trainer.validate(model, datamodule=dm, verbose=False)[0][metric]), cb.summary(), logged


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
    rows = [r for r in s["trace"] if "budget" in r]  # the intervals read (no sensing budget here)
    unread = [r for r in s["trace"] if "budget" not in r]  # after holds with nothing to do: the backoff's gaps
    assert all(r["reason"].startswith("backoff:") and r["action"] == 0 for r in unread)
    assert all(r["budget"] == budget and r["final_damage"] is not None and r["final_std"] >= 0 for r in rows)
    held = [r for r in rows if r["action"] == 0 and r["compute"] > floor + 0.01 and r["progress"] >= 0.05]
    assert held and all(r["reason"].startswith(("budget spent:", "trial:", "payback:")) for r in held)  # says why
    spent = [r for r in held if r["reason"].startswith("budget spent:")]
    assert all(r["final_damage"] + 2 * r["final_std"] >= budget for r in spent)
    assert FINAL_DAMAGE in logged


def short_fit(cb: ControlPruning, samples: int = 512, max_steps: int = 8,
              **trainer_kwargs) -> tuple[SyntheticDataModule, MLPClassifier]:
    L.seed_everything(0)
    dm = SyntheticDataModule(num_samples=samples, input_shape=(32,), batch_size=64)
    model = MLPClassifier(input_dim=32, hidden=(64, 64), num_classes=10, lr=3e-3)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], **trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    return dm, model


def test_the_budget_sensor_probes_held_out_validation_batches() -> None:
    cb = ControlPruning(controller="lqr", target=0.1, quality_budget=0.01, every_n_steps=2, probe_batches=2)
    dm, model = short_fit(cb)
    val = list(dm.val_dataloader())[:2]
    assert len(cb.loop.held_out) == 2
    for kept, batch in zip(cb.loop.held_out, val):
        assert all(torch.equal(a, b) for a, b in zip(kept, batch))  # the first validation batches
    train_x = cb.loop.probe[0][0]
    assert not any(torch.equal(train_x, b[0]) for b in val)  # FLOPs still counted on a training batch
    model.eval()
    with torch.no_grad():
        expected = sum(float(nn.functional.cross_entropy(model(x), y)) for x, y in val) / 2
    assert cb.loop.probe_loss(model) == pytest.approx(expected, rel=1e-6)
    restored = ControlPruning(controller="lqr", target=0.1, quality_budget=0.01)
    restored.load_state_dict(cb.state_dict())  # the held-out probe travels in the checkpoint
    assert all(torch.equal(a[0], b[0]) for a, b in zip(restored.loop.held_out, cb.loop.held_out))


def test_a_sized_cut_is_read_on_unselected_batches_before_it_is_made() -> None:
    """``confirm_batches``: the validation batches after the probe's are kept; each cut sized by trial is read on them
    (nothing committed) and made only if its jump there fits the allowance within 2 of that read's errors. Fails if
    the batches are not the next ones, the read changes the model, its jump is off, a refusal still cuts, or the cut
    scaled down to that read is not made when it fits there (or made when it does not)."""
    cb = ControlPruning(controller="lqr", target=0.1, quality_budget=0.05, every_n_steps=2, probe_batches=2,
                        confirm_batches=3, controller_kwargs={"warmup": 0.0})
    dm, model = short_fit(cb, samples=2048, max_steps=40)  # 6 validation batches; a run long enough to repay a check
    val = list(dm.val_dataloader())
    assert len(cb.loop.store.confirm) == 3 and cb.summary()["surgeries"] >= 1
    assert all(torch.equal(kept[0], batch[0]) for kept, batch in zip(cb.loop.store.confirm, val[2:5]))
    assert cb.summary()["control_time_parts"]["confirm"] > 0
    # the read itself: the jump of the cut on those batches, the model left as it was
    group = cb.loop.groups[0]
    keep = {group.name: list(range(0, group.width(model), 2))}
    before = [p.detach().clone() for p in model.parameters()]
    model.eval()
    with torch.no_grad():
        base = sum(float(nn.functional.cross_entropy(model(x), y)) for x, y in val[2:5]) / 3
    loop, widths = cb.loop, cb.loop.widths(model)
    new = {**widths, group.name: len(keep[group.name])}
    obs = Observation(step=0, progress=0.5, compute=loop.compute(model), damage=0.0)
    loop._keep = lambda *args: keep  # the units this test chose, not the importance's
    assert loop.confirm_cut(model, obs, widths, new, 0.2, max_jump=10.0) == (new, keep, 0.2)
    assert loop.confirm_cut(model, obs, widths, new, 0.2, max_jump=-1.0) == (widths, {}, 0.2)
    jump = float(loop.hold_reason.split(" reads ")[1].split(":")[0].split(",")[0])
    after = read_cut(model, cb.loop.groups, keep, lambda m: sum(
        float(nn.functional.cross_entropy(m(x), y)) for x, y in val[2:5]) / 3)
    assert loop.hold_reason.startswith("confirm:") and jump == pytest.approx(math.log(after / base), abs=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # too large there: the cut scaled to that read (jump ∝ size) is read once more, and made if it fits
    loop.estimator = None  # no read-error allowance: the comparisons below are exact
    width = group.width(model)
    milder = {group.name: [i for i in range(width) if i % 4]}  # a quarter of the units out, not half
    severe = {group.name: [0]}
    mild_jump = loop._confirm_jump(model, milder, loop.store.confirm_loss(model))
    assert 0 < mild_jump < jump
    loop._plan_widths = lambda m, o, u: {**widths, group.name: len(milder[group.name])}
    loop._keep = lambda m, w, n: keep if n == new else milder
    smaller = math.floor(0.2 * 0.98 * mild_jump / jump / 0.005) * 0.005
    assert loop.confirm_cut(model, obs, widths, new, 0.2, max_jump=mild_jump) == (
        {**widths, group.name: len(milder[group.name])}, milder, pytest.approx(smaller))
    loop._keep = lambda m, w, n: keep if n == new else severe  # the scaled cut reads worse: no cut, both reads
    assert loop.confirm_cut(model, obs, widths, new, 0.2, max_jump=mild_jump) == (widths, {}, 0.2)
    assert loop.hold_reason.count(" reads ") == 2
    # a refusal is a hold with its reason, and no cut
    refused = ControlPruning(controller="lqr", target=0.1, quality_budget=0.05, every_n_steps=2, confirm_batches=3,
                             controller_kwargs={"warmup": 0.0})
    def refuse(model, obs, widths, new, size, max_jump):
        refused.loop.hold_reason = "confirm: refused"
        return dict(widths), {}, size

    refused.loop.confirm_cut = refuse
    short_fit(refused, samples=2048, max_steps=40)
    assert refused.summary()["surgeries"] == 0
    assert any(r["reason"] == "confirm: refused" for r in refused.trace)
    with pytest.raises(ValueError, match=r"`confirm_batches` must be an integer >= 0, got -1"):
        ControlPruning(controller="lqr", confirm_batches=-1)
    few = ControlPruning(controller="lqr", target=0.1, quality_budget=0.05, every_n_steps=2, confirm_batches=3)
    with pytest.warns(UserWarning, match="only 0 batches beyond the 2 probe batches"):
        short_fit(few)  # 2 validation batches: nothing to check on
    assert few.loop.store.confirm == []


def test_probe_data_choices_and_missing_validation_data() -> None:
    with pytest.raises(ValueError, match="probe_data.*auto, train, val.*'test'"):
        ControlPruning(controller="lqr", probe_data="test")
    with pytest.raises(ValueError, match="probe_data='val'.*no validation batches"):
        short_fit(ControlPruning(controller="lqr", probe_data="val", every_n_steps=2), limit_val_batches=0)
    cb = ControlPruning(controller="lqr", target=0.1, quality_budget=0.01, every_n_steps=2)
    with pytest.warns(UserWarning, match="reads training batches instead"):
        short_fit(cb, limit_val_batches=0)
    assert cb.loop.held_out == [] and len(cb.loop.probe) == 2
    plain = ControlPruning(controller="lqr", every_n_steps=2)  # no budget: the training probe, as before
    short_fit(plain)
    assert plain.loop.held_out == []


def test_an_error_rate_budget_in_points_stops_short_of_a_floor_that_breaks_it() -> None:
    """The same overlapping classes, the budget in accuracy points (absolute error rate) instead of loss."""
    points, floor = 0.03, 0.03
    dense, _, _ = fit(ControlPruning(controller="none", every_n_steps=4), "val/acc")
    ramp, ramp_s, _ = fit(ControlPruning(controller="gmp", target=floor, every_n_steps=4, min_width=2,
                                         controller_kwargs={"start": 0.0, "end": 0.3}), "val/acc")
    loop, s, _ = fit(ControlPruning(controller="lqr", target=floor, quality_budget=points, budget_metric="error",
                                    every_n_steps=4, min_width=2, probe_batches=4), "val/acc")
    assert ramp_s["flops_fraction"] < 0.05 and ramp < dense - points  # the open-loop ramp breaks it
    assert loop >= dense - points  # the loop keeps it, on held-out data
    assert floor + 0.02 < s["flops_fraction"] < 1.0 and s["surgeries"] >= 1  # short of the floor that breaks it
    rows = [r for r in s["trace"] if "budget" in r]  # the intervals read (the others: the backoff's gaps)
    assert all(r["reason"].startswith("backoff:") for r in s["trace"] if "budget" not in r)
    assert all(r["budget_metric"] == "error" and r["budget"] == points for r in rows)
    # the readings are error rates (a fraction of the probe's samples), not log-ratios of a loss
    assert all(0.0 < r["reference"] < 1.0 for r in rows) and max(abs(r["final_damage"]) for r in rows) < 1.0


def test_budget_metric_choices_and_an_unreadable_error() -> None:
    with pytest.raises(ValueError, match="budget_metric.*loss, error.*'points'"):
        ControlPruning(controller="lqr", quality_budget=0.01, budget_metric="points")
    with pytest.raises(ValueError, match="'error' needs a quality_budget"):
        ControlPruning(controller="lqr", budget_metric="error")
    cb = ControlPruning(controller="lqr", target=0.1, quality_budget=0.01, budget_metric="error",
                        error_fn=lambda model, batch: model(batch["missing"]), every_n_steps=2)
    with pytest.warns(UserWarning, match="probe fails on a validation batch"):  # "auto": the training probe
        with pytest.raises(ValueError, match="probe fails on a training batch.*TypeError"):  # fails as well
            short_fit(cb)
    assert cb.loop.held_out == [] and cb.loop.trace == []  # refused before the first step


def test_a_budget_with_nothing_worth_cutting_stops_reading_in_a_fit() -> None:
    """A budget so small that no cut worth its sizing fits: after the first decision (two trials) the loop cuts
    nothing and reads no more — every later interval is a hold with the idle reason, no probe or trial forward is
    added, the importance tracking stops, and the training-loss channel is not kept growing. Fails if the idle state
    is lost between intervals or still senses."""
    cb = ControlPruning(controller="lqr", target=0.1, quality_budget=1e-6, every_n_steps=2, confirm_batches=3,
                        controller_kwargs={"warmup": 0.0})
    store, read_while_idle, tracked_while_idle = cb.loop.store, [], []
    values = store.values  # every reading (probe, trial, check, training channel) goes through it
    store.values = lambda *args: (read_while_idle.append(bool(cb.loop.idle)), values(*args))[1]
    track = cb.importance.before_optimizer_step
    cb.importance.before_optimizer_step = lambda m: (tracked_while_idle.append(bool(cb.loop.idle)), track(m))[1]
    short_fit(cb, samples=2048, max_steps=60)  # the first request (0.25) is above the price (0.15): it is tried
    rows = cb.trace
    first = next(i for i, r in enumerate(rows) if r["reason"].startswith("payback: the smallest cut"))
    assert rows[first]["trials"] == 2 and cb.summary()["surgeries"] == 0
    later = rows[first + 1:]
    assert len(later) >= 10 and all(r["reason"] == cb.loop.idle for r in later)
    assert cb.loop.idle.endswith("no further reading") and cb.loop.saturated and cb._train_loss == []
    assert read_while_idle.count(False) >= 3 and not any(read_while_idle)  # read before, never after
    assert tracked_while_idle.count(False) >= 1 and not any(tracked_while_idle)
