"""The plant model of training under pruning, and its online identification.

State ``x_k = [e_k, d_k]`` (compute above the setpoint, loss damage), input ``u_k`` (cut)::

    e_{k+1} = e_k - u_k
    d_{k+1} = a*d_k + b*u_k + noise          (a: recovery per interval, b: damage per unit cut)

i.e. ``x_{k+1} = A x_k + B u_k`` with ``A = [[1, 0], [0, a]]`` and ``B = [[-1], [b]]``.

``a`` and ``b`` are identified online by recursive least squares with exponential forgetting
(:class:`RecursiveLeastSquares`), combined with the exact immediate-jump measurement in
:class:`PlantEstimator`. Only numpy is used.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .base import check_number

__all__ = ["linear_system", "RecursiveLeastSquares", "PlantEstimator"]


def linear_system(a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(A, B)`` of the plant, ``A = [[1, 0], [0, a]]`` (2x2), ``B = [[-1], [b]]`` (2x1)."""
    return np.array([[1.0, 0.0], [0.0, float(a)]]), np.array([[-1.0], [float(b)]])


class RecursiveLeastSquares:
    """Vector RLS with forgetting factor ``lam``, box projection and a covariance reset guard.

    For ``y_k = phi_k^T theta + noise``::

        k_k     = P phi / (lam + phi^T P phi)
        eps_k   = y_k - phi_k^T theta                     (a-priori error)
        theta  <- clip(theta + k_k eps_k, lower, upper)
        P      <- (P - k_k phi^T P) / lam
        s2     <- (1 - w) s2 + w eps^2 / (1 + phi^T P_old phi / lam),  w = max(1 - lam, 1/(n + 1))

    ``P`` is normalised by the noise variance (the gain does not depend on ``s2``), so the
    parameter covariance is ``s2 * P`` and ``P0 = prior_cov / noise_var``. Guards: an update whose
    regressor carries no information (``phi^T P phi <= 1e-12 trace(P)``, i.e. ``phi ~ 0``) is
    skipped, so ``P`` does not grow as ``lam^-k`` while nothing happens; if ``P`` still becomes
    non-finite or ``trace(P) > max_trace_ratio * trace(P0)``, it is reset to ``P0`` (the estimate
    is kept).
    """

    def __init__(
        self,
        theta0: Sequence[float],
        prior_cov: Sequence[float],
        forgetting: float = 1.0,
        noise_var: float = 1.0,
        lower: Sequence[float] | None = None,
        upper: Sequence[float] | None = None,
        max_trace_ratio: float = 1e3,
    ) -> None:
        self.forgetting = check_number("forgetting", forgetting, 0.0, 1.0, low_open=True)
        self.noise_var0 = check_number("noise_var", noise_var, 0.0, low_open=True)
        self.max_trace_ratio = check_number("max_trace_ratio", max_trace_ratio, 1.0, low_open=True)
        self.theta0 = np.asarray(theta0, dtype=float).reshape(-1)
        n = self.theta0.size
        cov = np.asarray(prior_cov, dtype=float)
        cov = np.diag(cov) if cov.ndim == 1 else cov
        if cov.shape != (n, n) or not np.all(np.isfinite(cov)):
            raise ValueError(f"`prior_cov` must be {n} variances or an {n}x{n} matrix, got {cov.shape}")
        if np.any(np.linalg.eigvalsh(0.5 * (cov + cov.T)) <= 0.0):
            raise ValueError("`prior_cov` must be symmetric positive definite")
        self.P0 = cov / self.noise_var0
        self.lower = np.full(n, -np.inf) if lower is None else np.asarray(lower, dtype=float)
        self.upper = np.full(n, np.inf) if upper is None else np.asarray(upper, dtype=float)
        if self.lower.shape != (n,) or self.upper.shape != (n,) or np.any(self.lower > self.upper):
            raise ValueError("`lower`/`upper` must have one bound per parameter with lower <= upper")
        self.reset()

    def reset(self) -> None:
        self.theta = np.clip(self.theta0.copy(), self.lower, self.upper)
        self.P = self.P0.copy()
        self.noise_var = self.noise_var0
        self.num_updates = 0
        self.num_resets = 0

    @property
    def cov(self) -> np.ndarray:
        """Parameter covariance estimate ``s2 * P``."""
        return self.noise_var * self.P

    def predict(self, phi: Sequence[float]) -> float:
        return float(np.dot(np.asarray(phi, dtype=float), self.theta))

    def update(self, phi: Sequence[float], y: float) -> float:
        """Incorporate one measurement; return the a-priori prediction error (0 if skipped)."""
        phi = np.asarray(phi, dtype=float).reshape(-1)
        y = float(y)
        if phi.shape != self.theta.shape or not (np.all(np.isfinite(phi)) and math.isfinite(y)):
            return 0.0
        lam = self.forgetting
        p_phi = self.P @ phi
        info = float(phi @ p_phi)
        if info <= 1e-12 * float(np.trace(self.P)):
            return 0.0
        gain = p_phi / (lam + info)
        err = y - float(phi @ self.theta)
        self.theta = np.clip(self.theta + gain * err, self.lower, self.upper)
        P = (self.P - np.outer(gain, p_phi)) / lam
        self.P = 0.5 * (P + P.T)
        self.num_updates += 1
        w = max(1.0 - lam, 1.0 / (self.num_updates + 1))  # prior noise counts as one sample
        self.noise_var = max((1.0 - w) * self.noise_var + w * err * err / (1.0 + info / lam), 1e-12)
        trace = float(np.trace(self.P))
        if not math.isfinite(trace) or trace > self.max_trace_ratio * float(np.trace(self.P0)):
            self.P = self.P0.copy()
            self.num_resets += 1
        return err

    def state_dict(self) -> dict[str, Any]:
        return {
            "theta": [float(v) for v in self.theta],
            "P": [[float(v) for v in row] for row in self.P],
            "noise_var": float(self.noise_var),
            "num_updates": int(self.num_updates),
            "num_resets": int(self.num_resets),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.theta = np.asarray(state.get("theta", self.theta0), dtype=float).reshape(-1)
        self.P = np.asarray(state.get("P", self.P0), dtype=float).reshape(self.P0.shape)
        self.noise_var = float(state.get("noise_var", self.noise_var0))
        self.num_updates = int(state.get("num_updates", 0))
        self.num_resets = int(state.get("num_resets", 0))


class PlantEstimator:
    """Online estimate of ``(a, b)`` from consecutive observations and the measured cut jumps.

    Two sources of information:

    1. *Slow channel* -- a 2-parameter RLS of ``d_k`` on ``[d_{k-1}, u_{k-1}]`` gives ``(a, b_slow)``.
    2. *Jump channel* -- the callback measures the immediate probe-loss jump ``j`` of each cut on
       the same probe batch, exactly before/after surgery. With ``d_k`` measured before the cut of
       interval ``k``, the model is ``d_k = a * (d_{k-1} + j_{k-1})`` with ``j_{k-1} = b0 * u_{k-1}``,
       so ``b = a * b0``. A scalar RLS of ``j`` on ``u_{k-1}`` estimates ``b0``.

    Combination: once at least one jump has been seen, ``b`` is the inverse-variance weighted mean
    of ``b_slow`` (variance ``cov_slow[1, 1]``) and ``b_jump = a * b0`` (variance
    ``a^2 var(b0) + b0^2 var(a)``); both variances come from the RLS covariances scaled by their own
    residual-noise estimates, so the nearly noise-free jump channel dominates whenever it is
    available, and the slow channel takes over when jumps are missing or inconsistent.
    Estimates are clamped to ``0 <= a <= a_max (0.99)`` and ``b >= b_min > 0``.

    Args:
        a_prior, b_prior: prior recovery factor per interval and damage per unit cut.
        forgetting: RLS forgetting factor ``lam`` in ``(0, 1]``.
        prior_std: prior standard deviations of ``(a, b)``.
        noise_std: prior standard deviation of the damage measurement noise.
        b_min: lower bound of ``b`` (keeps the LQR problem well posed).
    """

    def __init__(
        self,
        a_prior: float = 0.7,
        b_prior: float = 0.5,
        forgetting: float = 0.95,
        prior_std: tuple[float, float] = (0.2, 0.5),
        noise_std: float = 0.01,
        b_min: float = 1e-3,
        a_max: float = 0.99,
    ) -> None:
        self.a_max = check_number("a_max", a_max, 0.0, 1.0, high_open=True)
        self.a_prior = check_number("a_prior", a_prior, 0.0, self.a_max)
        self.b_min = check_number("b_min", b_min, 0.0, low_open=True)
        self.b_prior = check_number("b_prior", b_prior, self.b_min)
        std_a = check_number("prior_std[0]", prior_std[0], 0.0, low_open=True)
        std_b = check_number("prior_std[1]", prior_std[1], 0.0, low_open=True)
        noise = check_number("noise_std", noise_std, 0.0, low_open=True) ** 2
        a0 = max(self.a_prior, 0.05)
        self.slow = RecursiveLeastSquares(
            [self.a_prior, self.b_prior], [std_a**2, std_b**2], forgetting, noise,
            lower=[0.0, self.b_min], upper=[self.a_max, np.inf],
        )
        self.jump = RecursiveLeastSquares(
            [self.b_prior / a0], [(std_b / a0) ** 2], forgetting, noise,
            lower=[self.b_min], upper=[np.inf],
        )

    def reset(self) -> None:
        self.slow.reset()
        self.jump.reset()

    def update(self, d_prev: float, u_prev: float, d_now: float, jump: float | None = None) -> None:
        """Use ``d_{k-1}``, the applied ``u_{k-1}``, the new ``d_k`` and the jump of ``u_{k-1}``."""
        if not all(math.isfinite(float(v)) for v in (d_prev, u_prev, d_now)):
            return
        self.slow.update([d_prev, u_prev], d_now)
        if jump is not None and math.isfinite(float(jump)) and u_prev > 0.0:
            self.jump.update([u_prev], float(jump))  # negative jumps are noise: kept unbiased

    @property
    def a(self) -> float:
        return float(min(max(self.slow.theta[0], 0.0), self.a_max))

    @property
    def b(self) -> float:
        b_slow = float(self.slow.theta[1])
        if self.jump.num_updates == 0:
            return max(b_slow, self.b_min)
        a, b0 = self.a, float(self.jump.theta[0])
        cov = self.slow.cov
        var_slow = max(float(cov[1, 1]), 1e-18)
        var_jump = max(a * a * float(self.jump.cov[0, 0]) + b0 * b0 * float(cov[0, 0]), 1e-18)
        b = (b_slow / var_slow + a * b0 / var_jump) / (1.0 / var_slow + 1.0 / var_jump)
        return max(b, self.b_min)

    def system(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, B)`` at the current estimate."""
        return linear_system(self.a, self.b)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": self.slow.state_dict(), "jump": self.jump.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.slow.load_state_dict(state.get("slow", {}))
        self.jump.load_state_dict(state.get("jump", {}))
