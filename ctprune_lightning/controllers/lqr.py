"""LQR control of compute and damage, with the plant ``(a, b)`` identified online.

Minimise ``sum_k q_e e_k^2 + q_d d_k^2 + r u_k^2`` subject to the plant of :mod:`.plant`::

    x = [e, d],  x_{k+1} = A x_k + B u_k,  A = [[1, 0], [0, a]],  B = [[-1], [b]]

The stationary solution is ``u_k = -K x_k`` with ``K = (R + B^T P B)^{-1} B^T P A`` and ``P`` the
stabilising solution of the discrete algebraic Riccati equation (DARE)::

    P = A^T P A - A^T P B (R + B^T P B)^{-1} B^T P A + Q

``K = [k_e, k_d]`` has ``k_e < 0`` (cut while compute is above target) and ``k_d > 0`` (cut less
while the loss is damaged). The action is then saturated to ``[0, min(u_max, e)]`` so the
controller never asks to cut below its target, and is 0 inside the deadband ``e < deadband``.

>>> K = lqr_gain(*linear_system(0.7, 0.3), np.diag([1.0, 20.0]), np.eye(1))
>>> K.round(3).tolist()
[[-0.465, 0.744]]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import Controller, Observation, cap_action, check_number, sanitize_damage
from .budget import BudgetModeMixin, slack_gain
from .plant import PlantEstimator, linear_system

__all__ = ["solve_dare", "lqr_gain", "LQRController"]


def _riccati_residual(A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray, P: np.ndarray) -> float:
    BtP = B.T @ P
    res = A.T @ P @ A - A.T @ P @ B @ np.linalg.solve(R + BtP @ B, BtP @ A) + Q - P
    return float(np.max(np.abs(res)) / max(1.0, float(np.max(np.abs(P)))))


def solve_dare(
    A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray, tol: float = 1e-13, max_iter: int = 200
) -> np.ndarray:
    """Stabilising solution ``P`` of the DARE, by the structure-preserving doubling algorithm.

    SDA (Chu, Fan & Lin 2005) with ``A_0 = A``, ``G_0 = B R^{-1} B^T``, ``H_0 = Q``::

        W_k     = I + G_k H_k
        A_{k+1} = A_k W_k^{-1} A_k
        G_{k+1} = G_k + A_k W_k^{-1} G_k A_k^T
        H_{k+1} = H_k + A_k^T H_k W_k^{-1} A_k          ->  P (quadratically)

    stopping when ``|H_{k+1} - H_k| <= tol |H_{k+1}|``. If doubling fails (singular ``W``, no
    convergence), the plain Riccati value iteration from ``P = Q`` is used instead. Raises
    ``ValueError`` for inconsistent shapes and ``RuntimeError`` if no solution is found.
    """
    A, B, Q, R = (np.atleast_2d(np.asarray(m, dtype=float)) for m in (A, B, Q, R))
    n, m = B.shape
    if A.shape != (n, n) or Q.shape != (n, n) or R.shape != (m, m):
        raise ValueError(f"Inconsistent shapes: A {A.shape}, B {B.shape}, Q {Q.shape}, R {R.shape}")
    Q, R = 0.5 * (Q + Q.T), 0.5 * (R + R.T)
    eye = np.eye(n)
    Ak, Gk, Hk = A.copy(), B @ np.linalg.solve(R, B.T), Q.copy()
    with np.errstate(all="ignore"):
        for _ in range(max_iter):
            try:
                W = eye + Gk @ Hk
                WiA = np.linalg.solve(W, Ak)
                WiG = np.linalg.solve(W, Gk)
            except np.linalg.LinAlgError:
                break
            H_next = Hk + Ak.T @ Hk @ WiA
            Gk = Gk + Ak @ WiG @ Ak.T
            Ak = Ak @ WiA
            H_next = 0.5 * (H_next + H_next.T)
            if not np.all(np.isfinite(H_next)):
                break
            done = np.max(np.abs(H_next - Hk)) <= tol * max(1.0, float(np.max(np.abs(H_next))))
            Hk = H_next
            if done and _riccati_residual(A, B, Q, R, Hk) < 1e-8:
                return Hk
    # fallback: value iteration P <- Q + A^T P A - A^T P B (R + B^T P B)^{-1} B^T P A
    P = Q.copy()
    for _ in range(100 * max_iter):
        BtP = B.T @ P
        P_next = Q + A.T @ P @ A - A.T @ P @ B @ np.linalg.solve(R + BtP @ B, BtP @ A)
        P_next = 0.5 * (P_next + P_next.T)
        if np.max(np.abs(P_next - P)) <= tol * max(1.0, float(np.max(np.abs(P_next)))):
            return P_next
        P = P_next
    raise RuntimeError("solve_dare did not converge; is (A, B) stabilisable and (A, Q) detectable?")


def lqr_gain(A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Infinite-horizon discrete LQR gain ``K = (R + B^T P B)^{-1} B^T P A`` (``u = -K x``)."""
    A, B, R = (np.atleast_2d(np.asarray(m, dtype=float)) for m in (A, B, R))
    P = solve_dare(A, B, Q, R)
    return np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)


