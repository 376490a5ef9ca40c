"""The damage sensor: how much worse the run is now, and will end, than the dense run would be.

The sensor models two channels of the run in log space, each as *the dense reference curve plus the
effect of the cuts*, whose immediate size is measured exactly (the loss on fixed batches just before
and just after each surgery, same weights otherwise):

* the held-out probe loss ``y_k`` (noisy: 0.5–5% per reading on real runs), read at the intervals the sensing
  budget allows;
* the training loss averaged over the steps of each interval ``z_k`` (free, and lower noise), read at every
  interval, the probe's or not, and placed at the middle of the steps it averages.

::

    y_k = f_p(τ_k) + Σ_j s_j  · [ρ_j + (1 − ρ_j) · a^((t_k − t_j) / Δ)] + ε_k
    z_k = f_z(τ_k) + Σ_j s'_j · [ρ_j + (1 − ρ_j) · a^((t_k − t_j) / Δ)] + ε'_k
    f(τ) = θ0 + θ1 · lr(t) / lr_max + θ2 · τ^(−1/2) + θ3 / τ

The dense reference ``f`` is a learning curve in learning-rate-area time ``τ = Σ lr`` (a saturating power
law in ``τ``, an annealing term that falls with the learning rate of cosine / OneCycle schedules, an early
transient; on simulated curves ``log(L∞ + A τ^−α)`` this basis told recovery from trend better than one
with ``log τ``, which bends the reference under a persistent cut; six smooth bumps in ``log τ`` under a
small prior let it depart from that shape at a price in ``final_std``), fitted jointly with the cuts on the
last ``window`` readings: before the first cut it is all the data says, afterwards the cuts are measured
against it. ``s_j`` / ``s'_j`` are cut
j's measured log-jumps on the probe / training batches; the damage recovers at rate ``a`` per ``Δ``
steps down to a persistent fraction ``ρ_j``, one per cut, under a shared (hierarchical) prior
``ρ_j = μ + δ_j``, ``μ ~ N(rho_mean, rho_mean_std²)``, ``δ_j ~ N(0, rho_spread²)``: what early cuts
teach carries to later ones, and a cut's own readings move its own ``ρ_j``.

For each ``a`` on a grid the model is linear and Gaussian in ``(ρ, θ)``: an exact Bayesian posterior
and its evidence. The grid points are averaged by evidence, so where the data cannot tell a fast
recovery from a persistent shift the reading keeps both and its spread shows in ``final_std``. Noise
is estimated from the residuals of each channel and inflated for their lag-1 autocorrelation
(``(1 + φ) / (1 − φ)``), since readings a few steps apart share most of their error. Every reading
updates every cut's ``ρ_j`` while the cut's effect is in the window (its transient and the level after
it); a cut whose whole history has left the window reverts towards the shared prior (the window keeps a
misspecified global trend from posing as damage: a whole-run fit mis-read ``ρ`` on test curves).

Reported, all relative (log-ratio ≈ relative excess):

* ``damage`` / ``damage_std``: the cuts' effect now — loss now vs the dense reference now;
* ``final`` / ``final_std``: the same at the end of training ``T`` (what a quality budget is judged on);
* ``next_factor`` / ``next_factor_std``: the final damage per unit of immediate log-jump of a cut made
  now (the predictive ``ρ`` of a new cut, with the recovery still to come before ``T``);
* ``reference``: ``exp f_p(τ_k)``, the estimated dense probe loss now; ``rho``: the posterior mean of ``μ``;
* ``jump_noise``: ``κ`` of :class:`~ctprune_lightning.jump_noise.JumpNoise`, the law of a measured jump's
  standard error (``error² = κ² u² + η² J²`` for a cut of ``u`` with jump ``J``), fitted on every trial and
  cut read (``add_jump_read``). Each cut's law error² (its persistent factor² times it) adds to
  ``final_std²``; the loop keeps a trial's jump the law's error below its allowance, so a cut is not taken
  because its batches happened to read it low (the winner's curse of sizing by a noisy measurement), and
  the predictions take each cut's jump as its probe reading plus that error: the quality is judged held
  out, and the training batches' jump reads the loss of what the net memorised (2–16× the probe's on the
  suite's larger cuts), so it only enters its own channel.

Example::

    sensor = DamageSensor(total_steps=1000, interval=20)
    sensor.observe(step=20, loss=2.1, train_loss=2.2, lr=1e-3); ...
    sensor.observe(step=40, loss=None, train_loss=2.1, lr=1e-3)    # an interval the probe does not read
    sensor.add_jump_read(size=0.1, jump=0.03, error=0.004)    # each trial's, while sizing the cut
    sensor.add_cut(step=100, log_jump=0.03, train_log_jump=0.02, size=0.1)
    sensor.estimate(step=200)    # {"damage": ..., "final": ..., "final_std": ..., "next_factor": ..., ...}
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .jump_noise import JumpNoise

__all__ = ["DamageSensor", "PERSISTENCE_PRIOR", "RECOVERY_GRID", "check_persistence_prior"]

#: recovery per control interval: 0 heals at once, 0.995 keeps 60% after 100 intervals
RECOVERY_GRID = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
N_BUMPS = 6  # smooth bumps in log τ: the reference's departures from the parametric curve (a GP-like prior)
BUMP_STD = 0.03  # how far (in log-loss) the dense curve may depart from the parametric shape, per bump
N_TREND = 4 + N_BUMPS  # θ of one channel
TREND_STD = (10.0,) * 4 + (BUMP_STD,) * N_BUMPS  # prior std of the level, the shape terms and the bumps
NOISE_PRIOR = 0.03  # a channel's noise std before its residuals can tell (3% per reading)
PHI_MAX = 0.9
UNKNOWN_SIZE = 0.1  # the compute removed by a cut whose size was not given (a checkpoint from before sizes)
RHO_MAX = 3.0  # a cut's damage may grow after it: the net loses capacity it would have used (MLP: 2.6x the jumps)
#: The prior on the persistent fraction of a cut's jump: the shared ``μ ~ N(mean, std²)`` and one cut's
#: ``ρ_j − μ ~ N(0, spread²)``. Measured on the suite's tasks (``experiments/results/suite/jump_vs_final.md``: a GMP
#: run's final Δ loss over its early trial jump), the share is about 0.03 (MLP), 0.1–0.3 (char-GPT), 0.2–0.35
#: (ResNet-20) and 0.5–1.5 (LRU): a new cut's ``mean + 2σ`` (σ² = std² + spread²) is 1.5, the LRU's worst. Where a
#: cut's recovery is read below the probe's noise (most cuts a 1% budget affords) this prior is what the loop
#: spends by; the former ``N(1, 0.6²)`` (``mean + 2σ`` = 2.3) stopped the simulated plants at 0.40 of the hindsight
#: GMP's saving, this one at 0.53, both within budget on 98% of them (``tests/unit/test_budget_sim.py``).
PERSISTENCE_PRIOR = {"mean": 0.5, "std": 0.45, "spread": 0.25}


def check_persistence_prior(prior: Mapping[str, Any] | None) -> dict[str, float]:
    """``prior`` (some of ``mean``, ``std``, ``spread``; ``None``: the defaults) completed with
    :data:`PERSISTENCE_PRIOR`; ``ValueError`` naming the key or value and what is allowed.

    >>> check_persistence_prior({"mean": 0.2})
    {'mean': 0.2, 'std': 0.45, 'spread': 0.25}
    """
    if prior is None:
        return dict(PERSISTENCE_PRIOR)
    if not isinstance(prior, Mapping):
        raise ValueError(f"persistence_prior must be a mapping with keys {', '.join(PERSISTENCE_PRIOR)}, got {prior!r}")
    unknown = sorted(str(k) for k in prior if k not in PERSISTENCE_PRIOR)
    if unknown:
        raise ValueError(f"persistence_prior: unknown key(s) {unknown}; allowed: {', '.join(PERSISTENCE_PRIOR)}")
    out = dict(PERSISTENCE_PRIOR)
    for key, value in prior.items():
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or (key != "mean" and value <= 0):
            need = "a finite number" if key == "mean" else "a number > 0"
            raise ValueError(f"persistence_prior.{key} must be {need}, got {value!r}")
        out[str(key)] = float(value)
    return out


class DamageSensor:
    """Bayesian fit of the probe- and training-loss histories (see the module docstring).

    Args:
        total_steps: the run's optimizer steps ``T`` (the final damage is read there).
        interval: steps per control interval ``Δ`` (the unit of the recovery rate ``a``).
        rho_mean / rho_mean_std: the prior on the shared persistent fraction ``μ`` (:data:`PERSISTENCE_PRIOR`).
        rho_spread: how far one cut's ``ρ_j`` may stray from ``μ``.
        window: the readings the fit uses (the trend need only hold locally).
    """

    def __init__(self, total_steps: int, interval: int, rho_mean: float = PERSISTENCE_PRIOR["mean"],
                 rho_mean_std: float = PERSISTENCE_PRIOR["std"], rho_spread: float = PERSISTENCE_PRIOR["spread"],
                 window: int = 40) -> None:
        if int(total_steps) < 1 or int(interval) < 1:
            raise ValueError(f"DamageSensor: total_steps and interval must be >= 1, got {total_steps}, {interval}")
        if rho_mean_std <= 0 or rho_spread <= 0:
            raise ValueError(f"DamageSensor: rho_mean_std and rho_spread must be > 0, got {rho_mean_std}, {rho_spread}")
        self.total_steps, self.interval = int(total_steps), int(interval)
        self.rho_mean, self.rho_mean_std, self.rho_spread = float(rho_mean), float(rho_mean_std), float(rho_spread)
        self.window = int(window)
        #: (step, log y, log z, lr, the steps z averages): a channel not read is None
        self.readings: list[tuple[int, float | None, float | None, float | None, int]] = []
        self.cuts: list[tuple[int, float, float, float]] = []  # (step, probe log-jump, training log-jump, size)
        self.noise = JumpNoise()  # the law of a measured jump's error

    # ------------------------------------------------------------------------------------ data
    def observe(self, step: int, loss: float | None, train_loss: float | None = None, lr: float | None = None,
                span: int | None = None) -> None:
        """The probe loss at ``step`` (before any cut there; ``None``: not read this interval), the mean training
        loss of the last ``span`` steps (default one interval), and the learning rate now. A non-finite or
        non-positive loss is not a reading of its channel; a reading of neither channel is ignored."""
        y = math.log(loss) if loss is not None and math.isfinite(loss) and loss > 0 else None
        z = math.log(train_loss) if train_loss is not None and math.isfinite(train_loss) and train_loss > 0 else None
        if y is None and z is None:
            return
        rate = float(lr) if lr is not None and math.isfinite(lr) and lr > 0 else None
        span = self.interval if span is None else max(1, int(span))
        self.readings.append((int(step), y, z, rate, span))

    def add_cut(self, step: int, log_jump: float, train_log_jump: float | None = None,
                size: float = UNKNOWN_SIZE) -> None:
        """A surgery at ``step`` removing ``size`` of the dense compute raised the probe loss by ``exp(log_jump)``
        (the training batches' loss by ``exp(train_log_jump)``; the probe's jump when not measured) at once."""
        if math.isfinite(log_jump):
            tj = log_jump if train_log_jump is None or not math.isfinite(train_log_jump) else train_log_jump
            self.cuts.append((int(step), float(log_jump), float(tj), float(size)))

    def add_jump_read(self, size: float, jump: float, error: float | None) -> None:
        """A trial's (or a cut's) measured log-jump by a cut of ``size``, with its standard error (``None``: none)."""
        self.noise.add(size, jump, error)

    def jump_error(self, size: float, jump: float) -> float:
        """The standard error of a measured log-jump ``jump`` by a cut of ``size`` (the fitted law)."""
        return self.noise(size, jump)

    @property
    def jump_noise(self) -> float:
        """``κ``: the error of a measured jump per unit of compute removed, where the jump is small."""
        return self.noise.coefficients[0]

    # ------------------------------------------------------------------------------------ model
    def _times(self) -> tuple[np.ndarray, np.ndarray]:
        """Learning-rate-area time ``τ`` (in intervals at the peak learning rate, at least 1) and ``lr / lr_max``
        per reading (the unit keeps the trend's coefficients of order one under their prior)."""
        steps = np.array([r[0] for r in self.readings], dtype=float)
        lrs = np.array([r[3] if r[3] is not None else np.nan for r in self.readings])
        if np.all(np.isnan(lrs)):
            return np.maximum(steps / self.interval, 1.0), np.ones_like(steps)
        lrs = np.where(np.isnan(lrs), np.nanmax(lrs), lrs) / np.nanmax(lrs)
        widths = np.diff(np.concatenate([[0.0], steps]))
        return np.maximum(np.cumsum(widths * lrs) / self.interval, 1.0), lrs

    def _trend(self, tau: np.ndarray, lr: np.ndarray) -> np.ndarray:
        """The reference's features: level, annealing, power law, early transient, and smooth bumps in log τ
        spread over the run (their small prior lets the curve depart from the parametric shape, at a price:
        a persistent cut and a bend of the reference can then trade places, and ``final_std`` says so)."""
        x = np.log(tau)
        centres = np.linspace(0.0, math.log(max(self.total_steps / self.interval, 2.0)), N_BUMPS)
        width = centres[1] - centres[0]
        bumps = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / width) ** 2)
        return np.column_stack([np.ones_like(tau), lr, tau ** -0.5, 1.0 / tau, bumps])

    def _decay(self, t: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
        """``(on, a^((t − t_j)/Δ))`` per reading × cut (0 before the cut)."""
        tj = np.array([c[0] for c in self.cuts], dtype=float)
        tau = (t[:, None] - tj[None, :]) / self.interval
        on = (tau > 0).astype(float)
        return on, on * np.power(a, np.maximum(tau, 0.0))

    def _prior(self, n_cuts: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of ``[ρ_1 .. ρ_n, ρ_new, θ_probe, θ_train]``."""
        m = n_cuts + 1
        cov_rho = self.rho_spread ** 2 * np.eye(m) + self.rho_mean_std ** 2 * np.ones((m, m))
        p = m + 2 * N_TREND
        mean, cov = np.zeros(p), np.diag(np.concatenate([[1.0] * m, TREND_STD, TREND_STD])) ** 2
        mean[:m], cov[:m, :m] = self.rho_mean, cov_rho
        return mean, cov

    def _design(self, a: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of both channels: ``X β = target``, with each row's channel (0 probe, 1 training)."""
        steps = np.array([r[0] for r in self.readings], dtype=float)
        tau, lr = self._times()
        trend = self._trend(tau, lr)
        keep = slice(max(0, len(steps) - self.window), None)  # the trend need only hold locally
        steps, tau, lr, trend = steps[keep], tau[keep], lr[keep], trend[keep]
        readings = self.readings[keep]
        n = len(self.cuts)
        rows, targets, channel = [], [], []
        spans = np.array([r[4] for r in readings], dtype=float)  # the training loss is a mean: read at its middle
        for ch, (times, values, jumps) in enumerate((
                (steps, np.array([np.nan if r[1] is None else r[1] for r in readings]),
                 np.array([c[1] for c in self.cuts])),
                (steps - spans / 2.0, np.array([np.nan if r[2] is None else r[2] for r in readings]),
                 np.array([c[2] for c in self.cuts])))):
            ok = np.isfinite(values)
            if not ok.any():
                continue
            on, decay = self._decay(times[ok], a) if n else (np.zeros((ok.sum(), 0)),) * 2
            X = np.zeros((int(ok.sum()), n + 1 + 2 * N_TREND))
            X[:, :n] = jumps[None, :] * (on - decay)  # the persistent part, coefficient ρ_j
            X[:, n + 1 + ch * N_TREND: n + 1 + (ch + 1) * N_TREND] = trend[ok]
            rows.append(X)
            targets.append(values[ok] - (decay @ jumps if n else 0.0))  # the recovering part is known given a
            channel.append(np.full(int(ok.sum()), ch))
        return np.vstack(rows), np.concatenate(targets), np.concatenate(channel)

    @staticmethod
    def _posterior(X: np.ndarray, y: np.ndarray, w: np.ndarray, mean0: np.ndarray, cov0: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, float]:
        """Gaussian posterior of ``β`` for rows weighted ``w = 1/σ²``, and the log evidence."""
        prec0 = np.linalg.inv(cov0)
        prec = prec0 + X.T @ (X * w[:, None])
        cov = np.linalg.inv(prec)
        cov = 0.5 * (cov + cov.T)
        mean = cov @ (prec0 @ mean0 + X.T @ (w * y))
        r = y - X @ mean
        d = mean - mean0
        logdet0, logdet = np.linalg.slogdet(cov0)[1], np.linalg.slogdet(cov)[1]
        evidence = -0.5 * (np.sum(w * r * r) + d @ prec0 @ d - np.sum(np.log(w)) + logdet0 - logdet)
        return mean, cov, float(evidence)

    def _noise(self, X: np.ndarray, y: np.ndarray, channel: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """Per-row noise variance: each channel's residual variance, inflated for its autocorrelation."""
        r = y - X @ mean
        var = np.empty(len(y))
        for ch in (0, 1):
            sel = channel == ch
            k = int(sel.sum())
            if not k:
                continue
            dof = k - 5
            if dof < 3:
                var[sel] = NOISE_PRIOR ** 2
                continue
            rc = r[sel]
            phi = float(np.clip(np.sum(rc[1:] * rc[:-1]) / max(np.sum(rc * rc), 1e-30), 0.0, PHI_MAX))
            var[sel] = max(float(np.sum(rc * rc)) / dof, 1e-8) * (1 + phi) / (1 - phi)
        return var

    def _fit(self, a: float) -> tuple[np.ndarray, np.ndarray, float]:
        X, y, channel = self._design(a)
        mean0, cov0 = self._prior(len(self.cuts))
        var = np.full(len(y), NOISE_PRIOR ** 2)
        for _ in range(2):  # noise from the residuals of the fit, then the fit under that noise
            mean, cov, ev = self._posterior(X, y, 1.0 / var, mean0, cov0)
            var = self._noise(X, y, channel, mean)
        mean, cov, ev = self._posterior(X, y, 1.0 / var, mean0, cov0)
        return mean, cov, ev

    def estimate(self, step: int) -> dict[str, Any]:
        """The sensor's reading at ``step`` (plain floats)."""
        n = len(self.cuts)
        # on the probe (the quality is judged held out), plus its error: the trial kept the cuts whose batches read
        # them low, by about that much (the winner's curse of sizing by a noisy measurement)
        errors = np.array([self.noise(c[3], c[1]) for c in self.cuts], dtype=float)  # each measured jump's error
        jumps = np.array([c[1] for c in self.cuts], dtype=float) + errors
        remaining = max(self.total_steps - int(step), 0) / self.interval
        if not self.readings:
            return {"damage": 0.0, "damage_std": 0.0, "final": 0.0, "final_std": 0.0, "reference": float("nan"),
                    "rho": self.rho_mean, "recovery": None, "jumps": 0.0, "next_factor": self.rho_mean,
                    "next_factor_std": self.rho_mean_std, "jump_noise": self.jump_noise}
        fits = [(self._fit(a), a) for a in RECOVERY_GRID]
        ev = np.array([f[0][2] for f in fits])
        weights = np.exp(ev - ev.max())
        weights /= weights.sum()
        now, end = np.array([float(step)]), np.array([float(self.total_steps)])
        jump_var = errors ** 2
        moments = np.zeros((4, 2))  # (damage, final, next factor, μ) × (mean, second moment)
        for w, ((mean, cov, _), a) in zip(weights, fits):
            rho, cov_rho = np.clip(mean[:n + 1], 0.0, RHO_MAX), cov[:n + 1, :n + 1]  # never heals past 0
            values = []
            for t in (now, end):
                if n:
                    on, decay = (v[0] for v in self._decay(t, a))
                    g = np.concatenate([jumps * (on - decay), [0.0]])
                    factor = decay + (on - decay) * rho[:n]  # each cut's share still there at t
                    noise = float(np.sum(factor ** 2 * jump_var))  # the measured jumps' own errors
                    values.append((float(jumps @ decay + g @ rho), float(g @ cov_rho @ g) + noise))
                else:
                    values.append((0.0, 0.0))
            heal = a ** remaining
            values.append((heal + (1 - heal) * float(rho[n]), (1 - heal) ** 2 * float(cov_rho[n, n])))
            e = np.full(n + 1, 1.0 / (n + 1))  # the shared μ: the mean of the ρ's, new cut included
            values.append((float(e @ rho), float(e @ cov_rho @ e)))
            for i, (mu, var) in enumerate(values):
                moments[i] += w * np.array([mu, var + mu * mu])
        stds = np.sqrt(np.maximum(moments[:, 1] - moments[:, 0] ** 2, 0.0))
        (mean, _, _), best_a = fits[int(np.argmax(ev))]
        tau, lr = self._times()
        reference = float(np.exp(self._trend(tau[-1:], lr[-1:])[0] @ mean[n + 1:n + 1 + N_TREND]))
        X, y, channel = self._design(best_a)
        probe_var = self._noise(X, y, channel, mean)[channel == 0]
        probe_noise = float(np.sqrt(np.mean(probe_var))) if probe_var.size else NOISE_PRIOR
        return {"damage": float(moments[0, 0]), "damage_std": float(math.hypot(stds[0], probe_noise)),
                "final": float(moments[1, 0]), "final_std": float(stds[1]), "reference": reference,
                "rho": float(moments[3, 0]), "recovery": best_a, "jumps": float(jumps.sum()),
                "next_factor": float(max(moments[2, 0], 0.0)), "next_factor_std": float(stds[2]),
                "jump_noise": self.jump_noise}

    def reading(self, step: int, metric: str = "loss", compute: float = 1.0) -> dict[str, Any]:
        """:meth:`estimate` as the controller reads it: ``damage``, ``final_damage``, ``final_std``, ``damage_std``,
        ``reference``, ``rho``, ``next_factor(_std)``, ``jump_noise`` and ``cut_damage_rate`` (the final damage per
        unit of compute removed, ``compute`` being the fraction of dense compute now), in the budget's ``metric``.

        ``metric="error"``: the relative excesses become points at the dense error now. Not extrapolated to the
        end: the trend's extrapolation of an error rate is unstable early, and the error only falls, so this
        errs on the safe side.
        """
        r = self.estimate(step)
        damage, final, final_std, damage_std = r["damage"], r["final"], r["final_std"], r["damage_std"]
        factor, factor_std = r["next_factor"], r["next_factor_std"]
        if metric == "error":  # a relative excess (a log-ratio) of the error rate -> points at the reference
            ref = r["reference"]
            damage, damage_std = ref * math.expm1(damage), ref * math.exp(damage) * damage_std
            final, final_std = ref * math.expm1(final), ref * math.exp(final) * final_std
            factor, factor_std = ref * factor, ref * factor_std
        removed = 1.0 - compute  # the final damage is the sum of the cuts': per unit of compute removed
        return {"damage": damage, "final_damage": final, "final_std": final_std, "damage_std": damage_std,
                "reference": r["reference"], "rho": r["rho"], "next_factor": factor, "next_factor_std": factor_std,
                "jump_noise": r["jump_noise"], "cut_damage_rate": final / removed if removed > 1e-9 else None}

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "interval": self.interval,
                "readings": [list(r) for r in self.readings], "cuts": [list(c) for c in self.cuts],
                "noise": self.noise.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total_steps = int(state.get("total_steps", self.total_steps))
        self.interval = int(state.get("interval", self.interval))

        def opt(v: Any) -> float | None:
            return None if v is None or not math.isfinite(float(v)) else float(v)

        self.readings = [(int(r[0]), opt(r[1]), opt(r[2]), opt(r[3]), int(r[4]) if len(r) > 4 else self.interval)
                         for r in state.get("readings", [])]
        self.cuts = [(int(c[0]), float(c[1]), float(c[2]), float(c[3]) if len(c) > 3 else UNKNOWN_SIZE)
                     for c in state.get("cuts", [])]
        self.noise.load_state_dict(state.get("noise", {}))
