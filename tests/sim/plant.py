"""A simulated pruning plant, a driver that replays the real control loop on it, and a hindsight oracle.

The plant is numpy only and is meant to be as hard as the real runs (ranges measured on real runs):

* **Dense curve** in LR-area time with a cosine LR (linear warm-up, floor ``lr_min``)::

      τ(t) = Σ_{s<t} lr(s)          log L_dense(t) = log(L_inf + A (τ + τ0)^(−α)) − γ (1 − lr(t))

  (the last term: the annealing drop as the LR decays). ``T ∈ [250, 3000]`` steps (log-uniform),
  readings every ``D = 20`` steps at ``D, 2D, …`` strictly before ``T`` (the end of training).
* **Cuts**: removing ``u`` of the dense compute at compute ``c`` (``c − u`` after) raises the log-loss at
  once by ``s = k·u / (c − u − c_min)^q`` (a capacity cliff at ``c_min ∈ [0.05, 0.3]`` of power ``q ∈ [1.5, 4]``;
  ``k`` such that a GMP to 0.5 costs an immediate 2–30 % in total). The first half of the compute then costs
  9–54× the first tenth, as the trial jumps of the suite's tasks measure (``jump_vs_final.md``'s ladders: the LRU
  and the ResNet-20 8–16×, the char-GPT ~45×, the MLP ~66×; with ``q = 2`` only, as before 2026-12-07, 10–15×).
  The effect recovers at rate ``a ∈ [0.9, 0.995]`` per interval toward a persistent fraction ``ρ_j`` (plant
  ``ρ ∈ [0, 1.2]``, per-cut jitter)::

      effect_j(t) = s_j · [ρ_j + (1 − ρ_j) · a^((t − t_j)/D)]        for t > t_j

* **Readings**: probe ``log L = log L_dense + Σ effects + AR(1) noise`` (``φ ∈ [0, 0.7]``, std 0.5–5 %);
  training loss (mean over the interval): the dense training curve (a generalisation gap that opens with
  τ) ``+ g_j·effects`` (``g_j ∈ [0.5, 1.5]``) + its own noise (0.2–1.5 %).
* **Jump measurements**: the probe batches are fixed, so a trial cut and the real cut of the same ``u`` at
  the same step read the same jump: the true ``s`` plus that step's batch error (``σ_b ∈ [0.2, 1] %``
  absolute, shrinking for tiny ``u``). Small plants' first jumps are then near zero or negative.
* **Planner**: the realised cut snaps to the plant's grid of compute ``1 − n·q`` (``q ∈ [0.005, 0.03]``),
  never below the floor ``target``.
* **Reading costs** (as the loop counts them, in FLOPs): one probe reading (2 batches) costs ``read_share ∈
  [0.02, 0.07]`` of an interval's training at the same width (the suite: 2 batches per 20 steps on the MLP and
  the LRU, 3.3%; per 10 on the char-GPT and the ResNet-20, 6.7%); a trial the same, a read of the 6 confirm
  batches 3×, the training channel's jump of a cut 2 readings. With ``sense_budget`` the loop reads an interval
  only when its readings so far are within that share of the training FLOPs so far, backs off after readings that
  find nothing to do (no trial cut fitted, among them) and goes idle where no cut repays its sizing
  (:class:`ctprune_lightning.reading.ReadSchedule`, :func:`~ctprune_lightning.reading.sizing_price`, as the loop
  asks them); the training channel is read on every interval, read or not.

:func:`run_loop` replays the real loop (``ControlLoop``) on a plant; :func:`gmp_oracle` is the best fixed
GMP schedule in hindsight on the noise-free plant. Everything is deterministic given the seeds.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable
from unittest import mock

import numpy as np

from ctprune_lightning.loop_planning import CONFIRM_BATCHES, CONFIRM_Z
from ctprune_lightning.reading import ReadSchedule, likely_cut, sizing_price

__all__ = ["Plant", "RunResult", "run_loop", "run_plants", "gmp_oracle", "reference_size_cut", "NaiveJumpController",
           "KnownPlantController", "NullSensor", "GMP_TARGETS", "GMP_RAMP"]

INTERVAL = 20
GMP_TARGETS = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))  # 0.1 .. 0.9
GMP_RAMP = 0.15  # progress from the first possible cut to the GMP target
MAX_CUTS = 512
JUMP_FLOOR = 0.02  # c − u − c_min below this reads as this: past the cliff the net is broken
JUMP_MAX = 3.0  # ... and one cut's log-jump at most this (20× the loss: broken either way)
SENSE_BUDGET = 0.03  # the product's default sense_budget (conf/pruning/default.yaml)
PROBE_BATCHES = 2  # the probe's batches (a reading); the confirm batches cost confirm_batches / 2 readings


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


@dataclass
class Plant:
    """One random plant (all parameters drawn from ``seed``); see the module docstring."""

    seed: int
    total_steps: int = 0
    interval: int = INTERVAL
    # dense curve
    lr_warmup: float = 0.0
    lr_min: float = 0.0
    l_inf: float = 1.0
    amp: float = 1.0
    alpha: float = 0.5
    tau0: float = 10.0
    anneal: float = 0.0
    gap: float = 0.0
    # cuts
    k: float = 0.01
    c_min: float = 0.1
    q: float = 2.0  # the cliff's power: 2 cuts the first tenth at 1/10 of the cost of the first half, 4 at 1/60
    a: float = 0.95
    rho: float = 0.5
    train_gain: float = 1.0
    gmp_half_jump: float = 0.1  # immediate relative jump of a continuous GMP to 0.5 (what k was drawn from)
    # noise
    sigma_probe: float = 0.01
    phi: float = 0.0
    sigma_train: float = 0.005
    sigma_jump: float = 0.005  # a measured jump's standard error at a 20% cut with no jump (grows with the cut)
    jump_rel: float = 0.1  # ... and its relative error where the jump is large (measured: 5-10% on 8 batches)
    quantum: float = 0.01
    read_share: float = 0.033  # one probe reading's forwards / one interval's training FLOPs at the same width
    # per-cut draws, by cut index (the j-th cut of any schedule on this plant)
    rho_j: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    gain_j: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @classmethod
    def random(cls, seed: int) -> "Plant":
        rng = np.random.default_rng([int(seed), 20240917])
        p = cls(seed=int(seed))
        p.total_steps = int(round(_log_uniform(rng, 250, 3000)))
        p.lr_warmup = float(rng.uniform(0.0, 0.05))
        p.lr_min = float(rng.uniform(0.0, 0.1))
        p.l_inf = _log_uniform(rng, 0.1, 2.0)
        p.alpha = float(rng.uniform(0.3, 0.8))
        p.tau0 = _log_uniform(rng, 5.0, 50.0)
        p.amp = (float(rng.uniform(2.0, 10.0)) - 1.0) * p.l_inf * p.tau0 ** p.alpha  # L(0) = 2..10 × L_inf
        p.anneal = float(rng.uniform(0.0, 0.2))
        p.gap = float(rng.uniform(0.0, 0.15))
        p.c_min = float(rng.uniform(0.05, 0.3))
        p.gmp_half_jump = _log_uniform(rng, 0.02, 0.30)
        p.a = float(rng.uniform(0.9, 0.995))
        p.rho = float(rng.uniform(0.0, 1.2))
        p.train_gain = float(rng.uniform(0.5, 1.5))
        p.sigma_probe = _log_uniform(rng, 0.005, 0.05)
        p.phi = float(rng.uniform(0.0, 0.7))
        p.sigma_train = _log_uniform(rng, 0.002, 0.015)
        p.sigma_jump = float(rng.uniform(0.002, 0.01))
        p.quantum = float(rng.uniform(0.005, 0.03))
        p.rho_j = np.clip(p.rho + 0.1 * rng.standard_normal(MAX_CUTS), 0.0, 1.3)
        p.gain_j = np.clip(p.train_gain * np.exp(0.15 * rng.standard_normal(MAX_CUTS)), 0.5, 1.5)
        p.jump_rel = float(rng.uniform(0.05, 0.15))  # drawn last: the draws before it are the plants' of old
        p.read_share = _log_uniform(np.random.default_rng([int(seed), 20240917, 1]), 0.02, 0.07)  # its own stream
        p.q = float(np.random.default_rng([int(seed), 20240917, 2]).uniform(1.5, 4.0))  # its own stream too
        # k: a GMP to 0.5 costs gmp_half_jump at once, ∫_0.5^1 k / (c − c_min)^q dc
        p.k = math.log1p(p.gmp_half_jump) * (p.q - 1) / ((0.5 - p.c_min) ** (1 - p.q) - (1.0 - p.c_min) ** (1 - p.q))
        p._curves()
        return p

    # ------------------------------------------------------------------------------------ dense curves
    def _curves(self) -> None:
        T = self.total_steps
        t = np.arange(T + 1, dtype=float)
        warm = max(1.0, self.lr_warmup * T)
        cos = self.lr_min + (1 - self.lr_min) * 0.5 * (1 + np.cos(np.pi * np.clip((t - warm) / (T - warm), 0, 1)))
        self.lr_curve = np.where(t < warm, (t + 1) / warm, cos)
        tau = np.concatenate([[0.0], np.cumsum(self.lr_curve[:-1])])
        self.log_dense = np.log(self.l_inf + self.amp * (tau + self.tau0) ** (-self.alpha)) - self.anneal * (
            1 - self.lr_curve)
        self.log_train = self.log_dense - self.gap * tau / tau[-1]

    @property
    def steps(self) -> list[int]:
        """The control steps: every ``interval`` steps, strictly before the end of training."""
        return list(range(self.interval, self.total_steps, self.interval))

    # ------------------------------------------------------------------------------------ cuts
    def jump_error(self, u: float, jump: float) -> float:
        """The standard error of a jump read on the probe batches: it grows with the cut as on real runs
        (``experiments/results/jump_noise.md``: the MLP's from 0.0005 at 10% of the compute to 0.07 at 80%)."""
        return math.hypot(self.sigma_jump * u / 0.2, self.jump_rel * jump)

    def snap(self, c: float, u: float, target: float) -> float:
        """The cut the planner realises for a request ``u`` at compute ``c``: onto the grid, not below the floor."""
        if not (u > 0):
            return 0.0
        q = self.quantum
        after = max(1.0 - q * round((1.0 - (c - u)) / q), target)
        return max(0.0, c - after) if after < c - 1e-12 else 0.0

    def jump(self, c: float, u: float) -> float:
        """True immediate log-jump of removing ``u`` at compute ``c``."""
        if u <= 0:
            return 0.0
        return min(self.k * u / max(c - u - self.c_min, JUMP_FLOOR) ** self.q, JUMP_MAX)

    def effects(self, t: float, cuts: list[tuple[int, float]], gains: bool = False) -> float:
        """``Σ_j effect_j(t)`` over the cuts ``(t_j, s_j)`` made before ``t`` (``gains``: the training channel's)."""
        total = 0.0
        for j, (tj, s) in enumerate(cuts):
            if t > tj:
                r = self.rho_j[j]
                total += (self.gain_j[j] if gains else 1.0) * s * (r + (1 - r) * self.a ** ((t - tj) / self.interval))
        return total

    def final_log_damage(self, cuts: list[tuple[int, float]]) -> float:
        return self.effects(float(self.total_steps), cuts)

    def saving(self, compute_at: list[tuple[int, float]]) -> float:
        """``1 −`` mean compute over the steps, given ``(step, compute from then on)`` in order (starts at 1)."""
        T, c, last, area = self.total_steps, 1.0, 0, 0.0
        for t, c_new in compute_at:
            area += c * (t - last)
            c, last = c_new, t
        area += c * (T - last)
        return 1.0 - area / T


# ---------------------------------------------------------------------------------------------- sizing
def reference_size_cut(trial: Callable[[float], float], u: float, max_jump: float | None, quantum: float) -> float:
    """The spec of ``controllers.sizing.size_cut``: the largest ``u' <= u`` on the grid whose trial jump is
    ``<= max_jump`` (0.0 if none); ``max_jump=None``: ``u``. Used by the harness's own controllers."""
    if u <= 0:
        return 0.0
    if max_jump is None:
        return u
    if trial(u) <= max_jump:
        return u
    lo, hi = 0, int(math.floor(u / quantum + 1e-9))  # lo: known good (0), hi: candidate top
    if hi >= 1 and trial(hi * quantum) <= max_jump:
        return hi * quantum
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if trial(mid * quantum) <= max_jump:
            lo = mid
        else:
            hi = mid
    return lo * quantum


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class RunResult:
    plant_seed: int
    final_true: float  # relative excess of the final true loss over dense: exp(Σ effects at T) − 1
    final_true_log: float  # Σ effects at T (the sensor's units)
    pred_final: float  # the sensor's predicted final at the end (every cut's jump in, no reading after the last)
    pred_final_std: float
    cuts: list[dict[str, float]]  # step, u (realised), jump (true), measured, train_measured
    saving: float  # 1 − mean compute over the steps
    final_compute: float
    trace: list[dict[str, Any]]  # progress, requested, max_jump, sized, u, reason, held_by, slack (the sensor's,
    # in budgets: (budget − final − margin·final_std) / budget), compute (before the cut), final, final_std, …
    stalls: int  # runs of >= STALL_RUN consecutive stalled intervals
    stall_intervals: list[float]  # progress at the start of each stall
    chatter: int  # longest run of strictly alternating cut/hold outcomes (the loop's: controller + size_cut)
    warmup: float
    sensing: float = 0.0  # the readings' forwards / the training FLOPs (as the loop's summary: sensing_share)
    unread: float = 0.0  # the share of control intervals left unread (sensing budget, backoff, idle)

    @property
    def covered(self) -> bool:
        return abs(self.pred_final - self.final_true_log) <= 2.0 * self.pred_final_std + 1e-12

    @property
    def z(self) -> float:
        return (self.final_true_log - self.pred_final) / max(self.pred_final_std, 1e-12)


STALL_RUN = 5
STALL_SLACK = 0.5  # a stall: holding while the sensor says more than this much of the budget is left


class NullSensor:
    """Reads nothing: for the harness's own controllers, which do not need the damage sensor."""

    def observe(self, step: int, loss: float | None, train_loss: float | None = None, lr: float | None = None,
                span: int | None = None) -> None:
        pass

    def add_cut(self, step: int, log_jump: float, train_log_jump: float | None = None, size: float = 0.0) -> None:
        pass

    def add_jump_read(self, size: float, jump: float, error: float | None) -> None:
        pass

    def jump_error(self, size: float, jump: float) -> float:
        return 0.0

    def estimate(self, step: int) -> dict[str, Any]:
        return {"damage": 0.0, "damage_std": 0.0, "final": 0.0, "final_std": 0.0, "reference": None,
                "rho": None, "next_factor": None, "next_factor_std": 0.0}


def _observation(harness: bool, **kwargs: Any) -> Any:
    """The package's ``Observation`` (the fields it has); the harness's own controllers take a namespace."""
    if harness:
        return SimpleNamespace(**kwargs)
    from ctprune_lightning.controllers import Observation

    names = {f.name for f in dataclasses.fields(Observation)}
    return Observation(**{k: v for k, v in kwargs.items() if k in names})


def run_loop(plant: Plant, controller_name: str | Any = "lqr", budget: float = 0.01, target: float = 0.1,
             seed: int = 0, sensor: Any = None, sizer: Callable[..., float] | None = None,
             controller_kwargs: dict[str, Any] | None = None, resume_at: int | None = None,
             miss: float = 0.0, confirm_batches: int = CONFIRM_BATCHES,
             sense_budget: float | None = SENSE_BUDGET) -> RunResult:
    """Replay the real loop on ``plant`` with measurement noise from ``seed``.

    Each control step ``t``: ``sensor.observe(t, probe, train, lr)``; ``r = sensor.estimate(t)``;
    ``u = ctl.step(Observation(...))``; if ``u > 0``: ``u = size_cut(trial, u, ctl.max_jump, quantum)``; if
    ``u > 0``: the planner realises it on the grid, and ``sensor.add_cut(t, measured, train_measured)``.

    ``controller_name``: a name for ``build_controller(name, target, budget=budget)`` or a controller object
    (``step``, ``reason``, ``max_jump``, ``warmup``). ``sensor``: default a ``DamageSensor``.
    ``resume_at``: before that control step (an index), the sensor and the controller are replaced by fresh
    ones loaded from their ``state_dict`` (a checkpoint resume); the run must not change.
    ``miss``: the chance that a control step's 2 probe batches miss most of a cut's damage (its reads of every
    size then show 0–40% of the true jump, their spread as small as usual): the sparse, heavy-tailed per-sample
    damage measured on real runs (``experiments/results/suite/not_kept_2026-12-06.md``: 4 of 22 committed cuts
    read 4.6–9.8 law errors lower on the probe's 2 batches than on 6 others). 0: Gaussian reads.
    ``confirm_batches``: as the loop's (``ControlPruning(confirm_batches=...)``), a sized cut is read again on that
    many batches the trial did not select on (a fresh error, the 2-batch law's × √(2 / confirm_batches)); when that
    read exceeds its allowance by more than ``CONFIRM_Z`` of its error, the cut scaled down to fit it is read there
    (the same batches: the same error draw) and made if it fits, else no cut; 0: no such check.
    ``sense_budget``: as the loop's (``ControlPruning(sense_budget=...)``, default the product's): the readings
    (probe, trials, checks, a cut's training-channel jump) charged at the plant's ``read_share``; an interval is
    read only when the readings so far are within that share of the training FLOPs so far (the first always), the
    backoff skips intervals after readings that found nothing to do (budget spent, no trial cut fitted, or no cut
    that repays its sizing), and the loop's payback rule holds cuts that would not repay their sizing (idle, where
    no first cut does). An unread interval holds; the sensor still reads its training channel (the loop's
    ``observe_training``). ``None``: every interval read, no payback rule (the harness before 2026-12-07). Only
    for a controller that reads the damage (not the harness's own).
    """
    if isinstance(controller_name, str):
        from ctprune_lightning.controllers import build_controller

        ctl = build_controller(controller_name, target=target, budget=budget, **(controller_kwargs or {}))
    else:
        ctl = controller_name
    if sensor is None:
        from ctprune_lightning.sensing import DamageSensor

        sensor = DamageSensor(total_steps=plant.total_steps, interval=plant.interval)
    if sizer is None:
        from ctprune_lightning.controllers.sizing import size_cut as sizer
    rng = np.random.default_rng([int(seed), plant.seed, 777])
    err_rng = np.random.default_rng([int(seed), plant.seed, 778])  # the jumps' read errors (leaves rng's draws be)
    miss_rng = np.random.default_rng([int(seed), plant.seed, 779])  # which steps' probe batches miss the damage
    confirm_rng = np.random.default_rng([int(seed), plant.seed, 780])  # the confirm batches' read errors
    T, D, q = plant.total_steps, plant.interval, plant.quantum
    margin = float(getattr(ctl, "margin", 2.0))
    warmup = float(getattr(ctl, "warmup", 0.0))
    harness = bool(getattr(ctl, "harness", False))  # the harness's own controllers read no damage
    priced = sense_budget is not None and bool(getattr(ctl, "reads_damage", False)) and not harness
    reads = ReadSchedule(sense_budget if priced else None)
    reading = plant.read_share * D  # one probe reading's forwards, in dense training steps (× the compute)
    confirm_read = reading * confirm_batches / PROBE_BATCHES
    train_flops = sensing_flops = 0.0  # in dense training steps
    last_read, jump_rate = 0, None
    slack = 1.0

    c = 1.0
    cuts: list[tuple[int, float]] = []
    cut_rows: list[dict[str, float]] = []
    compute_at: list[tuple[int, float]] = []
    trace: list[dict[str, Any]] = []
    innov = plant.sigma_probe * math.sqrt(1 - plant.phi ** 2)
    noise = plant.sigma_probe * rng.standard_normal()
    last_u, last_jump = 0.0, None
    r: dict[str, Any] = {}
    for k, t in enumerate(plant.steps):
        if k == resume_at and isinstance(controller_name, str):
            from ctprune_lightning.controllers import build_controller
            from ctprune_lightning.sensing import DamageSensor

            state = (ctl.state_dict(), sensor.state_dict(), reads.state_dict())
            ctl = build_controller(controller_name, target=target, budget=budget, **(controller_kwargs or {}))
            sensor = DamageSensor(total_steps=1, interval=1)
            reads = ReadSchedule(sense_budget if priced else None)
            ctl.load_state_dict(state[0])
            sensor.load_state_dict(state[1])
            reads.load_state_dict(state[2])
        if k:
            noise = plant.phi * noise + innov * rng.standard_normal()
        z_batch, z_train = rng.standard_normal(2)  # this step's probe-batch error on a jump, the train batch's
        z_mean = rng.standard_normal()  # the training loss's mean over the steps since the last reading
        train_flops += D * c
        unread = reads.due(t, sensing_flops, train_flops, capped=k > 0)
        window = plant.log_train[last_read + 1:t + 1]  # the training loss's mean since the last interval
        train_dense = float(np.log(np.mean(np.exp(window))))
        train = math.exp(train_dense + plant.effects((t + last_read) / 2, cuts, gains=True)
                         + plant.sigma_train * math.sqrt(D / (t - last_read)) * z_mean)
        span, last_read = t - last_read, t
        if unread:  # a budget cuts only on a reading: hold (the loop's record_skip), the free channel still read
            sensor.observe(t, None, train_loss=train, lr=float(plant.lr_curve[t]), span=span)
            trace.append({"step": t, "progress": t / T, "requested": 0.0, "max_jump": None, "sized": 0.0, "u": 0.0,
                          "reason": unread, "held_by": "unread", "slack": slack, "compute": c, "read": False,
                          "final": r.get("final"), "final_std": r.get("final_std"), "rho": r.get("rho"),
                          "next_factor": r.get("next_factor"), "quantum_cost": 0.0})
            continue
        sensing_flops += reading * c
        probe = math.exp(plant.log_dense[t] + plant.effects(t, cuts) + noise)
        sensor.observe(t, probe, train_loss=train, lr=float(plant.lr_curve[t]), span=span)
        r = sensor.estimate(t)
        progress = t / T
        obs = _observation(harness, step=t, progress=progress, compute=c, damage=r["damage"],
                           jump=last_jump, last_action=last_u, final_damage=r["final"], final_std=r["final_std"],
                           damage_std=r["damage_std"], reference=r["reference"], rho=r["rho"],
                           next_factor=r.get("next_factor"), next_factor_std=r.get("next_factor_std", 0.0),
                           jump_noise=r.get("jump_noise", 0.0))
        last_u, last_jump = 0.0, None
        requested = float(ctl.step(obs))
        reason = str(getattr(ctl, "reason", ""))
        max_jump = getattr(ctl, "max_jump", None)
        j = len(cuts)

        tried: dict[float, float] = {}  # this step's trials (the same batches: one error draw z_batch)
        seen = 1.0 - float(miss_rng.uniform(0.6, 1.0)) if miss and miss_rng.random() < miss else 1.0

        def measured(u_req: float, _c: float = c) -> float:
            nonlocal sensing_flops
            u_r = plant.snap(_c, u_req, target)
            true = plant.jump(_c, u_r)
            error = plant.jump_error(u_r, true)
            if u_r not in tried:  # the loop's per-batch spread: two batches, one degree of freedom
                tried[u_r] = true * seen + error * z_batch
                sensor.add_jump_read(u_r, tried[u_r], error * abs(float(err_rng.standard_normal())))
                sensing_flops += reading * _c  # a trial: one reading, at the uncut model's FLOPs
            return tried[u_r]

        def trial(u_req: float) -> float:  # the loop's: a trial fits with the law's error to spare
            jump = measured(u_req)
            return jump + sensor.jump_error(plant.snap(c, u_req, target), jump)

        unrepaid = False
        worth = sizing_price(reading * c, confirm_read * c, 1.0, T - t) if priced else 0.0
        if requested > 0 and max_jump is not None and priced:  # the loop's payback rule (LoopPlanning._size_by_trial)
            if likely_cut(requested, max_jump, jump_rate) < worth:
                unrepaid, requested, reason = True, 0.0, "payback"
            elif not cuts and trial(requested) > max_jump and trial(worth) > max_jump:
                reads.go_idle("payback: the smallest cut that repays its sizing jumps more than allowed")
                requested, reason = 0.0, reads.idle
        sized = float(sizer(trial, requested, max_jump, q)) if requested > 0 else 0.0
        u = plant.snap(c, sized, target) if sized > 0 else 0.0
        if u > 0 and confirm_batches and max_jump is not None:  # the sized cut read on unselected batches
            scale, true_c = math.sqrt(2.0 / confirm_batches), plant.jump(c, u)
            sensing_flops += 2 * confirm_read * c  # the confirm batches before, and with the cut
            fresh = true_c + plant.jump_error(u, true_c) * scale * float(confirm_rng.standard_normal())
            if fresh > max_jump + CONFIRM_Z * sensor.jump_error(u, fresh) * scale:  # it does not fit there
                z_c = (fresh - true_c) / max(plant.jump_error(u, true_c) * scale, 1e-12)  # the same batches again
                smaller = plant.snap(c, u * 0.98 * max_jump / fresh, target) if fresh > 0 else 0.0
                u = sized = 0.0
                if smaller >= q * 0.999:  # the cut scaled down to that read, read there once more
                    sensing_flops += confirm_read * c
                    true_s = plant.jump(c, smaller)
                    again = true_s + plant.jump_error(smaller, true_s) * scale * z_c
                    if again <= max_jump + CONFIRM_Z * sensor.jump_error(smaller, again) * scale:
                        u = sized = smaller
            if u > 0 and priced and not cuts and u < worth:  # LoopPlanning.checked_cut: a first cut below its price
                reads.go_idle("payback: the first cut that fits the unselected batches too saves less than its price")
                u = sized = 0.0
                reason = reads.idle
        if u > 0:
            s = plant.jump(c, u)
            if priced:
                sensing_flops += 2 * reading * c  # the training channel's jump: its batches before and after the cut
            meas = measured(u)
            jump_rate = meas / u
            train_meas = plant.gain_j[j] * s + plant.sigma_train * z_train
            sensor.add_cut(t, meas, train_log_jump=train_meas, size=u)
            cuts.append((t, s))
            cut_rows.append({"step": t, "u": u, "jump": s, "measured": meas, "train_measured": train_meas})
            c -= u
            compute_at.append((t, c))
            last_u, last_jump = u, math.expm1(meas)
        if priced:  # the backoff (ControlLoop.note_quiet on the plan's ``quiet``)
            reads.note(t, u <= 0 and (bool(getattr(ctl, "spent", False)) or unrepaid or bool(tried)), D)
        final = r["final"] if r["final"] is not None else 0.0
        slack = (budget - max(float(final), 0.0) - margin * float(r["final_std"] or 0.0)) / budget
        trace.append({"step": t, "progress": progress, "requested": requested, "max_jump": max_jump, "sized": sized,
                      "u": u, "reason": reason, "held_by": _held_by(requested, sized, u), "slack": slack,
                      "compute": c + u, "final": final, "read": True,
                      "final_std": r["final_std"], "rho": r.get("rho"), "next_factor": r.get("next_factor"),
                      "quantum_cost": plant.jump(c + u, plant.snap(c + u, q, target))
                      * _persist(plant, t, len(cuts) - (u > 0))})
    final_log = plant.final_log_damage(cuts)
    stalls, starts = _stalls(trace, warmup, target, plant.quantum, budget)
    end = sensor.estimate(plant.steps[-1])  # with every cut's measured jump, the last made after the last reading
    return RunResult(plant_seed=plant.seed, final_true=math.expm1(final_log), final_true_log=final_log,
                     pred_final=float(end.get("final") or 0.0), pred_final_std=float(end.get("final_std") or 0.0),
                     cuts=cut_rows, saving=plant.saving(compute_at), final_compute=c, trace=trace,
                     stalls=stalls, stall_intervals=starts, chatter=_chatter(trace, warmup), warmup=warmup,
                     sensing=sensing_flops / max(train_flops, 1e-12),
                     unread=sum(not row["read"] for row in trace) / max(len(trace), 1))


def _plant_run(args: tuple[str, int, float, float, dict[str, Any]]) -> tuple[RunResult, dict[str, float]]:
    controller, seed, budget, target, kwargs = args
    plant = Plant.random(seed)
    res = run_loop(plant, controller, budget=budget, target=target, seed=seed, **kwargs)
    return res, gmp_oracle(plant, res.warmup, budget, floor=target)


def run_plants(controller: str, seeds: list[int], budget: float = 0.01, target: float = 0.1,
               workers: int | None = None, **run_kwargs: Any) -> list[tuple[RunResult, dict[str, float]]]:
    """:func:`run_loop` of ``controller`` and :func:`gmp_oracle` on ``Plant.random(seed)`` for each seed, in seed
    order, over ``workers`` processes (default: the CPUs this process may use; each run is deterministic, so the
    result does not depend on them); ``run_kwargs`` (e.g. ``miss``, ``confirm_batches``) go to every run."""
    jobs = [(controller, int(seed), budget, target, dict(run_kwargs)) for seed in seeds]
    workers = workers or len(os.sched_getaffinity(0))
    if workers <= 1 or len(jobs) < 2:
        return [_plant_run(job) for job in jobs]
    ctx = multiprocessing.get_context("spawn")  # no fork of a parent that has started BLAS or torch threads
    # the workers' BLAS: one thread each (read at their start)
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}), \
            ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_plant_run, jobs, chunksize=max(1, len(jobs) // (4 * workers))))


def _held_by(requested: float, sized: float, u: float) -> str:
    """Who held (no cut): the controller (u = 0), size_cut (no quantum's trial jump fits max_jump) or the
    planner (the sized cut rounds to no width change); "" when it cut."""
    if u > 0:
        return ""
    return "controller" if requested <= 0 else ("size_cut" if sized <= 0 else "planner")


def _persist(plant: Plant, t: int, j: int) -> float:
    """Fraction of a cut's jump made at ``t`` (the ``j``-th cut) still there at the end of training."""
    r = plant.rho_j[min(j, MAX_CUTS - 1)]
    return float(r + (1 - r) * plant.a ** ((plant.total_steps - t) / plant.interval))


def _stalls(trace: list[dict[str, Any]], warmup: float, target: float, quantum: float,
            budget: float) -> tuple[int, list[float]]:
    """Runs of >= STALL_RUN consecutive intervals past warm-up with no cut while (1) compute is at least a
    quantum above the floor, (2) the sensor says more than half the budget is left, and (3) one quantum cut
    would truly cost less than half the budget at the end (else holding is right: the plant is at its cliff).
    Unread intervals (the sensing budget, the backoff, idle: each a hold with its reason) neither count nor break
    a run: the stall is of the decisions the loop made (:attr:`RunResult.unread` reports the rest)."""
    runs, starts, n = 0, [], 0
    for row in trace:
        if not row.get("read", True):
            continue
        stalled = (row["u"] <= 0 and row["progress"] >= warmup and row["compute"] > target + quantum - 1e-9
                   and row["slack"] > STALL_SLACK and row["quantum_cost"] < STALL_SLACK * budget)
        n = n + 1 if stalled else 0
        if n == STALL_RUN:
            runs += 1
            starts.append(row["progress"])
    return runs, starts


def _chatter(trace: list[dict[str, Any]], warmup: float) -> int:
    """Longest run of strictly alternating decisions (cut, hold, cut, hold, …) after warm-up, counted in
    decisions (read intervals: an unread one decides nothing); a run needs a hold between every two cuts and one
    cut between every two holds."""
    decisions = [row["u"] > 0 for row in trace if row["progress"] >= warmup and row.get("read", True)]
    best = run = 1 if decisions else 0
    for prev, cur in zip(decisions, decisions[1:]):
        run = run + 1 if cur != prev else 1
        best = max(best, run)
    return best


# ---------------------------------------------------------------------------------------------- oracle
def first_cut_progress(plant: Plant, warmup: float) -> float:
    """Progress of the first control step at which the loop may cut (the controller's warm-up rule)."""
    for t in plant.steps:
        if t / plant.total_steps >= warmup:
            return t / plant.total_steps
    return 1.0


def gmp_schedule(plant: Plant, c_target: float, warmup: float, floor: float) -> tuple[float, float]:
    """A cubic GMP ramp to ``c_target`` (first cut at the loop's first possible cut, ``GMP_RAMP`` of progress
    long), realised on the plant's grid; ``(true final relative damage, saving)`` noise-free."""
    T, D = plant.total_steps, plant.interval
    start = first_cut_progress(plant, warmup) - D / T  # the ramp's first cut lands on the first allowed step
    end = start + GMP_RAMP
    c, cuts, compute_at = 1.0, [], []
    for t in plant.steps:
        p = t / T
        r = min(max((p - start) / (end - start), 0.0), 1.0)
        setpoint = c_target + (1 - c_target) * (1 - r) ** 3
        u = plant.snap(c, c - setpoint, max(floor, c_target)) if c - setpoint > 1e-12 else 0.0
        if u > 0:
            cuts.append((t, plant.jump(c, u)))
            c -= u
            compute_at.append((t, c))
    return math.expm1(plant.final_log_damage(cuts)), plant.saving(compute_at)


def gmp_oracle(plant: Plant, warmup: float, budget: float, floor: float = 0.1) -> dict[str, float]:
    """The best fixed GMP schedule in hindsight: over targets 0.1..0.9 (not below ``floor``), the largest
    saving whose true final damage is within ``budget``; ``{"saving", "target", "damage"}`` (0 / 1.0 / 0 if
    no target fits)."""
    best = {"saving": 0.0, "target": 1.0, "damage": 0.0}
    for c_target in GMP_TARGETS:
        if c_target < floor - 1e-9:
            continue
        damage, saving = gmp_schedule(plant, c_target, warmup, floor)
        if damage <= budget and saving > best["saving"]:
            best = {"saving": saving, "target": c_target, "damage": damage}
    return best


# ---------------------------------------------------------------------------------------------- harness controllers
class NaiveJumpController:
    """Cut ``u_max`` every interval past warm-up, each cut sized so that its own measured immediate jump stays
    within the budget; stops when even one quantum's jump exceeds it. Ignores the damage already done."""

    harness = True

    def __init__(self, target: float, budget: float, u_max: float = 0.1, warmup: float = 0.1) -> None:
        self.target, self.budget, self.u_max, self.warmup = target, budget, u_max, warmup
        self.max_jump: float | None = math.log1p(budget)
        self.reason, self.margin = "", 2.0

    def step(self, obs: Any) -> float:
        if obs.progress < self.warmup:
            self.reason = "warm-up"
            return 0.0
        u = min(self.u_max, max(0.0, obs.compute - self.target))
        self.reason = "" if u > 0 else "at the floor"
        return u


class KnownPlantController:
    """Knows the plant's true recovery ``a``, the true jumps of its cuts and a persistent fraction ``rho``
    (``None``: the plant's own): predicts the final damage exactly up to the per-cut jitter, and cuts as much
    as keeps ``prediction ≤ safety · budget``, each cut sized on its true jump (``max_jump`` None). With
    ``rho=0`` it is the "all damage recovers" controller; with the plant's own ``rho`` it shows the budget can
    be met on the plant and what a controller that knew the plant would save."""

    harness = True

    def __init__(self, plant: Plant, target: float, budget: float, rho: float | None = None, u_max: float = 0.1,
                 warmup: float = 0.1, safety: float = 1.0) -> None:
        self.plant, self.target, self.budget, self.u_max, self.warmup = plant, target, budget, u_max, warmup
        self.rho = plant.rho if rho is None else rho
        self.safety = safety
        self.cuts: list[tuple[int, float]] = []
        self.max_jump: float | None = None
        self.reason, self.margin = "", 0.0
        self._c = 1.0

    def _persist(self, t: float) -> float:
        return self.rho + (1 - self.rho) * self.plant.a ** ((self.plant.total_steps - t) / self.plant.interval)

    def step(self, obs: Any) -> float:
        if obs.compute < self._c - 1e-12:  # the last request was realised: record its true jump
            self.cuts.append((self._last_step, self.plant.jump(self._c, self._c - obs.compute)))
        self._c, self._last_step = obs.compute, obs.step
        pred = sum(s * self._persist(tj) for tj, s in self.cuts)
        room = self.safety * math.log1p(self.budget) - pred
        if obs.progress < self.warmup:
            self.reason = "warm-up"
            return 0.0
        if room <= 0:
            self.reason = "budget"
            return 0.0
        limit = room / self._persist(obs.step)  # the largest true immediate jump the budget still allows
        u = min(self.u_max, max(0.0, obs.compute - self.target))
        q = self.plant.quantum
        while u > 0 and self.plant.jump(obs.compute, self.plant.snap(obs.compute, u, self.target)) > limit:
            u = math.floor(u / q - 1e-9) * q  # sized on the TRUE jump: no measurement error
        u = max(u, 0.0)
        self.reason = "" if u > 0 else ("budget: one quantum costs too much" if obs.compute > self.target else
                                        "at the floor")
        return u