class LQRController(BudgetModeMixin, Controller):
    """Adaptive LQR on ``x = [c - c*, d]`` (certainty equivalence with :class:`PlantEstimator`).

    Each :meth:`step`: (1) update the ``(a, b)`` estimate from ``(d_{k-1}, u_{k-1}, d_k, jump)``,
    (2) re-solve the DARE if ``max(|a - a_K|, |b - b_K| / b_K) > resolve_tol`` (else reuse ``K``),
    (3) ``u = clip(-K x, 0, min(u_max, e))``, and ``u = 0`` if ``e < deadband``.

    Args:
        target: compute setpoint ``c*`` in ``(0, 1]``.
        q_e, q_d: state weights on the compute error and the damage, ``q_e > 0``, ``q_d >= 0``.
        r: action weight, ``> 0``.
        u_max: largest cut per interval, in ``(0, 1]``.
        a_prior, b_prior: plant priors, ``0 <= a_prior <= 0.99``, ``b_prior > 0``.
        forgetting: RLS forgetting factor in ``(0, 1]``.
        deadband: no cut while ``e < deadband``, ``>= 0``.
        resolve_tol: relative plant change that triggers a new Riccati solve, ``>= 0``.
        budget: a quality budget (:mod:`.budget`): the controller then spends the budget's slack instead of
            driving compute to ``target`` (the floor); ``margin``, ``warmup``, ``max_rate`` are that mode's
            chance-constraint width, warm-up and rate cap (in training progress), and ``slack_q`` /
            ``slack_r`` the LQR weights of its slack integrator (``slack_r / slack_q`` small: spend fast);
            ``grow`` grows back the groups cut last when the budget is broken even on the optimistic bound, with
            ``grow_hold`` control intervals of hysteresis (:mod:`.budget`).
    """

    name = "lqr"

    def __init__(
        self,
        target: float,
        q_e: float = 1.0,
        q_d: float = 10.0,
        r: float = 1.0,
        u_max: float = 0.1,
        a_prior: float = 0.7,
        b_prior: float = 0.5,
        forgetting: float = 0.95,
        deadband: float = 0.005,
        resolve_tol: float = 0.02,
        budget: float | None = None,
        margin: float = 2.0,
        warmup: float = 0.05,
        max_rate: float = 5.0,
        slack_q: float = 1.0,
        slack_r: float = 0.25,
        grow: bool = False,
        grow_hold: int = 3,
    ) -> None:
        super().__init__(target)
        self.slack_q = check_number("slack_q", slack_q, 0.0, low_open=True)
        self.slack_r = check_number("slack_r", slack_r, 0.0, low_open=True)
        self.q_e = check_number("q_e", q_e, 0.0, low_open=True)
        self.q_d = check_number("q_d", q_d, 0.0)
        self.r = check_number("r", r, 0.0, low_open=True)
        self.u_max = check_number("u_max", u_max, 0.0, 1.0, low_open=True)
        self.deadband = check_number("deadband", deadband, 0.0, 1.0)
        self.resolve_tol = check_number("resolve_tol", resolve_tol, 0.0)
        self.plant = PlantEstimator(a_prior=a_prior, b_prior=b_prior, forgetting=forgetting)
        self._init_budget(budget, margin, warmup, max_rate, grow, grow_hold)
        self.reset()

    def spend(self, x: float) -> float:
        return slack_gain(self.slack_q, self.slack_r) * x

    def reset(self) -> None:
        if self.mode is not None:
            self.mode.reset()
        self.plant.reset()
        self.prev_damage: float | None = None
        self.stale = False  # an unread interval since the last reading
        self.num_steps = 0
        self.num_solves = 0
        self.gain: list[float] = []
        self.gain_plant: list[float] = []
        self._solve()

    def _solve(self) -> None:
        a, b = self.plant.a, self.plant.b
        A, B = linear_system(a, b)
        K = lqr_gain(A, B, np.diag([self.q_e, self.q_d]), np.array([[self.r]]))
        self.gain = [float(K[0, 0]), float(K[0, 1])]
        self.gain_plant = [a, b]
        self.num_solves += 1

    def _plant_moved(self) -> bool:
        a_k, b_k = self.gain_plant
        moved = max(abs(self.plant.a - a_k), abs(self.plant.b - b_k) / max(b_k, 1e-12))
        return moved > self.resolve_tol

    def step(self, obs: Observation) -> float:
        if self.mode is not None:
            return self._budget_step(obs)
        e = float(obs.compute) - self.target
        self.num_steps += 1
        if not obs.sensed:  # no reading this interval: the last damage holds (zero-order hold), nothing is learned
            self.stale = True
            held = self.prev_damage if self.prev_damage is not None else 0.0
            if not math.isfinite(held) or not math.isfinite(e) or e < self.deadband:
                return 0.0
            return cap_action(-(self.gain[0] * e + self.gain[1] * held), obs.compute, self.target, self.u_max)
        damage = sanitize_damage(obs.damage)
        if self.stale:  # the readings around unread intervals span several cuts: re-anchor, do not identify
            self.prev_damage, self.stale = None, False
        if self.prev_damage is not None and math.isfinite(damage):
            self.plant.update(self.prev_damage, float(obs.last_action), damage, obs.jump)
            if self._plant_moved():
                self._solve()
        self.prev_damage = damage if math.isfinite(damage) else None
        if not math.isfinite(damage) or not math.isfinite(e) or e < self.deadband:
            return 0.0
        u = -(self.gain[0] * e + self.gain[1] * damage)
        return cap_action(u, obs.compute, self.target, self.u_max)

    def state_dict(self) -> dict[str, Any]:
        return {
            "plant": self.plant.state_dict(),
            "prev_damage": self.prev_damage,
            "stale": self.stale,
            "num_steps": int(self.num_steps),
            "num_solves": int(self.num_solves),
            "gain": list(self.gain),
            "gain_plant": list(self.gain_plant),
        } | self._budget_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plant.load_state_dict(state.get("plant", {}))
        self._load_budget_state(state)
        prev = state.get("prev_damage", None)
        self.prev_damage = None if prev is None else float(prev)
        self.stale = bool(state.get("stale", False))
        self.num_steps = int(state.get("num_steps", 0))
        self.num_solves = int(state.get("num_solves", self.num_solves))
        gain, gain_plant = state.get("gain"), state.get("gain_plant")
        if gain is not None and gain_plant is not None:
            self.gain = [float(v) for v in gain]
            self.gain_plant = [float(v) for v in gain_plant]
        else:
            self._solve()

    @property
    def a(self) -> float:
        """Current recovery estimate."""
        return self.plant.a

    @property
    def b(self) -> float:
        """Current damage-per-cut estimate."""
        return self.plant.b

    @property
    def settle(self) -> float:
        """The deadband with a compute target (no cut while ``e < deadband``); none in the budget mode."""
        return self.deadband if self.budget is None else 0.0

    def __repr__(self) -> str:
        return (
            f"LQRController(target={self.target}, q_e={self.q_e}, q_d={self.q_d}, r={self.r}, "
            f"u_max={self.u_max}, deadband={self.deadband}, budget={self.budget})"
        )
