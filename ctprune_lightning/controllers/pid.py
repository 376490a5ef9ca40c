"""PI(D) control of the compute error with a damage guard, anti-windup and a rate limit.

With ``e_k = c_k - c*`` (compute above the setpoint) and ``d_k`` the measured loss damage::

    guard:      d_k > damage_max            ->  u_k = 0, integrator frozen
    candidate:  I' = I_{k-1} + e_k
    raw:        v_k = kp*e_k + ki*I' + kd*(e_k - e_{k-1})
    output:     u_k = min(max(v_k, 0), u_max, u_{k-1} + rate_limit, max(0, e_k))
    integrator: I_k = I'  unless the output is saturated and e_k pushes further into saturation
                (u_k < v_k with e_k > 0, or u_k > v_k with e_k < 0), then I_k = I_{k-1};
                finally |ki * I_k| <= u_max.

The plant ``e_{k+1} = e_k - u_k`` is already an integrator, so proportional action alone removes
the error; the small integral term only overcomes actuator dead zones (width rounding that turns
small requested cuts into none). The rate limit bounds *increases* of the cut
(``u_k - u_{k-1} <= rate_limit``, with ``u_{k-1}`` this controller's previous output); cutting less
is always safe and is never delayed.

>>> ctl = PIDController(target=0.3)
>>> ctl.step(Observation(step=0, progress=0.0, compute=1.0, damage=0.0))
0.05
"""

from __future__ import annotations

import math
from typing import Any

from .base import Controller, Observation, cap_action, check_number, sanitize_damage
from .budget import BudgetModeMixin

__all__ = ["PIDController"]


class PIDController(BudgetModeMixin, Controller):
    """PI(D) controller on ``e = c - c*``.

    Args:
        target: compute setpoint ``c*`` in ``(0, 1]``.
        kp: proportional gain, ``>= 0``.
        ki: integral gain, ``>= 0``.
        kd: derivative gain, ``>= 0`` (on the error; ``e`` shrinks while cutting, so it damps).
        u_max: largest cut per interval, in ``(0, 1]``.
        rate_limit: largest increase of the cut between intervals, ``> 0``; ``None`` disables it.
        damage_max: damage above which no cut is made, ``> 0``.
        budget / margin / warmup / max_rate: the quality-budget mode (:mod:`.budget`); there the PI law acts
            on the budget's slack ``x`` (in budgets): spend ``kp·x + ki·Σx`` of it, integrator bounded by ``1/ki``.
        grow / grow_hold: grow back the groups cut last when the budget is broken even on the optimistic bound,
            with that many control intervals of hysteresis (:mod:`.budget`).
    """

    name = "pid"

    def __init__(
        self,
        target: float,
        kp: float = 0.5,
        ki: float = 0.05,
        kd: float = 0.0,
        u_max: float = 0.1,
        rate_limit: float | None = 0.05,
        damage_max: float = 0.05,
        budget: float | None = None,
        margin: float = 2.0,
        warmup: float = 0.05,
        max_rate: float = 5.0,
        grow: bool = False,
        grow_hold: int = 3,
    ) -> None:
        super().__init__(target)
        self.kp = check_number("kp", kp, 0.0)
        self.ki = check_number("ki", ki, 0.0)
        self.kd = check_number("kd", kd, 0.0)
        if self.kp == 0.0 and self.ki == 0.0:
            raise ValueError("At least one of `kp`, `ki` must be > 0, got kp=0 and ki=0")
        self.u_max = check_number("u_max", u_max, 0.0, 1.0, low_open=True)
        self.rate_limit = (
            None if rate_limit is None else check_number("rate_limit", rate_limit, 0.0, low_open=True)
        )
        self.damage_max = check_number("damage_max", damage_max, 0.0, low_open=True)
        self._init_budget(budget, margin, warmup, max_rate, grow, grow_hold)
        self.reset()

    def spend(self, x: float) -> float:
        bound = math.inf if self.ki == 0.0 else 1.0 / self.ki
        self.integral = min(self.integral + x, bound)  # anti-windup: the integral term alone spends at most x
        return self.kp * x + self.ki * self.integral

    def reset(self) -> None:
        if self.mode is not None:
            self.mode.reset()
        self.integral = 0.0
        self.prev_error: float | None = None
        self.prev_action = 0.0
        self.num_steps = 0
        self.guarded = False

    @property
    def integral_bound(self) -> float:
        """``|I| <= u_max / ki``: the integral term alone never exceeds the actuator range."""
        return math.inf if self.ki == 0.0 else self.u_max / self.ki

    def step(self, obs: Observation) -> float:
        if self.mode is not None:
            return self._budget_step(obs)
        e = float(obs.compute) - self.target
        self.num_steps += 1
        if not math.isfinite(e):
            self.prev_action = 0.0
            return 0.0
        if obs.sensed:  # an unread interval keeps the last reading's guard
            self.guarded = sanitize_damage(obs.damage) > self.damage_max
        if self.guarded:  # damage guard: no cut, integrator frozen, ramp restarts from 0
            self.prev_error, self.prev_action = e, 0.0
            return 0.0

        derivative = 0.0 if self.prev_error is None else e - self.prev_error
        candidate = self.integral + e
        raw = self.kp * e + self.ki * candidate + self.kd * derivative
        limit = self.u_max
        if self.rate_limit is not None:
            limit = min(limit, self.prev_action + self.rate_limit)
        u = cap_action(raw, obs.compute, self.target, limit)

        pushes_further = (u < raw and e > 0.0) or (u > raw and e < 0.0)
        if not pushes_further:  # conditional integration (anti-windup)
            bound = self.integral_bound
            self.integral = min(max(candidate, -bound), bound)
        self.prev_error, self.prev_action = e, u
        return u

    def state_dict(self) -> dict[str, Any]:
        return {
            "integral": float(self.integral),
            "prev_error": None if self.prev_error is None else float(self.prev_error),
            "prev_action": float(self.prev_action),
            "num_steps": int(self.num_steps),
            "guarded": bool(self.guarded),
        } | self._budget_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.integral = float(state.get("integral", 0.0))
        self._load_budget_state(state)
        prev = state.get("prev_error", None)
        self.prev_error = None if prev is None else float(prev)
        self.prev_action = float(state.get("prev_action", 0.0))
        self.num_steps = int(state.get("num_steps", 0))
        self.guarded = bool(state.get("guarded", False))

    def __repr__(self) -> str:
        return (
            f"PIDController(target={self.target}, kp={self.kp}, ki={self.ki}, kd={self.kd}, "
            f"u_max={self.u_max}, rate_limit={self.rate_limit}, damage_max={self.damage_max}, "
            f"budget={self.budget})"
        )
