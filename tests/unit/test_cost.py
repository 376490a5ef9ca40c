"""The measured cost model: frontier, budget, ``round_to="auto"``, frontier planning, ``cost="time"``, never slower.

Step times come from a fake timer (a table of seconds per width), so nothing here depends on real timings.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ctprune_lightning import ControlPruning
from ctprune_lightning.accounting import count_training_flops
from ctprune_lightning.controllers import build_controller
from ctprune_lightning.cost import (CostModel, auto_round_to, candidate_widths, check_cost, measure_cost,
                                    precision_dtype)
from ctprune_lightning.importance import build_importance
from ctprune_lightning.loop import ControlLoop
from ctprune_lightning.planning import plan_widths
from ctprune_lightning.surgery import discover_groups

#: seconds per step with group "0" at a width (group "2" dense): 56 and 40 are slower than a wider width
TIMES_0 = {64: 10.0, 56: 10.5, 48: 8.0, 40: 8.5, 32: 6.0, 24: 5.0, 16: 4.0, 8: 3.5}
#: group "2": every narrower width is faster
TIMES_2 = {64: 10.0, 56: 9.5, 48: 9.0, 40: 8.5, 32: 8.0, 24: 7.5, 16: 7.0, 8: 6.5}


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    return model, (torch.randn(8, 16), torch.randint(0, 4, (8,)))


def fake_step_time(model: nn.Module) -> float:
    """The table's time for the group that is cut (the other one dense)."""
    w0, w2 = model[0].out_features, model[2].out_features
    return TIMES_0[w0] * TIMES_2[w2] / 10.0


def measured(model: nn.Module, batch, **kwargs) -> CostModel:
    groups, _ = discover_groups(model, batch[0], min_width=8, round_to=8)
    return measure_cost(model, groups, batch, loss_fn, min_width=8, round_to=8,
                        **{"points": 8, "step_time": fake_step_time, "cache": {}} | kwargs)


def test_the_frontier_drops_widths_measured_slower_than_a_wider_one_and_the_model_is_restored() -> None:
    model, batch = mlp()
    params = dict(model.named_parameters())
    cost = measured(model, batch)
    assert cost.groups["0"].times == TIMES_0 and cost.groups["2"].times == TIMES_2
    assert cost.frontier("0") == (64, 48, 32, 24, 16, 8)  # 56 (10.5 > 10) and 40 (8.5 > 8) dropped
    assert cost.frontier("2") == (64, 56, 48, 40, 32, 24, 16, 8)
    assert not cost.allowed("0", 56) and not cost.allowed("0", 40) and cost.allowed("0", 48)
    assert cost.describe()["groups"]["0"]["dropped"] == [56, 40]
    assert cost.complete and cost.dense_time == 10.0
    # product model: each group's time relative to dense
    assert cost.fraction({"0": 32, "2": 32}) == pytest.approx(0.6 * 0.8)
    assert dict(model.named_parameters()) == params and model[0].out_features == 64


def test_the_budget_bounds_the_ladder_but_every_group_gets_its_narrowest_width() -> None:
    model, batch = mlp()
    clock = [0.0]

    def step_time(m: nn.Module) -> float:  # each measurement costs one second on the fake clock
        clock[0] += 1.0
        return fake_step_time(m)

    cost = measured(model, batch, step_time=step_time, clock=lambda: clock[0], max_seconds=5.0)
    # dense (1 s), the two narrowest (round 0, always), then one more point per group fits in 5 s
    assert {n: sorted(g.times) for n, g in cost.groups.items()} == {"0": [8, 32, 64], "2": [8, 32, 64]}
    assert not cost.complete and cost.seconds == 5.0
    assert cost.groups["0"].candidates == (64, 56, 48, 40, 32, 24, 16, 8)


def test_times_are_cached_in_memory_and_on_disk(tmp_path) -> None:
    model, batch = mlp()
    calls = []

    def step_time(m: nn.Module) -> float:
        calls.append(1)
        return fake_step_time(m)

    cache: dict = {}
    first = measured(model, batch, step_time=step_time, cache=cache, cache_dir=tmp_path)
    n = len(calls)
    assert n == 1 + 7 + 7 and first.cached == 0
    again = measured(model, batch, step_time=step_time, cache=cache)
    fresh = measured(model, batch, step_time=step_time, cache={}, cache_dir=tmp_path)  # read from the file
    assert len(calls) == n and again.cached == fresh.cached == 15
    assert fresh.frontier("0") == first.frontier("0")
    assert len(json.loads((tmp_path / "ctprune_cost_cache.json").read_text())) == 3  # dense, "0", "2"


def test_a_real_measurement_restores_buffers_and_rng() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
    batch = (torch.randn(8, 16), torch.randint(0, 4, (8,)))
    groups, _ = discover_groups(model, batch[0], min_width=8, round_to=8)
    stats = model[1].running_mean.clone()
    rng = torch.get_rng_state()
    cost = measure_cost(model, groups, batch, loss_fn, min_width=8, round_to=8, points=3, repeats=1, cache={})
    assert torch.equal(model[1].running_mean, stats) and torch.equal(torch.get_rng_state(), rng)
    assert sorted(cost.groups["0"].times) == [8, 16, 32] and cost.dense_time > 0
    assert all(p.grad is None for p in model.parameters())


