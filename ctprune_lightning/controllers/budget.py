"""The quality-budget mode of the feedback controllers: cut as much as the budget allows, as early as it allows.

The user states the quality they give up, ``budget`` (the relative excess of the held-out loss at the
end of training over the dense run's, or an error rate in points), and a compute floor ``target``.
The sensor (:class:`ctprune_lightning.sensing.DamageSensor`) predicts the final damage ``D`` with its
standard deviation ``σ``, and ``f ± σ_f``: the final damage per unit of immediate jump of a cut made
now (its persistent fraction, with the recovery still to come before the end).

**Plant model.** The controlled state is the slack under a chance constraint, in budgets::

    x_k = (budget − max(D_k + z·σ_k, 0)) / budget          P(final damage ≤ budget) ≳ 0.95 for z = 2
    x_{k+1} = x_k − v_k                                    v_k: the share of the budget a cut spends

A cut of immediate log-jump ``J`` spends ``v = J (f + z σ_f) / budget``. A cut made at progress ``p``
saves about ``(1 − p)`` of its size, so the slack is worth most early: the mode spends a fixed share
of it each interval — ``v = K x`` with ``K`` from the scalar DARE of the integrator (weights ``q`` on
the slack left unspent, ``r`` on the spend), or PI on ``x`` — and converts it to the largest immediate
jump the next cut may cause, ``max_jump = v·budget / (f + z σ_f)``. The loop then sizes the cut by a
*trial*: the planned units masked on the probe batches, bisected until the measured jump fits with its
standard error to spare (the sensor's law of it, :mod:`ctprune_lightning.jump_noise`: the largest cut
whose trial fits is biased low by about that much)
(:func:`ctprune_lightning.controllers.sizing.size_cut`). No prior cost per task, no blind first cut.

Caps and warm-up are in units of training progress (a run of 200 or 20 000 steps reads alike): no
cut before ``warmup``; at most ``max_rate`` of the dense compute removed per unit of progress. A
predicted improvement (negative damage) is not banked beyond the whole budget. Every hold has a reason.

**Growth** (``grow=True``). When even the optimistic bound is over budget, ``D − zσ > budget`` (a cut turned
out worse than its trial said), the mode asks the loop to grow back the groups cut last: ``grow_request``, the
compute (fraction of dense) whose predicted final damage equals the excess over the chance constraint,
``(D + zσ − budget) / r`` with ``r`` the sensor's final damage per unit of compute removed
(``Observation.cut_damage_rate``), capped at what was cut. Hysteresis, in control intervals: no growth within
``grow_hold`` intervals after a cut or a growth, no cut within ``grow_hold`` intervals after a growth. The loop
reports a realised growth as a negative ``last_action``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .base import Observation, check_number

__all__ = ["BudgetMode", "BudgetModeMixin", "slack_gain"]


def slack_gain(q: float, r: float) -> float:
    """LQR gain of the slack integrator ``x' = x − v`` with cost ``Σ q x² + r v²`` (scalar DARE, closed form).

    ``P = q + P − P² / (r + P)`` gives ``P = (q + √(q² + 4qr)) / 2`` and ``K = P / (r + P)`` in ``(0, 1)``.

    >>> round(slack_gain(1.0, 0.25), 4)
    0.8284
    """
    p = 0.5 * (q + math.sqrt(q * q + 4.0 * q * r))
    return p / (r + p)


def check_grow(grow: Any, grow_hold: Any) -> bool:
    """Validate the growth settings: ``grow`` a bool, ``grow_hold`` an integer >= 0."""
    if not isinstance(grow, bool):
        raise ValueError(f"`grow` must be true or false, got {grow!r}")
    if isinstance(grow_hold, bool) or not isinstance(grow_hold, int) or grow_hold < 0:
        raise ValueError(f"`grow_hold` must be an integer >= 0 (control intervals), got {grow_hold!r}")
    return grow


def predicted_final(obs: Observation) -> float:
    """The sensor's predicted final damage (its current damage when it has no prediction)."""
    return float(obs.final_damage if obs.final_damage is not None else obs.damage)


