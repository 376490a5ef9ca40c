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
    trainer_kwargs.setdefault("callbacks", [callback])
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
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
        ({"round_to": 2.5}, "`round_to` must be an integer >= 1 or 'auto', got 2.5"),
        ({"round_to": "fast"}, "`round_to` must be an integer >= 1 or 'auto', got 'fast'"),
        ({"cost": "watts"}, "`cost` must be one of flops, time, got 'watts'"),
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
    assert calls == [] and cb.loop.saturated


def test_a_compute_target_inside_the_controllers_deadband_stops_tracking_and_probing() -> None:
    """LQR never cuts while ``c - c* < deadband``: once there, the loop is saturated (no importance tracking, no
    probe) even where the planner could still cut a unit (``round_to=1``). Before, it kept tracking and probing to
    the end of the run: the reference MLP spent 3.2 s of a 70 s fit on it."""
    tracked: list[int] = []
    cb = ControlPruning(controller="lqr", target=0.5, every_n_steps=2, round_to=1, importance="trajectory",
                        controller_kwargs={"deadband": 0.05})
    original = cb.importance.before_optimizer_step
    cb.importance.before_optimizer_step = lambda m: (tracked.append(1), original(m))  # type: ignore[method-assign]
    trainer, _ = fit(cb, epochs=3)
    s = cb.summary()
    assert 0.5 <= s["flops_fraction"] < 0.5 + 0.05 + 0.01 and cb.loop.saturated
    assert s["flops_fraction"] - 0.5 > 1.0 / 64  # a one-unit cut (round_to=1) was still possible: not the planner
    assert 0 < len(tracked) < trainer.global_step - 10  # tracking stopped well before the end
    assert any(r["damage"] != r["damage"] for r in cb.trace[-3:])  # the last intervals read no probe


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_budget_tracks_no_importance_where_no_reading_can_follow(accumulate: int) -> None:
    """A quality budget cuts only on a reading: it tracks the importance up to every reading (the intervals the
    sensing budget leaves unread before it included: the path since the last cut ranks the next one), but not in a
    backoff's gap nor once the sensing budget cannot allow another reading before the end (exact: nothing is read
    in between, and the batches' FLOPs at the current width are known), under gradient accumulation too. Fails if
    the tracking goes on to the end (the old rule), or stops before a reading that does come."""
    every = 2
    for sense_budget, backoff in ((0.15, False), (0.3, True)):
        tracked: list[int] = []
        trainer_ref: list[L.Trainer] = []

        class Clock(L.Callback):
            def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
                trainer_ref.append(trainer)

        cb = ControlPruning(controller="lqr", target=0.1, quality_budget=0.05, every_n_steps=every, round_to=4,
                            importance="trajectory", sense_budget=sense_budget, controller_kwargs={"warmup": 0.0})
        original = cb.importance.before_optimizer_step
        cb.importance.before_optimizer_step = lambda m: (tracked.append(trainer_ref[0].global_step), original(m))  # type: ignore[method-assign]
        trainer, _ = fit(cb, epochs=4, callbacks=[Clock(), cb], accumulate_grad_batches=accumulate)
        rows = {r["step"]: r for r in cb.trace}
        read = {s for s, r in rows.items() if r["damage"] == r["damage"]}
        gaps = {s for s, r in rows.items() if r.get("reason", "").startswith("backoff")}
        ends = {(g // every + 1) * every for g in tracked}  # the control step that closes each tracked step's interval
        assert {s for s in read if s > min(rows)} <= ends  # every reading was tracked up to
        assert max(ends) == max(read) < max(rows)  # ... and the last one ended it, before the end
        assert not ends & gaps and bool(gaps) is backoff  # nothing tracked into a backoff's gap
        assert len(tracked) <= trainer.global_step - 2 * every
        assert ends - read  # the trajectory (a path integral) is tracked in unread intervals before a reading too


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_budget_tracks_scores_that_forget_only_in_the_intervals_before_a_reading(accumulate: int) -> None:
    """Taylor's EMA remembers ~10 steps (``Importance.memory``): with 4-step intervals a quality budget tracks only the
    3 intervals (12 steps) that end at or before each reading, not the unread ones before them. Fails if it tracks
    as for the trajectory (every interval up to the last reading), or misses a reading."""
    every, window, tracked, trainer_ref = 4, 12, [], []

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            trainer_ref.append(trainer)

    cb = ControlPruning(controller="lqr", target=0.1, quality_budget=0.05, every_n_steps=every, round_to=4,
                        sense_budget=0.3, controller_kwargs={"warmup": 0.0})  # importance "auto": Taylor
    assert cb.importance.name == "taylor" and cb.importance.memory == pytest.approx(10.0)
    original = cb.importance.before_optimizer_step
    cb.importance.before_optimizer_step = lambda m: (tracked.append(trainer_ref[0].global_step), original(m))  # type: ignore[method-assign]
    fit(cb, epochs=6 * accumulate, callbacks=[Clock(), cb], accumulate_grad_batches=accumulate)
    rows = {r["step"]: r for r in cb.trace}
    read = sorted(s for s, r in rows.items() if r["damage"] == r["damage"])
    ends = {(g // every + 1) * every for g in tracked}  # the control step that closes each tracked step's interval

    def next_read(end: int) -> int | None:
        return next((r for r in read if r >= end), None)

    assert len(read) >= 3 and len(rows) - len(read) >= 3, (read, sorted(rows))
    assert {r for r in read if r > min(rows)} <= ends  # every reading was tracked up to
    assert all(next_read(e) is not None and next_read(e) - e <= window - every for e in ends)  # only the window
    assert any(next_read(s) is not None and s not in ends for s in set(rows) - set(read))  # an unread one left out


def test_importance_is_tracked_from_one_interval_before_the_start_step_and_the_dense_run_never_probes() -> None:
    """Attached but not cutting costs nothing: no tracking before `start_step - every_n_steps`, no probe in `none`."""
    tracked: list[int] = []
    cb = ControlPruning(controller="lqr", target=0.5, every_n_steps=4, start_step=12, importance="trajectory")
    original = cb.importance.before_optimizer_step
    trainer_ref: list[L.Trainer] = []

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            trainer_ref.append(trainer)

    cb.importance.before_optimizer_step = lambda m: (tracked.append(trainer_ref[0].global_step), original(m))  # type: ignore[method-assign]
    fit(cb, epochs=1, callbacks=[Clock(), cb])
    assert tracked and min(tracked) == 8 and cb.history and cb.history[0]["step"] == 12

    dense = ControlPruning(controller="none", every_n_steps=2)
    dense.loop.probe_loss = lambda model: pytest.fail("the dense baseline ran a probe")  # type: ignore[method-assign]
    fit(dense, epochs=1)
    assert dense.trace and all(r["damage"] != r["damage"] for r in dense.trace)  # not read: NaN

    # an open-loop schedule acts on progress alone: it pays for no probe either, and still cuts on time
    gmp = ControlPruning(controller="gmp", target=0.5, every_n_steps=2, round_to=4, importance="magnitude")
    gmp.loop.probe_loss = lambda model: pytest.fail("the gmp schedule ran a probe")  # type: ignore[method-assign]
    fit(gmp, epochs=1)
    assert gmp.history and gmp.summary()["flops_fraction"] < 0.9


def test_group_limits_bind_in_a_fit_and_the_trace_never_goes_below_them_or_the_target() -> None:
    """An exact-name limit (net.3) wins over a prefix limit (net -> net.1); both bind before the target."""
    cb = ControlPruning(controller="gmp", target=0.1, every_n_steps=2, round_to=4, min_width=4,
                        importance="magnitude", group_limits={"net.3": 40, "net": 12},
                        controller_kwargs={"start": 0.0, "end": 0.5})
    _, model = fit(cb, epochs=1)
    limits = {"net.1": 12, "net.3": 40}
    assert [(g.name, g.min_width, g.round_to) for g in cb.groups] == [("net.1", 12, 4), ("net.3", 40, 4)]
    assert len(cb.trace) == 8 and cb.summary()["surgeries"] >= 2
    for r in cb.trace:
        assert all(r["widths"][n] >= lo for n, lo in limits.items()), r
        assert all(w % 4 == 0 for w in r["widths"].values()), r
        assert r["compute"] >= 0.1 - 1e-9, r
    # the limits bind (the target is out of reach): the run ends exactly at them, above the target
    assert cb.trace[-1]["widths"] == limits == cb.summary()["widths"]
    assert model.net[3].out_features == 40 and model.net[1].out_features == 12
    assert cb.summary()["flops_fraction"] > 0.1


def test_head_groups_keep_their_own_limit_and_step_one_head_at_a_time_in_a_fit() -> None:
    """round_to=8 / min_width=8 are for channels: heads step by one head, down to their own limit."""
    from torch.utils.data import DataLoader, TensorDataset

    from ctprune_lightning.models import GPTLanguageModel

    L.seed_everything(0)
    model = GPTLanguageModel(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_embd=32, scheduler="none",
                             warmup_steps=0)
    ids = torch.randint(0, 13, (64, 9), generator=torch.Generator().manual_seed(0))
    cb = ControlPruning(controller="gmp", target=0.2, every_n_steps=1, importance="magnitude", round_to=8,
                        min_width=8, group_limits={"model.blocks.0.attn": 2},
                        controller_kwargs={"start": 0.0, "end": 0.8})
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(model, DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=8, shuffle=True))
    heads, mlps = ("model.blocks.0.attn", "model.blocks.1.attn"), ("model.blocks.0.mlp.c_fc", "model.blocks.1.mlp.c_fc")
    assert {g.name: (g.min_width, g.round_to) for g in cb.groups} == {
        heads[0]: (2, 1), heads[1]: (1, 1), mlps[0]: (None, 8), mlps[1]: (None, 8)}
    seen = {name: [r["widths"][name] for r in cb.trace] for name in heads + mlps}
    assert all(r["compute"] >= 0.2 - 1e-9 for r in cb.trace)
    assert min(seen[heads[0]]) == 2 and min(seen[heads[1]]) == 1  # down to each head group's own limit ...
    assert 2 in seen[heads[1]]  # ... one head at a time (a step of 8 would go 4 -> 1 at once)
    assert all(w % 8 == 0 and w >= 8 for m in mlps for w in seen[m]) and min(seen[mlps[1]]) == 8
    assert model.model.blocks[1].attn.n_head == 1 and model.model.blocks[0].attn.n_head == 2


@pytest.mark.parametrize("controller", ["none", "gmp"])
def test_ledger_counts_a_partial_last_batch_by_its_size(controller: str) -> None:
    """80 samples in batches of 32: each epoch is 32 + 32 + 16 samples, i.e. 2.5 probe-sized batches."""
    from torch.utils.data import DataLoader, TensorDataset

    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(80, 32, generator=g), torch.randint(0, 10, (80,), generator=g))
    model = MLPClassifier(input_dim=32, hidden=(64, 64), num_classes=10, scheduler="none")
    cb = ControlPruning(controller=controller, target=0.3, every_n_steps=1, importance="magnitude", round_to=4,
                        controller_kwargs={"start": 0.0, "end": 0.5} if controller == "gmp" else None)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(model, DataLoader(data, batch_size=32, shuffle=False))
    s = cb.summary()
    dense = s["dense_step_flops"]
    assert trainer.global_step == 6 and dense > 0
    assert s["dense_train_flops"] == pytest.approx(2 * 2.5 * dense, rel=1e-12)
    # batch k runs at the architecture of the last cut at a step <= k (a cut at step s follows batch s - 1)
    scales = [1.0, 1.0, 0.5] * 2
    compute = [next((h["compute"] for h in reversed(s["history"]) if h["step"] <= k), 1.0) for k in range(6)]
    assert s["train_flops"] == pytest.approx(sum(c * dense * w for c, w in zip(compute, scales)), rel=1e-9)
    if controller == "gmp":
        assert s["surgeries"] >= 2 and s["train_flops"] < s["dense_train_flops"]
    else:
        assert s["train_flops"] == s["dense_train_flops"] and s["train_flops_saved"] == 0.0


def test_cost_time_and_round_to_auto_in_a_fit() -> None:
    """round_to="auto" resolves to CPU fp32's 8 at set-up; a cost model is measured on the first batch (real
    timings, so only what does not depend on them is asserted) and the summary reports FLOPs and modelled time.
    The ladder's time budget is far above what 3 points of this tiny MLP take (milliseconds), so a machine under
    load still measures every point (at 0.5 s a slow dense step left the narrowest width unmeasured)."""
    cb = ControlPruning(controller="linear", target=0.5, every_n_steps=2, importance="magnitude", round_to="auto",
                        cost="time", cost_kwargs={"max_seconds": 60.0, "points": 3, "repeats": 1, "cache": {}},
                        controller_kwargs={"end": 0.5})
    fit(cb, epochs=1)
    s = cb.summary()
    assert cb.loop.round_to == 8 and {g.round_to for g in cb.groups} == {8}
    model = s["cost_model"]
    assert s["cost"] == "time" and model["device"] == "cpu" and model["dtype"] == "torch.float32"
    assert set(model["groups"]) == {"net.1", "net.3"} and all(8 in g["measured"] for g in model["groups"].values())
    assert all(cb.loop.cost_model.allowed(n, w) for n, w in s["widths"].items())  # only frontier widths
    assert 0.0 < s["time_fraction"] <= 1.0 and 0.0 < s["flops_fraction"] <= 1.0
    assert all(0.5 - 1e-9 <= r["compute"] <= 1.0 for r in cb.trace)  # the controller read modelled time
    assert all("flops" in h for h in s["history"])


def test_the_callback_reports_its_own_time_and_reads_no_probe_once_nothing_is_due() -> None:
    cb = ControlPruning(controller="lqr", target=0.5, every_n_steps=2, round_to=4, importance="magnitude")
    reads = []
    loss = cb.loop.store.loss
    cb.loop.store.loss = lambda model: reads.append(1) or loss(model)  # count the probe's readings
    trainer, _ = fit(cb, epochs=2)
    s = cb.summary()
    assert s["flops_fraction"] == pytest.approx(0.5, abs=0.05) and cb.loop.saturated
    intervals = trainer.global_step // 2
    assert len(cb.trace) == intervals  # every interval keeps its trace row...
    idle = [r for r in cb.trace if r["damage"] != r["damage"]]  # ...but once saturated, the damage is not read
    assert idle and all(r["compute"] == s["flops_fraction"] for r in idle)
    assert len(reads) < intervals  # no probe reading for the idle rows (each cut still reads its jump)
    assert 0 < s["control_time_s"] < s["train_time_s"]
    assert s["control_overhead"] == pytest.approx(s["control_time_s"] / s["train_time_s"])
    parts = s["control_time_parts"]  # by part, each block charged once: the parts add up to the whole
    assert {"batch", "control", "probe", "flops", "surgery"} <= set(parts) and min(parts.values()) >= 0
    assert sum(parts.values()) == pytest.approx(s["control_time_s"], abs=1e-3)


def test_the_sensing_budget_bounds_the_probe_and_trial_forwards_and_every_unread_interval_says_why() -> None:
    """Reading at every step costs a tiny MLP a large share of its compute; ``sense_budget`` caps the probe's and
    the trials' forwards (counted in FLOPs: up to the last interval's readings). A compute target keeps its pace
    on the last reading (it reaches the target as without the cap); a quality budget holds on an unread interval.
    Counted in FLOPs, two runs of one seed decide alike whatever the machine's load."""

    def run(budget: float | None, **kwargs) -> ControlPruning:
        kwargs = {"controller": "lqr", "target": 0.3, **kwargs}
        cb = ControlPruning(every_n_steps=1, round_to=4, importance="magnitude", sense_budget=budget, **kwargs)
        fit(cb, epochs=4)
        return cb

    free, capped, again = run(None), run(0.05), run(0.05)
    share = {k: cb.summary()["sensing_share"] for k, cb in (("free", free), ("capped", capped))}
    one_reading = 2 / 3 / capped.summary()["steps"]  # two probe batches' forwards, as a share of the training
    assert share["free"] > 0.2 and not any("sensing budget" in r.get("reason", "") for r in free.trace)
    assert share["capped"] <= 0.05 + 4 * one_reading < share["free"]  # over by at most a cut's few readings
    unread = [r for r in capped.trace if r.get("reason", "").startswith("sensing budget")]
    assert unread and all(r["damage"] != r["damage"] and "the last reading holds" in r["reason"] for r in unread)
    assert any(r["action"] > 0 for r in unread)  # the target's pace is kept on the last reading
    assert len(capped.trace) == len(free.trace)  # every interval keeps its row
    assert capped.summary()["flops_fraction"] == pytest.approx(free.summary()["flops_fraction"], abs=0.05)
    assert [r["widths"] for r in again.trace] == [r["widths"] for r in capped.trace]  # deterministic
    assert capped.summary()["sensing_flops"] == pytest.approx(again.summary()["sensing_flops"])

    budget = run(0.05, target=0.1, quality_budget=0.05, controller_kwargs={"warmup": 0.0})
    held = [r for r in budget.trace if r.get("reason", "").startswith("sensing budget")]
    assert held and all(r["action"] == 0.0 and r["damage"] != r["damage"] for r in held)
    # the sensor still reads the free training channel on every interval, the probe only on those read
    readings = budget.loop.estimator.readings
    assert len(readings) == len(budget.trace) and [r[0] for r in readings] == [r["step"] for r in budget.trace]
    assert sum(r[1] is None for r in readings) == len(held) and all(r[2] is not None for r in readings)
    assert all(r[4] == 1 for r in readings[1:])  # each the mean of its own interval (the first: since the start)
    # the last interval read before the cap: its probe reading and a cut's trials (size_cut: at most 8)
    assert budget.summary()["sensing_share"] <= 0.05 + (1 + 8) * one_reading
    with pytest.raises(ValueError, match=r"sense_budget must be null or a share .* got 1.5"):
        ControlPruning(controller="lqr", sense_budget=1.5)


def test_every_control_interval_reaches_the_logger_at_its_step(tmp_path) -> None:
    """Each interval's values are written to the loggers at its own step and kept in ``callback_metrics``: fails if
    they go through ``self.log`` alone (Lightning then writes only its ``log_every_n_steps`` steps, here none of
    the intervals) or are written at another step."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    cb = ControlPruning(controller="lqr", target=0.3, every_n_steps=4, round_to=4, importance="magnitude")
    L.seed_everything(0)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(tmp_path, name="run"),
                        log_every_n_steps=50, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb])
    trainer.fit(MLPClassifier(input_dim=32, hidden=(64, 64), num_classes=10),
                datamodule=SyntheticDataModule(num_samples=512, input_shape=(32,), batch_size=32))
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get(FLOPS_RATIO)]
    assert [int(r["step"]) for r in rows] == [t["step"] for t in cb.trace] and len(rows) >= 6
    assert [float(r[FLOPS_RATIO]) for r in rows] == pytest.approx([t["compute"] for t in cb.trace])
    assert [float(r[ACTION]) for r in rows] == pytest.approx([t["action"] for t in cb.trace])
    assert trainer.callback_metrics[SAVED].item() == pytest.approx(cb.summary()["train_flops_saved"], abs=0.02)


def test_trajectory_tracking_copies_the_weights_when_lightning_clips_the_gradient_after_the_hook() -> None:
    """Lightning clips the gradient in place after the callbacks' ``on_before_optimizer_step``: the tracking must
    see it (and form −g·Δθ with the clipped gradient); without clipping it keeps the fused path. Fails if Lightning
    moves the clip or the tracking stops watching the gradients."""
    modes = {}
    for clip in (None, 0.5):
        cb = ControlPruning(controller="lqr", target=0.3, every_n_steps=5, round_to=4, importance="trajectory")
        fit(cb, epochs=1, gradient_clip_val=clip)
        modes[clip] = cb.importance._mode
        assert cb.summary()["surgeries"] >= 1
    assert modes == {None: "fused", 0.5: "copy"}