def test_round_to_auto_resolves_for_the_device_and_dtype_and_rejects_other_strings() -> None:
    assert auto_round_to("cpu", torch.float32) == 8
    assert auto_round_to("cuda", precision_dtype("bf16-mixed")) == 64
    assert auto_round_to("cuda", precision_dtype("32-true")) == 32
    model, batch = mlp()
    loop = ControlLoop(build_controller("linear", 0.5), build_importance("magnitude"), target=0.5, round_to="auto",
                       loss_fn=loss_fn)
    loop.discover(model, batch[0])
    assert loop.round_to == 8 and {g.round_to for g in loop.groups} == {8}
    assert ControlPruning(round_to="auto").loop.round_to == "auto"  # resolved at set-up, from the trainer
    for bad in ("fast", "Auto", 0, 2.5):
        with pytest.raises(ValueError, match=r"`round_to` must be an integer >= 1 or 'auto', got"):
            ControlPruning(round_to=bad)
    with pytest.raises(ValueError, match="known: 32, 32-true"):
        precision_dtype("fp8")


def test_the_planner_with_a_cost_model_never_returns_a_width_off_the_frontier() -> None:
    model, batch = mlp()
    cost = measured(model, batch)
    groups, _ = discover_groups(model, batch[0], min_width=8, round_to=8)
    total, per_module = count_training_flops(model, batch, loss_fn)
    widths = {"0": 64, "2": 64}
    off = set()
    for frac in [i / 40 for i in range(8, 40)]:
        plain = plan_widths(widths, per_module, total, groups, frac * total, min_width=8, round_to=8)
        planned = plan_widths(widths, per_module, total, groups, frac * total, min_width=8, round_to=8, cost=cost)
        off |= {plain["0"]} - set(cost.frontier("0"))
        assert planned["0"] in cost.frontier("0") and planned["2"] in cost.frontier("2"), (frac, planned)
    assert off == {56, 40}  # without the cost model the planner does pick the dropped widths
    # in modelled time (predict): the plan's modelled time reaches the target and stays on the frontier
    planned = plan_widths(widths, per_module, cost.dense_time, groups, 0.7 * cost.dense_time, min_width=8,
                          round_to=8, cost=cost, predict=cost.step_time)
    assert cost.step_time(planned) >= 0.7 * cost.dense_time and planned["0"] in cost.frontier("0")
    assert cost.step_time(planned) < cost.dense_time


def loop_with(cost: str = "flops", **kwargs) -> tuple[ControlLoop, nn.Module, tuple]:
    model, batch = mlp()
    loop = ControlLoop(build_controller("linear", 0.5, end=0.5), build_importance("magnitude"), target=0.5,
                       min_width=8, round_to=8, probe_batches=1, loss_fn=loss_fn, cost=cost, **kwargs)
    loop.discover(model, batch[0])
    loop.add_probe(model, batch)
    loop.update_saturation(model)
    return loop, model, batch


def test_cost_time_is_the_controllers_compute_and_the_summary_reports_both() -> None:
    loop, model, batch = loop_with("time", cost_kwargs={"step_time": fake_step_time, "cache": {}, "points": 8})
    assert loop.cost_model is not None and loop.compute(model) == 1.0
    obs = loop.observe(model, step=10, progress=0.25)
    plan = loop.decide(model, obs)
    assert plan.keep and plan.widths["0"] in loop.cost_model.frontier("0")
    loop.apply_(model, plan, [])
    loop.count_batch(model, batch)
    loop.record(model, obs, plan)
    s = loop.summary(steps=10)
    flops = loop.flops(model)[0] / loop.ledger.dense_step_flops
    time_fraction = loop.cost_model.fraction(loop.widths(model))
    assert s["cost"] == "time" and s["time_fraction"] == pytest.approx(time_fraction) and time_fraction < 1.0
    assert s["flops_fraction"] == pytest.approx(flops) and flops != pytest.approx(time_fraction)
    assert s["history"][-1]["compute"] == pytest.approx(time_fraction)  # the controller read modelled time
    assert s["train_time_saved"] == pytest.approx(1.0 - time_fraction)
    assert s["cost_model"]["groups"]["0"]["dropped"] == [56, 40]
    # the cost model survives a state_dict round trip (no re-measurement on resume)
    clone, _, _ = loop_with("time", cost_kwargs={"step_time": lambda m: 1.0, "cache": {}})
    clone.load_state_dict(loop.state_dict())
    assert clone.cost_model.describe() == loop.cost_model.describe()
    assert ControlLoop(build_controller("none", 1.0), build_importance("magnitude"), 1.0).summary(0)["cost"] == "flops"


class SlowerThanDense(CostModel):
    """A cost model whose every cut is modelled as slow as dense (e.g. a launch-bound GPU)."""

    def step_time(self, widths) -> float:
        return self.dense_time


