"""Growth in the budget mode: the controller grows back the groups cut last when the budget is broken even on
the optimistic bound (issue 18, "the controller uses it"), and the loop turns the request into ``Plan.grow``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctprune_lightning.controllers import Observation, build_controller
from ctprune_lightning.importance import build_importance
from ctprune_lightning.loop import ControlLoop, Plan

T = 1000


def obs(progress: float, compute: float = 0.5, final: float = 0.0, std: float = 0.0, last: float = 0.0,
        rate: float | None = 0.1) -> Observation:
    return Observation(step=int(progress * T), progress=progress, compute=compute, damage=final, final_damage=final,
                       final_std=std, next_factor=0.5, next_factor_std=0.1, last_action=last, cut_damage_rate=rate)


@pytest.mark.parametrize("name", ["lqr", "pid"])
def test_grows_only_when_confidently_over_budget_and_sizes_it_by_the_excess(name: str) -> None:
    ctl = build_controller(name, 0.1, budget=0.02, warmup=0.0, grow=True, grow_hold=2)
    # D + 2σ over budget but D − 2σ not: the budget is spent, no growth
    assert ctl.step(obs(0.3, final=0.025, std=0.005)) == 0 and ctl.grow_request == 0
    assert ctl.reason.startswith("budget spent")
    # D − 2σ = 0.04 > 0.02: grow back (0.05 + 2·0.005 − 0.02) / 0.1 = 0.4 of the dense compute
    assert ctl.step(obs(0.4, final=0.05, std=0.005)) == 0
    assert ctl.grow_request == pytest.approx(0.4)
    assert ctl.reason.startswith("grow: predicted final D − 2σ = 0.0400 > budget 0.02")
    # capped at what was cut (compute 0.5: at most 0.5 back); no rate from the sensor: all of it
    assert ctl.step(obs(0.5, final=0.5, std=0.0)) == 0 and ctl.grow_request == pytest.approx(0.5)
    assert ctl.step(obs(0.6, final=0.05, rate=None)) == 0 and ctl.grow_request == pytest.approx(0.5)
    # nothing cut: nothing to grow
    assert ctl.step(obs(0.7, compute=1.0, final=0.05)) == 0 and ctl.grow_request == 0
    # grow=False (the default): the same reading only holds
    off = build_controller(name, 0.1, budget=0.02, warmup=0.0)
    assert off.step(obs(0.4, final=0.05, std=0.005)) == 0 and off.grow_request == 0
    assert off.reason.startswith("budget spent")


def test_hysteresis_no_chattering_over_a_sequence() -> None:
    """A reading that swings across the budget every interval: growth at most every grow_hold + 1 intervals, and
    never a cut within grow_hold intervals of a growth."""
    hold = 3
    ctl = build_controller("lqr", 0.1, budget=0.02, warmup=0.0, grow=True, grow_hold=hold)
    events, last = [], 0.0
    for k in range(40):
        over = k % 2 == 0
        ctl.step(obs(0.1 + 0.02 * k, final=0.06 if over else -0.05, std=0.002, last=last))
        if ctl.grow_request > 0:
            events.append((k, "grow"))
            last = -ctl.grow_request  # the loop reports a realised growth as a negative action
        elif ctl.reason == "":
            events.append((k, "cut"))
            last = 0.05
        else:
            last = 0.0
    grows = [k for k, e in events if e == "grow"]
    assert grows and all(b - a > hold for a, b in zip(grows, grows[1:]))
    for k, e in events:
        if e == "cut":
            assert all(not (0 < k - g <= hold) for g in grows)  # no cut right after a growth
        if e == "grow":
            assert all(not (0 < k - c <= hold) for c, ce in events if ce == "cut")  # nor a growth right after a cut
    assert ctl.mode is not None and ctl.mode.grows == len(grows)
    held = ctl.step(obs(0.95, final=0.06, std=0.002, last=0.05))  # right after a cut, over budget: held, with why
    assert held == 0 and ctl.grow_request == 0 and ctl.reason.startswith("hysteresis: predicted final D − 2σ")


def test_growth_state_round_trips_and_settings_are_checked() -> None:
    ctl = build_controller("pid", 0.1, budget=0.02, warmup=0.0, grow=True, grow_hold=2)
    for p, last, final in ((0.1, 0.0, 0.0), (0.2, 0.3, 0.0), (0.3, 0.0, 0.08), (0.4, 0.0, 0.08), (0.5, 0.0, 0.08)):
        ctl.step(obs(p, final=final, last=last))
    assert ctl.grow_request > 0
    clone = build_controller("pid", 0.1, budget=0.02, warmup=0.0, grow=True, grow_hold=2)
    clone.load_state_dict(ctl.state_dict())
    assert clone.state_dict() == ctl.state_dict() and clone.grow_request == ctl.grow_request
    nxt = obs(0.6, final=0.08, last=-0.2)  # the growth was realised: both hold for the hysteresis
    assert clone.step(nxt) == ctl.step(nxt) == 0 and clone.reason == ctl.reason and clone.grow_request == 0
    with pytest.raises(ValueError, match="grow_hold"):
        build_controller("lqr", 0.1, budget=0.02, grow=True, grow_hold=-1)
    with pytest.raises(ValueError, match="`grow` must be true or false"):
        build_controller("lqr", 0.1, budget=0.02, grow="yes")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int = 0):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def test_a_growth_plan_restores_the_last_cut_groups_and_the_trace_records_it() -> None:
    torch.manual_seed(0)
    model = Net()
    ctl = build_controller("lqr", 0.05, budget=0.02, warmup=0.0, grow=True, grow_hold=0)
    loop = ControlLoop(ctl, build_importance("magnitude"), 0.05, min_width=4)
    batch = (torch.randn(32, 16), torch.randint(0, 4, (32,)))
    loop.discover(model, batch[0])
    loop.add_probe(model, batch)
    loop.add_probe(model, batch)
    loop.start_budget(total_steps=100, interval=10)
    opt = torch.optim.Adam(model.parameters())
    names = [g.name for g in loop.groups]
    dense = loop.widths(model)
    # two cuts, the second deeper; record each as the loop does
    for step, widths in ((10, {names[0]: 48, names[1]: 48}), (20, {names[0]: 16, names[1]: 32})):
        o = loop.observe(model, step, step / 100)
        now = loop.widths(model)
        keep = {n: list(range(w)) for n, w in widths.items()}
        plan = Plan(step=step, widths={**now, **widths}, keep=keep, requested=0.1)
        loop.apply_(model, plan, [opt])
        loop.record(model, o, plan)
    c2 = loop.history[-1]["compute"]
    # a request for all of the last cut: back to the widths before it (48, 48), not to dense
    assert loop.plan_growth(model, loop.history[0]["compute"] - c2) == {names[0]: 32, names[1]: 16}
    # half of it: each group grows by about half the units the last cut took
    half = loop.plan_growth(model, 0.5 * (loop.history[0]["compute"] - c2))
    assert half == {names[0]: 16, names[1]: 8}
    # more than the last cut: the cut before gives back too, never above dense
    assert loop.plan_growth(model, 5.0) == {n: dense[n] - loop.widths(model)[n] for n in names}
    # the controller asks (D − 2σ over budget), the loop plans, applies and records it
    ctl.grow_request, ctl.reason = 0.0, ""
    ctl.mode.grow_hold = 0
    x = torch.randn(8, 16)
    with torch.no_grad():
        before = model(x)
    o = Observation(step=30, progress=0.3, compute=c2, damage=0.2, final_damage=0.2, final_std=0.01,
                    cut_damage_rate=0.2 / (1 - c2), next_factor=0.5)
    plan = loop.decide(model, o)
    assert plan.grow and not plan.keep and plan.requested < 0
    assert all(n in (names[0], names[1]) for n in plan.grow)
    loop.apply_(model, plan, [opt])
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)  # function-preserving
    row = loop.record(model, o, plan)
    assert row["grown"] == plan.grow and row["action"] < 0 and row["compute"] > c2
    assert row["reason"].startswith("grow: predicted final D − 2σ") and "units to groups" in row["reason"]
    assert loop.history[-1]["grown"] == plan.grow and loop.widths(model) == plan.widths
    assert len(loop.estimator.cuts) == 2  # a growth is not fed to the sensor as a cut
    # the next observation reports the growth as a negative action: the controller's hysteresis sees it
    nxt = loop.observe(model, 40, 0.4)
    assert nxt.last_action < 0


def test_the_printed_trace_keeps_every_growth_like_every_cut() -> None:
    from ctprune_lightning.summary import _pick_rows

    trace = [{"step": 10 * i, "action": 0.0} for i in range(40)]
    trace[7]["action"], trace[23]["action"] = 0.3, -0.25  # a cut, then a growth
    rows = _pick_rows(trace, 6)
    assert 7 in rows and 23 in rows
