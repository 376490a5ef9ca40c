"""Controllers on a quality budget: remove as much compute as the damage sensor says the budget allows.

The user states the quality they give up, ``budget`` (relative excess of the monitored loss at the end
of training over the dense run's), and a compute floor ``target``. The sensor
(:class:`ctprune_lightning.sensing.DamageEstimator`) reports the predicted final damage ``D`` with its
standard deviation ``σ``. The controlled state is the slack, in units of the budget::

    x_k = (budget − D_k − margin·σ_k) / budget        (≤ 0: hold)
    x_{k+1} = x_k − b·u_k / budget                      (a cut u spends b·u of the budget)

``b`` is the damage per unit of compute the next cut will cost, identified from the last cuts' measured
jumps (and their growth: the marginal cost of a cut rises as the net nears its capacity) times the
sensor's persistent fraction ``ρ``. ``lqr`` solves the scalar DARE of this integrator for
the gain; ``pid`` is PI on the slack with anti-windup. Both saturate to ``[0, u_max]`` and never cut
below the floor; both record in ``reason`` why they held back. Neither cuts during the first
``warmup`` fraction of training (the sensor needs some of the dense curve before the first cut), and a
predicted improvement (negative damage) is not banked as slack.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping

import numpy as np

from .base import Controller, Observation, cap_action, check_number
from .lqr import lqr_gain

__all__ = ["BUDGET_CONTROLLERS", "BudgetLQRController", "BudgetPIDController", "budget_controller"]


class _BudgetController(Controller):
    """Shared: the slack, the identified cost per cut, the reasons."""

    def __init__(self, target: float, budget: float = 0.01, margin: float = 2.0, u_max: float = 0.1,
                 b_prior: float = 0.1, warmup: float = 0.1) -> None:
        super().__init__(target)
        self.warmup = check_number("warmup", warmup, 0.0, 1.0, high_open=True)
        self.budget = check_number("quality_budget", budget, 0.0, 1.0, low_open=True)
        self.margin = check_number("margin", margin, 0.0)
        self.u_max = check_number("u_max", u_max, 0.0, 1.0, low_open=True)
        self.b_prior = check_number("b_prior", b_prior, 0.0, low_open=True)
        self.reset()

    def reset(self) -> None:
        self.jump_rate: float | None = None  # measured log-jump per unit of compute removed, last cut
        self.growth = 1.0  # its growth from the cut before
        self.reason = ""
        self.cuts = 0

    def cost_per_unit(self, obs: Observation) -> float:
        """``b``: damage per unit of dense compute removed by the *next* cut.

        The last cuts' measured jump per unit, times its growth from the cut before (cuts cost more as
        the net nears its capacity, so the next one is predicted dearer still), times the sensor's
        persistent fraction ``ρ`` (at least 0.25: recovery is never banked in full).
        """
        if obs.jump is not None and obs.last_action > 1e-6:
            rate = max(float(obs.jump), 0.0) / float(obs.last_action)
            if self.jump_rate is not None and self.jump_rate > 1e-9:
                self.growth = max(1.0, rate / self.jump_rate)
            self.jump_rate = rate
        rate = self.b_prior if self.jump_rate is None else max(self.jump_rate * self.growth, 1e-6)
        rho = 1.0 if obs.rho is None else min(max(float(obs.rho), 0.25), 1.0)
        return rate * rho

    def slack(self, obs: Observation) -> float:
        """The budget left, in budgets; a predicted improvement (negative damage) is not banked."""
        final = obs.final_damage if obs.final_damage is not None else obs.damage
        return (self.budget - max(float(final), 0.0) - self.margin * float(obs.final_std)) / self.budget

    def _hold(self, obs: Observation, x: float) -> str:
        e = obs.compute - self.target
        if e <= 1e-9:
            return "at the compute floor"
        if obs.progress < self.warmup:
            return f"warm-up: the sensor learns the dense curve first (progress {obs.progress:.2f} < {self.warmup:g})"
        if not math.isfinite(x):
            return "damage estimate not finite"
        if x <= 0:
            final = obs.final_damage if obs.final_damage is not None else obs.damage
            return (f"budget: predicted final damage {final:.4f} + {self.margin:g}σ ({obs.final_std:.4f}) "
                    f">= {self.budget:g}")
        return ""

    def step(self, obs: Observation) -> float:
        b = self.cost_per_unit(obs)
        x = self.slack(obs)
        self.reason = self._hold(obs, x)
        if self.reason:
            self._no_action(x)
            return 0.0
        u = cap_action(self._action(x, b), obs.compute, self.target, self.u_max)
        if u <= 0:
            self.reason = "no slack worth a cut"
        elif u >= self.u_max - 1e-12:
            self.reason = "rate limit u_max"
        self.cuts += int(u > 0)
        return u

    def _action(self, x: float, b: float) -> float:
        raise NotImplementedError

    def _no_action(self, x: float) -> None:
        """Called when holding (integrators do not wind up)."""

    def state_dict(self) -> dict[str, Any]:
        return {"jump_rate": self.jump_rate, "growth": self.growth, "reason": self.reason, "cuts": self.cuts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rate = state.get("jump_rate")
        self.jump_rate = None if rate is None else float(rate)
        self.growth = float(state.get("growth", 1.0))
        self.reason = str(state.get("reason", ""))
        self.cuts = int(state.get("cuts", 0))


class BudgetLQRController(_BudgetController):
    """LQR on the budget slack: ``u = K·x`` with ``K`` from the scalar DARE of ``x' = x − (b/budget)·u``.

    Args (beyond the shared ``target``, ``budget``, ``margin``, ``u_max``, ``b_prior``):
        q, r: state and action weights (``u`` in units of ``u_max``); ``r/q`` sets how much of the slack
            one interval may spend (``r → 0``: all of it).
    """

    name = "lqr"

    def __init__(self, target: float, budget: float = 0.01, q: float = 1.0, r: float = 0.25, **kwargs: Any) -> None:
        self.q = check_number("q", q, 0.0, low_open=True)
        self.r = check_number("r", r, 0.0, low_open=True)
        super().__init__(target, budget, **kwargs)

    def _action(self, x: float, b: float) -> float:
        # in units: state x (budgets), input v = u / u_max; x' = x - beta v with beta = b u_max / budget
        beta = b * self.u_max / self.budget
        K = lqr_gain(np.eye(1), -beta * np.eye(1), self.q * np.eye(1), self.r * np.eye(1))
        return float(-K[0, 0] * x) * self.u_max


class BudgetPIDController(_BudgetController):
    """PI on the budget slack, ``u = (kp·x + ki·Σx) · budget / b``, integrator frozen while holding."""

    name = "pid"

    def __init__(self, target: float, budget: float = 0.01, kp: float = 0.5, ki: float = 0.05, **kwargs: Any) -> None:
        self.kp = check_number("kp", kp, 0.0)
        self.ki = check_number("ki", ki, 0.0)
        super().__init__(target, budget, **kwargs)

    def reset(self) -> None:
        super().reset()
        self.integral = 0.0

    def _action(self, x: float, b: float) -> float:
        self.integral = min(self.integral + x, 1.0 / max(self.ki, 1e-12))  # anti-windup: |ki I| <= 1
        return (self.kp * x + self.ki * self.integral) * self.budget / b

    def _no_action(self, x: float) -> None:
        self.integral = min(self.integral, 0.0) if x <= 0 else self.integral

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"integral": self.integral}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.integral = float(state.get("integral", 0.0))


BUDGET_CONTROLLERS: dict[str, type[_BudgetController]] = {"lqr": BudgetLQRController, "pid": BudgetPIDController}


def budget_controller(controller: Controller, budget: float, kwargs: Mapping[str, Any] | None = None) -> Controller:
    """The quality-budget counterpart of ``controller`` (``lqr`` or ``pid``), its target as the floor.

    ``kwargs`` (the callback's ``controller_kwargs``) that the budget controller takes are passed on;
    a budget controller given already is returned as it is.
    """
    if isinstance(controller, _BudgetController):
        return controller
    cls = BUDGET_CONTROLLERS.get(getattr(controller, "name", ""))
    if cls is None:
        raise ValueError(f"quality_budget={budget!r} needs controller 'lqr' or 'pid' (the feedback controllers), "
                         f"got {getattr(controller, 'name', type(controller).__name__)!r}")
    params = inspect.signature(cls.__init__).parameters
    allowed = set(params) | set(inspect.signature(_BudgetController.__init__).parameters)
    extra = {k: v for k, v in dict(kwargs or {}).items() if k in allowed and k not in ("self", "target", "budget")}
    if "u_max" not in extra and hasattr(controller, "u_max"):
        extra["u_max"] = controller.u_max
    return cls(controller.target, budget, **extra)
