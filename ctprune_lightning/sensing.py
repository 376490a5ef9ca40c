"""The damage sensor: how much worse the run is now, and will end, than the dense run would be.

"Loss vs the best loss seen" reads 0 while cutting and jumps with noise otherwise. This sensor instead
models the probe loss of the run itself, in log space, as the dense reference trajectory plus the
effect of the cuts, whose immediate size is known exactly (the probe loss just before and just after
each surgery, same weights otherwise)::

    y_k = log L_k = f(t_k) + Σ_j s_j · [ρ + (1 − ρ) · a^((t_k − t_j) / Δ)] + ε_k
    f(t) = θ0 + θ1 · log t + θ2 · t / T + θ3 · Δ / t          (the dense reference, unobserved)

``s_j`` is the measured log-jump of cut j at step ``t_j``; a cut's damage recovers at rate ``a`` per
``Δ`` steps down to a persistent fraction ``ρ``. For each ``a`` on a grid the model is linear in
``(ρ, θ)`` and is solved by least squares over the last ``window`` observations (the trend need only
hold locally), with a Gaussian prior on ``ρ`` (default ``ρ ~ N(1, 0.5²)``: a cut is assumed to
persist until recovery is seen). The grid points are averaged with weights ``exp(−cost/2)`` (their
penalised residual and noise): where the data cannot tell a fast recovery from a persistent level
shift, the readings keep both and the spread shows in ``final_std`` instead of one fit winning on noise.
Reported, all relative (log-ratio ≈ relative excess):

* ``damage``: the cuts' effect now, ``Σ_j s_j [ρ + (1 − ρ) a^τ_kj]`` — loss now vs the dense reference now;
* ``final``: the same at the end of training ``T`` (what the quality budget is compared with);
* ``final_std``: its standard deviation over the mixture and the posterior of ``ρ``; cuts that happened
  to lower the loss do not cancel the uncertainty of those that raised it (``Σ |s_j|``);
* ``reference``: ``exp f(t_k)``, the estimated dense loss now (best grid point; before the trend is
  fitted, the last reading with the cuts' jumps taken out).

Example::

    est = DamageEstimator(total_steps=1000, interval=20)
    est.observe(step=20, loss=2.1); ...; est.add_cut(step=100, log_jump=0.03)
    est.estimate(step=200)    # {"damage": ..., "final": ..., "final_std": ..., "reference": ..., ...}
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["DamageEstimator"]

RECOVERY_GRID = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
RHO_MAX = 1.5  # a cut's damage may grow after it (the net loses capacity it would have used), within reason


class DamageEstimator:
    """Online least-squares fit of the probe-loss history (see the module docstring).

    Args:
        total_steps: the run's optimizer steps ``T`` (for the final damage).
        interval: steps per control interval ``Δ`` (the unit of the recovery rate).
        rho_prior / rho_prior_std: the Gaussian prior on the persistent fraction ``ρ``.
        min_points: below this many observations the trend is not fitted and every cut is taken
            as persistent (``ρ = rho_prior``).
        window: observations the fit uses; once the cuts have left it, their last estimate of
            ``(ρ, a)`` is kept (later data carry no news about them).
    """

    def __init__(self, total_steps: int, interval: int, rho_prior: float = 1.0, rho_prior_std: float = 0.5,
                 min_points: int = 6, window: int = 30) -> None:
        if total_steps < 1 or interval < 1:
            raise ValueError(f"DamageEstimator: total_steps and interval must be >= 1, got {total_steps}, {interval}")
        if rho_prior_std <= 0:
            raise ValueError(f"DamageEstimator: rho_prior_std must be > 0, got {rho_prior_std}")
        self.total_steps, self.interval = int(total_steps), int(interval)
        self.rho_prior, self.rho_prior_std, self.min_points = float(rho_prior), float(rho_prior_std), int(min_points)
        self.window = int(window)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.cuts: list[tuple[int, float]] = []  # (step, log-jump)
        self._posterior: list[tuple[float, float, float, float]] | None = None  # [(weight, ρ, var ρ, a)]: the last
        # mixture fitted while a cut was in view

    # ------------------------------------------------------------------------------------ data
    def observe(self, step: int, loss: float) -> None:
        """The probe loss at ``step`` (before any cut at that step). Non-finite losses are ignored."""
        if math.isfinite(loss) and loss > 0:
            self.steps.append(int(step))
            self.losses.append(float(loss))

    def add_cut(self, step: int, log_jump: float) -> None:
        """A surgery at ``step`` raised the probe loss by the factor ``exp(log_jump)`` at once."""
        if math.isfinite(log_jump):
            self.cuts.append((int(step), float(log_jump)))

    # ------------------------------------------------------------------------------------ model
    def _features(self, t: np.ndarray) -> np.ndarray:
        t = np.maximum(t.astype(float), 1.0)
        u = t / self.total_steps
        return np.stack([np.ones_like(t), np.log(t), u, self.interval / t], axis=1)

    def _cut_terms(self, t: np.ndarray, a: float, absolute: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(Σ s_j a^τ, Σ s_j (1 − a^τ))`` at each time, over the cuts made before it (``|s_j|``: absolute)."""
        recovering, persistent = np.zeros(len(t)), np.zeros(len(t))
        for tj, s in self.cuts:
            s = abs(s) if absolute else s
            tau = (t - tj) / self.interval
            on = tau > 0
            decay = np.where(on, np.power(a, np.maximum(tau, 0.0)), 0.0)
            recovering += np.where(on, s * decay, 0.0)
            persistent += np.where(on, s * (1.0 - decay), 0.0)
        return recovering, persistent

    def _fit(self, a: float) -> tuple[float, np.ndarray, np.ndarray, float]:
        """Penalised LS for one recovery rate: (cost, coefficients [ρ, θ...], covariance, noise variance)."""
        t = np.asarray(self.steps[-self.window:], dtype=float)  # the trend need only hold locally
        y = np.log(np.asarray(self.losses[-self.window:]))
        recovering, persistent = self._cut_terms(t, a)
        X = np.column_stack([persistent, self._features(t)])
        n = X.shape[1]
        target = y - recovering
        # prior rows: the prior on ρ, a weak ridge on the trend (keeps it determined early)
        prior_X = np.vstack([np.eye(n)[:1] / self.rho_prior_std, 1e-3 * np.eye(n)[1:]])
        prior_y = np.concatenate([[self.rho_prior / self.rho_prior_std], np.zeros(n - 1)])
        coef0, *_ = np.linalg.lstsq(X, target, rcond=None)
        noise = max(float(np.sum((target - X @ coef0) ** 2)) / max(1, len(y) - n), 1e-10)
        A = np.vstack([X / math.sqrt(noise), prior_X])
        b = np.concatenate([target / math.sqrt(noise), prior_y])
        coef, *_ = np.linalg.lstsq(A, b, rcond=None)
        cov = np.linalg.pinv(A.T @ A)
        cost = float(np.sum((A @ coef - b) ** 2)) + len(y) * math.log(noise)
        return cost, coef, cov, noise

    def _mixture(self) -> tuple[list[tuple[float, float, float, float]], np.ndarray, float, float]:
        """Fits over the recovery grid, weighted by their evidence: ``[(weight, ρ, var ρ, a)]``, the best
        fit's coefficients, its noise variance and its recovery rate."""
        fits = [(self._fit(a), a) for a in RECOVERY_GRID]
        costs = np.array([f[0] for f, _ in fits])
        weights = np.exp(-(costs - costs.min()) / 2.0)
        weights /= weights.sum()
        components = [(float(w), min(max(float(coef[0]), 0.0), RHO_MAX), float(cov[0, 0]), a)  # never heals past 0
                      for w, ((_, coef, cov, _), a) in zip(weights, fits)]
        (_, coef, _, noise), a = fits[int(np.argmin(costs))]
        return components, coef, noise, a

    def estimate(self, step: int) -> dict[str, Any]:
        """The sensor's reading at ``step`` (plain floats)."""
        step = int(step)
        jumps = sum(s for _, s in self.cuts)
        if not self.cuts:
            ref = self.losses[-1] if self.losses else float("nan")
            return {"damage": 0.0, "final": 0.0, "final_std": 0.0, "damage_std": 0.0, "reference": ref,
                    "rho": self.rho_prior, "recovery": None, "jumps": 0.0}
        if len(self.steps) < self.min_points:  # too little history: every cut persists
            rho = self.rho_prior
            spread = sum(abs(s) for _, s in self.cuts) * self.rho_prior_std  # jumps of both signs do not cancel
            ref = self.losses[-1] * math.exp(-jumps)  # the last reading without the cuts: no trend fitted yet
            return {"damage": jumps, "final": jumps * rho, "final_std": spread, "damage_std": spread,
                    "reference": ref, "rho": rho, "recovery": None, "jumps": jumps}
        components, coef, noise, best_a = self._mixture()
        start = self.steps[-self.window:][0]
        if any(tj > start for tj, _ in self.cuts):  # a cut's transient is in view: its (ρ, a) is news
            self._posterior = components
        elif self._posterior is not None:  # cuts have left the window: keep what they taught
            components = self._posterior
        now, end = np.array([float(step)]), np.array([float(self.total_steps)])
        damage, final, final_sq, rho = 0.0, 0.0, 0.0, 0.0
        damage_sd = 0.0
        for w, rho_i, var_i, a in components:  # the mixture's moments
            rec_now, per_now = (v[0] for v in self._cut_terms(now, a))
            rec_end, per_end = (v[0] for v in self._cut_terms(end, a))
            spread_now, spread_end = (self._cut_terms(x, a, absolute=True)[1][0] for x in (now, end))
            f = rec_end + rho_i * per_end
            damage += w * (rec_now + rho_i * per_now)
            final += w * f
            final_sq += w * (f * f + spread_end ** 2 * var_i)
            rho += w * rho_i
            damage_sd += w * spread_now * math.sqrt(var_i)
        reference = float(math.exp(float(self._features(now)[0] @ coef[1:])))
        final_std = math.sqrt(max(final_sq - final * final, 0.0))
        return {"damage": float(damage), "final": float(final), "final_std": final_std,
                "damage_std": float(math.sqrt(damage_sd ** 2 + noise)), "reference": reference,
                "rho": float(rho), "recovery": best_a, "jumps": float(jumps)}

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "losses": list(self.losses), "cuts": [list(c) for c in self.cuts],
                "total_steps": self.total_steps, "interval": self.interval,
                "posterior": None if self._posterior is None else [list(c) for c in self._posterior]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total_steps = int(state.get("total_steps", self.total_steps))
        self.interval = int(state.get("interval", self.interval))
        post = state.get("posterior")
        self._posterior = None if post is None else [tuple(float(v) for v in c) for c in post]
        self.steps = [int(s) for s in state.get("steps", [])]
        self.losses = [float(v) for v in state.get("losses", [])]
        self.cuts = [(int(s), float(j)) for s, j in state.get("cuts", [])]
