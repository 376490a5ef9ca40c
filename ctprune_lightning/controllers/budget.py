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
jump the next cut may cause, ``max_jump = v·budget / (f + z σ_f) − σ_J`` (``σ_J``: the error of a measured
jump: the largest cut whose trial fits is biased low by about that much). The loop then sizes the cut by a
*trial*: the planned units masked on the probe batches, bisected until the measured jump fits
(:func:`ctprune_lightning.controllers.sizing.size_cut`). No prior cost per task, no blind first cut.

Caps and warm-up are in units of training progress (a run of 200 or 20 000 steps reads alike): no
cut before ``warmup``; at most ``max_rate`` of the dense compute removed per unit of progress. A
predicted improvement (negative damage) is not banked beyond the whole budget. Every hold has a reason.
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


class BudgetMode:
    """The budget policy a feedback controller runs in when given a ``budget`` (see the module docstring).

    Args:
        budget: the quality given up, in ``(0, 1)``.
        margin: ``z``, the chance constraint's standard deviations (2: ≈ 97.7% one-sided for a Gaussian).
        warmup: no cut before this fraction of training (the sensor reads the dense curve first).
        max_rate: most dense compute removed per unit of training progress (5: half of it in 10% of training).
    """

    def __init__(self, budget: float, margin: float = 2.0, warmup: float = 0.05, max_rate: float = 5.0) -> None:
        self.budget = check_number("quality_budget", budget, 0.0, 1.0, low_open=True, high_open=True)
        self.margin = check_number("margin", margin, 0.0)
        self.warmup = check_number("warmup", warmup, 0.0, 1.0, high_open=True)
        self.max_rate = check_number("max_rate", max_rate, 0.0, low_open=True)
        self.reset()

    def reset(self) -> None:
        self.reason = ""
        self.max_jump: float | None = None
        self.cuts = 0  # realised cuts (the loop reports each as the next observation's last_action)
        self.last_progress: float | None = None
        self.slack = math.nan

    def slack_of(self, obs: Observation) -> float:
        """The budget left under the chance constraint ``D + zσ <= budget``, in budgets (at most 1: a predicted
        improvement is not banked beyond the whole budget)."""
        final = obs.final_damage if obs.final_damage is not None else obs.damage
        return (self.budget - max(float(final) + self.margin * float(obs.final_std), 0.0)) / self.budget

    def step(self, obs: Observation, target: float, spend: Callable[[float], float]) -> float:
        """``u``: the most compute the next cut may remove (the trial sizes it under ``max_jump``);
        ``spend(x) -> v`` is the controller's law: the share of the slack ``x`` (in budgets) to spend now."""
        self.cuts += int(obs.last_action > 1e-9)
        dp = obs.progress - max(self.warmup, self.last_progress or 0.0)  # the rate cap runs from the warm-up's end
        self.last_progress = obs.progress
        x = self.slack = self.slack_of(obs)
        self.max_jump = None
        self.reason = self._hold(obs, target, x)
        if self.reason:
            return 0.0
        v = float(min(max(spend(x), 0.0), x))
        factor = max(float(obs.next_factor if obs.next_factor is not None else 1.0), 0.0) \
            + self.margin * float(obs.next_factor_std)
        # a trial's jump is a noisy measurement: the largest cut whose trial fits is biased low by about one
        # noise std (the winner's curse of sizing by it), so it must fit with that much to spare
        self.max_jump = v * self.budget / max(factor, 1e-3) - float(obs.jump_noise)
        if self.max_jump <= 0:
            self.reason = (f"slack {x:.2f} budgets buys a jump of {v * self.budget / max(factor, 1e-3):.4f}, "
                           f"within the noise of a measured jump ({obs.jump_noise:.4f})")
            return 0.0
        u = min(self.max_rate * max(dp, 0.0), obs.compute - target)
        if u <= 1e-9:
            self.reason = "rate limit: no progress since the last cut"
            return 0.0
        return float(u)

    def _hold(self, obs: Observation, target: float, x: float) -> str:
        if obs.compute - target <= 1e-9:
            return "at the compute floor"
        if obs.progress < self.warmup:
            return f"warm-up: the sensor reads the dense curve first (progress {obs.progress:.3f} < {self.warmup:g})"
        if not math.isfinite(x):
            return "damage estimate not finite"
        if x <= 0:
            final = obs.final_damage if obs.final_damage is not None else obs.damage
            return (f"budget spent: predicted final damage {final:.4f} + {self.margin:g}σ ({obs.final_std:.4f}) "
                    f">= {self.budget:g}")
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "cuts": self.cuts, "last_progress": self.last_progress,
                "max_jump": self.max_jump}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reason = str(state.get("reason", ""))
        self.cuts = int(state.get("cuts", 0))
        last, jump = state.get("last_progress"), state.get("max_jump")
        self.last_progress = None if last is None else float(last)
        self.max_jump = None if jump is None else float(jump)



class BudgetModeMixin:
    """The budget mode of a feedback controller: :meth:`set_budget` switches it on; the controller's own
    law says how much of the slack to spend (:meth:`spend`). Used by ``lqr`` and ``pid``."""

    target: float
    budget: float | None
    reason: str
    max_jump: float | None

    def _init_budget(self, budget: float | None, margin: float, warmup: float, max_rate: float) -> None:
        self.margin = check_number("margin", margin, 0.0)
        self.warmup = check_number("warmup", warmup, 0.0, 1.0, high_open=True)
        self.max_rate = check_number("max_rate", max_rate, 0.0, low_open=True)
        self.mode: BudgetMode | None = None
        if budget is not None:
            self.set_budget(budget)

    def set_budget(self, budget: float) -> None:
        self.mode = BudgetMode(budget, self.margin, self.warmup, self.max_rate)
        self.budget = self.mode.budget

    def spend(self, x: float) -> float:
        """The share of the slack ``x`` (in budgets) to spend this interval."""
        raise NotImplementedError

    def _budget_step(self, obs: Observation) -> float:
        assert self.mode is not None
        u = self.mode.step(obs, self.target, self.spend)
        self.reason, self.max_jump = self.mode.reason, self.mode.max_jump
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
            self.reason, self.max_jump = self.mode.reason, self.mode.max_jump
