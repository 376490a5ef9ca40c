"""Issue 18, "the controller uses it": a deliberately over-aggressive cut is undone by growth, and the final loss
ends within the budget, where a shrink-only run with the same cut does not."""

from __future__ import annotations

import pytest

from ctprune_lightning import ControlPruning
from ctprune_lightning.controllers import LQRController, Observation
from test_budget_fit import fit as budget_fit  # the same task and trainer

pytestmark = pytest.mark.usefixtures("one_thread")
BUDGET, FLOOR = 0.02, 0.03


class OverAggressive(LQRController):
    """The budget mode, except that its first action after 10% of training cuts to the floor, unsized."""

    forced = False

    def step(self, obs: Observation) -> float:
        u = super().step(obs)
        if not self.forced and obs.progress >= 0.1:
            self.forced = True
            self.max_jump, self.grow_request, self.reason = None, 0.0, "test: a deliberately over-aggressive cut"
            return obs.compute - self.target
        return u


def fit(cb: ControlPruning) -> tuple[float, dict]:
    """The overlapping classes of test_budget_fit (class_sep=2): cutting to 3% of the FLOPs breaks a 2% budget."""
    loss, summary, _ = budget_fit(cb)
    return loss, summary


def test_an_over_aggressive_cut_is_undone_by_growth_and_the_budget_kept() -> None:
    dense, _ = fit(ControlPruning(controller="none", every_n_steps=4))
    runs = {grow: fit(ControlPruning(controller=OverAggressive(FLOOR, budget=BUDGET, grow=grow, grow_hold=3),
                                     every_n_steps=4, min_width=2)) for grow in (False, True)}
    (shrunk, s_off), (grown, s_on) = runs[False], runs[True]
    assert shrunk > dense * (1 + BUDGET)  # shrink-only: the cut breaks the budget for good
    assert grown <= dense * (1 + BUDGET)  # growth undoes it: within the budget on held-out data
    assert s_off["flops_fraction"] < 0.05 and not any("grown" in r for r in s_off["trace"])

    rows = s_on["trace"]
    cut = next(r for r in rows if r["reason"].startswith("test:"))
    growths = [r for r in rows if "grown" in r]
    assert growths and cut["compute"] < 0.05
    first = growths[0]
    assert first["reason"].startswith("grow: predicted final D") and "units to groups" in first["reason"]
    assert first["final_damage"] - 2 * first["final_std"] > BUDGET  # confidently over budget
    assert first["action"] < 0 and first["compute"] > 0.5  # most of the cut given back...
    assert all(first["widths"][n] <= w for n, w in s_on["dense_widths"].items())  # ...never above dense
    # the hysteresis: no growth within 3 intervals (12 steps) of the cut; between them every interval holds, by the
    # hysteresis once the optimistic bound is over budget (before that, the budget is merely spent)
    assert first["step"] - cut["step"] > 3 * 4
    between = [r for r in rows if cut["step"] < r["step"] < first["step"]]
    assert all(r["action"] == 0 and r["reason"].startswith(("hysteresis", "budget spent")) for r in between)
    assert any(r["reason"].startswith("hysteresis") for r in between)

    # the FLOP ledger charges every batch at the architecture that ran, grown steps included
    steps = s_on["steps"]
    compute = [1.0] * steps
    for r in rows:
        for b in range(r["step"], steps):
            compute[b] = r["compute"]
    assert s_on["train_flops_saved"] == pytest.approx(1 - sum(compute) / steps, abs=0.01)
    assert s_on["train_flops_saved"] < s_off["train_flops_saved"] - 0.5  # the growth is paid for