def test_a_plan_not_modelled_faster_than_dense_is_held_with_a_reason() -> None:
    loop, model, _ = loop_with("flops", cost_kwargs={"step_time": fake_step_time, "cache": {}})
    obs = loop.observe(model, step=10, progress=0.25)
    assert loop.decide(model, obs).keep  # the measured model lets it cut
    loop.cost_model = SlowerThanDense(loop.cost_model.dense_time, loop.cost_model.groups)
    plan = loop.decide(model, obs)
    assert plan.requested > 0 and not plan.keep and plan.widths == {"0": 64, "2": 64}
    row = loop.record(model, obs, plan)
    assert row["reason"].startswith("cost: the planned widths' modelled time per step is 1.000 of dense")
    assert row["widths"] == {"0": 64, "2": 64} and not loop.history


def test_bad_cost_values_name_the_allowed_ones() -> None:
    for bad in ("watts", "FLOPS", None, 1):
        with pytest.raises(ValueError, match=r"`cost` must be one of flops, time, got"):
            ControlPruning(cost=bad)
        with pytest.raises(ValueError, match="flops, time"):
            ControlLoop(build_controller("none", 1.0), build_importance("magnitude"), 1.0, cost=bad)
    assert check_cost("time") == "time"
    with pytest.raises(ValueError, match="cost_model=False"):
        ControlPruning(cost="time", cost_model=False)
    assert ControlPruning(cost="time").loop.cost_kwargs == {} and ControlPruning().loop.cost_kwargs is None
    assert ControlPruning(cost_model=True, cost_kwargs={"max_seconds": 1}).loop.cost_kwargs == {"max_seconds": 1}


def test_candidate_widths_are_the_planners_steps() -> None:
    assert candidate_widths(30, 8, 8) == [30, 24, 16, 8]
    assert candidate_widths(12, 1, 1) == list(range(12, 0, -1))  # heads
    assert candidate_widths(64, 12, 8) == [64, 56, 48, 40, 32, 24, 16, 12]


def test_a_group_the_budget_does_not_reach_is_assumed_proportional_to_its_width() -> None:
    model, batch = mlp()
    clock = [0.0]

    def step_time(m: nn.Module) -> float:
        clock[0] += 1.0  # every measurement takes one second
        return fake_step_time(m)

    cost = measured(model, batch, step_time=step_time, clock=lambda: clock[0], max_seconds=2.0)
    # the dense step (1 s) and group 0's narrowest width (2 s) fit; group 2 is not measured at all
    assert sorted(cost.groups["0"].times) == [8, 64] and not cost.groups["0"].assumed
    g = cost.groups["2"]
    assert g.assumed and list(g.times) == [64] and cost.seconds == 2.0
    assert g.time(32) == pytest.approx(cost.dense_time / 2)  # in proportion to the width
    assert g.frontier == g.candidates  # every width is faster than a wider one: none is dropped
    assert cost.describe()["groups"]["2"]["assumed"] is True


def test_an_unmeasured_group_is_assumed_to_save_its_share_of_the_step_and_the_loop_passes_its_flop_share() -> None:
    """With ``shares``, a group the budget did not time saves only its share of the step, in proportion to its width
    (a bug that scaled the whole step by every unmeasured group's width ratio, compounded, predicted the ResNet-20's
    run 58% faster where it was 6%). The loop's shares are the FLOPs each group's modules own: cutting one group
    alone is then modelled exactly as the FLOPs predict it."""
    model, batch = mlp()
    cost = measured(model, batch, max_seconds=0.0, shares={"0": 0.25, "2": 0.5})  # only the dense step is timed
    assert cost.groups["0"].assumed and cost.groups["2"].assumed
    assert cost.groups["0"].time(32) == pytest.approx(cost.dense_time * (1 - 0.25 * 0.5))
    assert CostModel.from_state(cost.state_dict()).groups["2"].share == 0.5  # survives a checkpoint
    with pytest.raises(ValueError, match=r"share must be a number in \[0, 1\].*'2': 1.5"):
        measured(model, batch, shares={"2": 1.5})

    loop = ControlLoop(build_controller("lqr", 0.3), build_importance("magnitude"), target=0.3, loss_fn=loss_fn,
                       min_width=8, round_to=8, cost="time",
                       cost_kwargs={"step_time": fake_step_time, "max_seconds": 0.0, "cache": {}})
    loop.discover(model, batch[0])
    loop.add_probe(model, batch)
    def net(w0: int, w2: int) -> nn.Module:  # the MLP with its two hidden widths
        return nn.Sequential(nn.Linear(16, w0), nn.ReLU(), nn.Linear(w0, w2), nn.ReLU(), nn.Linear(w2, 4))

    dense = count_training_flops(model, batch, loss_fn)[0]
    for name, widths in (("0", {"0": 16, "2": 64}), ("2", {"0": 64, "2": 32})):
        flops = count_training_flops(net(widths["0"], widths["2"]), batch, loss_fn)[0] / dense
        assert loop.cost_model.fraction(widths) == pytest.approx(flops, rel=1e-9)
        assert 0 < loop.cost_model.groups[name].share < 1