class BudgetMode:
    """The budget policy a feedback controller runs in when given a ``budget`` (see the module docstring).

    Args:
        budget: the quality given up, in ``(0, 1)``.
        margin: ``z``, the chance constraint's standard deviations (2: ≈ 97.7% one-sided for a Gaussian).
        warmup: no cut before this fraction of training (the sensor reads the dense curve first).
        max_rate: most dense compute removed per unit of training progress (5: half of it in 10% of training).
        grow: grow back the groups cut last when the budget is broken even on the optimistic bound.
        grow_hold: the hysteresis, in control intervals (see the module docstring).
    """

    def __init__(self, budget: float, margin: float = 2.0, warmup: float = 0.05, max_rate: float = 5.0,
                 grow: bool = False, grow_hold: int = 3) -> None:
        self.budget = check_number("quality_budget", budget, 0.0, 1.0, low_open=True, high_open=True)
        self.margin = check_number("margin", margin, 0.0)
        self.warmup = check_number("warmup", warmup, 0.0, 1.0, high_open=True)
        self.max_rate = check_number("max_rate", max_rate, 0.0, low_open=True)
        self.grow = check_grow(grow, grow_hold)
        self.grow_hold = int(grow_hold)
        self.reset()

    def reset(self) -> None:
        self.reason = ""
        self.max_jump: float | None = None
        self.cuts = 0  # realised cuts (the loop reports each as the next observation's last_action)
        self.grows = 0  # realised growths (a negative last_action)
        self.since_cut = self.since_grow = 10 ** 9  # control intervals since the last realised cut / growth
        self.grow_request = 0.0
        self.last_progress: float | None = None
        self.slack = math.nan

    @property
    def spent(self) -> bool:
        """Whether the last step found the budget spent with no growth to watch for (the slack it read is <= 0)."""
        return self.slack <= 0 and not self.grow

    def slack_of(self, obs: Observation) -> float:
        """The budget left under the chance constraint ``D + zσ <= budget``, in budgets (at most 1: a predicted
        improvement is not banked beyond the whole budget)."""
        return (self.budget - max(predicted_final(obs) + self.margin * float(obs.final_std), 0.0)) / self.budget

    def step(self, obs: Observation, target: float, spend: Callable[[float], float]) -> float:
        """``u``: the most compute the next cut may remove (the trial sizes it under ``max_jump``);
        ``spend(x) -> v`` is the controller's law: the share of the slack ``x`` (in budgets) to spend now."""
        cut, grown = obs.last_action > 1e-9, obs.last_action < -1e-9
        self.cuts += int(cut)
        self.grows += int(grown)
        self.since_cut = 1 if cut else self.since_cut + 1
        self.since_grow = 1 if grown else self.since_grow + 1
        dp = obs.progress - max(self.warmup, self.last_progress or 0.0)  # the rate cap runs from the warm-up's end
        self.last_progress = obs.progress
        x = self.slack = self.slack_of(obs)
        self.max_jump, self.grow_request = None, 0.0
        if self.grow and self._grow(obs, x):
            return 0.0
        self.reason = self._hold(obs, target, x)
        if self.reason:
            return 0.0
        if self.since_grow <= self.grow_hold:
            self.reason = f"hysteresis: no cut within {self.grow_hold} intervals of a growth ({self.since_grow} ago)"
            return 0.0
        u = min(self.max_rate * max(dp, 0.0), obs.compute - target)
        if u <= 1e-9:
            self.reason = "rate limit: no progress since the last cut"
            return 0.0
        v = float(min(max(spend(x), 0.0), x))
        factor = max(float(obs.next_factor if obs.next_factor is not None else 1.0), 0.0) \
            + self.margin * float(obs.next_factor_std)
        self.max_jump = v * self.budget / max(factor, 1e-3)  # a trial must fit it with its error to spare (loop)
        return float(u)

    def _grow(self, obs: Observation, x: float) -> bool:
        """Whether to grow now (then ``grow_request`` and ``reason`` say how much and why)."""
        low = predicted_final(obs) - self.margin * float(obs.final_std)
        removed = 1.0 - float(obs.compute)
        if not (math.isfinite(low) and low > self.budget and removed > 1e-9):
            return False
        over = f"predicted final D − {self.margin:g}σ = {low:.4f} > budget {self.budget:g}"
        recent = min(self.since_cut, self.since_grow)
        if recent <= self.grow_hold:
            self.reason = f"hysteresis: {over}, but no growth within {self.grow_hold} intervals of a surgery " \
                          f"({recent} ago)"
            return True
        excess = -x * self.budget  # D + zσ − budget: back inside the chance constraint
        rate = obs.cut_damage_rate
        g = removed if rate is None or not math.isfinite(rate) or rate <= 0 else min(excess / rate, removed)
        self.grow_request = float(g)
        self.reason = f"grow: {over}; excess {excess:.4f} / {rate if rate is not None else math.nan:.4f} " \
                      f"per unit of compute removed: +{g:.4f} of the dense compute"
        return True

    def _hold(self, obs: Observation, target: float, x: float) -> str:
        if obs.compute - target <= 1e-9:
            return "at the compute floor"
        if obs.progress < self.warmup:
            return f"warm-up: the sensor reads the dense curve first (progress {obs.progress:.3f} < {self.warmup:g})"
        if not math.isfinite(x):
            return "damage estimate not finite"
        if x <= 0:
            return (f"budget spent: predicted final damage {predicted_final(obs):.4f} + {self.margin:g}σ ({obs.final_std:.4f}) "
                    f">= {self.budget:g}")
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "cuts": self.cuts, "last_progress": self.last_progress,
                "max_jump": self.max_jump, "grows": self.grows, "since_cut": self.since_cut,
                "since_grow": self.since_grow, "grow_request": self.grow_request}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reason = str(state.get("reason", ""))
        self.cuts = int(state.get("cuts", 0))
        last, jump = state.get("last_progress"), state.get("max_jump")
        self.last_progress = None if last is None else float(last)
        self.max_jump = None if jump is None else float(jump)
        self.grows = int(state.get("grows", 0))
        self.since_cut = int(state.get("since_cut", 10 ** 9))
        self.since_grow = int(state.get("since_grow", 10 ** 9))
        self.grow_request = float(state.get("grow_request", 0.0))



class BudgetModeMixin:
    """The budget mode of a feedback controller: :meth:`set_budget` switches it on; the controller's own
    law says how much of the slack to spend (:meth:`spend`). Used by ``lqr`` and ``pid``."""

    target: float
    budget: float | None
    reason: str
    max_jump: float | None
    spent: bool

    def _init_budget(self, budget: float | None, margin: float, warmup: float, max_rate: float,
                     grow: bool = False, grow_hold: int = 3) -> None:
        self.margin = check_number("margin", margin, 0.0)
        self.warmup = check_number("warmup", warmup, 0.0, 1.0, high_open=True)
        self.max_rate = check_number("max_rate", max_rate, 0.0, low_open=True)
        self.grow = check_grow(grow, grow_hold)
        self.grow_hold = int(grow_hold)
        self.mode: BudgetMode | None = None
        if budget is not None:
            self.set_budget(budget)

    def set_budget(self, budget: float) -> None:
        self.mode = BudgetMode(budget, self.margin, self.warmup, self.max_rate, self.grow, self.grow_hold)
        self.budget = self.mode.budget

    def spend(self, x: float) -> float:
        """The share of the slack ``x`` (in budgets) to spend this interval."""
        raise NotImplementedError

    def _budget_step(self, obs: Observation) -> float:
        assert self.mode is not None
        u = self.mode.step(obs, self.target, self.spend)
        self.reason, self.max_jump, self.grow_request = self.mode.reason, self.mode.max_jump, self.mode.grow_request
        self.spent = self.mode.spent
        return u

    @property
    def cuts(self) -> int:
        """Realised cuts so far in budget mode."""
        return 0 if self.mode is None else self.mode.cuts

    def _budget_state(self) -> dict[str, Any]:
        return {} if self.mode is None else {"budget_mode": self.mode.state_dict()}

    def _load_budget_state(self, state: dict[str, Any]) -> None:
        if self.mode is not None and state.get("budget_mode") is not None:
            self.mode.load_state_dict(state["budget_mode"])
            self.reason, self.max_jump, self.grow_request = self.mode.reason, self.mode.max_jump, self.mode.grow_request
            self.spent = self.mode.spent
