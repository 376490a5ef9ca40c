"""The quality-budget loop on a simulated plant: sensor (DamageEstimator) + budget controllers.

The plant: the dense probe loss follows a learning curve; a cut of ``u`` (fraction of dense compute)
at compute ``c`` raises the log-loss at once by ``s = β u / (c − c_min)`` (cuts cost more as the net
nears its capacity ``c_min``), and that damage recovers at rate ``a`` per interval down to a
persistent fraction ``ρ``. The loop sees only noisy probe losses and the measured jumps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctprune_lightning.controllers import Observation
from ctprune_lightning.controllers.budget import BudgetLQRController, BudgetPIDController
from ctprune_lightning.sensing import DamageEstimator

INTERVALS, EVERY = 60, 20
T = INTERVALS * EVERY


def dense_loss(t: float) -> float:
    return 0.3 + 2.0 / (1.0 + t / 100.0)


class Plant:
    def __init__(self, beta: float, c_min: float, rho: float, a: float, noise: float, seed: int = 0) -> None:
        self.beta, self.c_min, self.rho, self.a, self.noise = beta, c_min, rho, a, noise
        self.rng = np.random.default_rng(seed)
        self.cuts: list[tuple[int, float]] = []

    def jump(self, c: float, u: float) -> float:
        return self.beta * u / max(c - u - self.c_min, 1e-3)

    def damage(self, t: float) -> float:
        return sum(s * (self.rho + (1 - self.rho) * self.a ** ((t - tj) / EVERY)) for tj, s in self.cuts if t > tj)

    def probe(self, t: float) -> float:
        return dense_loss(t) * math.exp(self.damage(t) + self.noise * self.rng.standard_normal())


def run(ctl, plant: Plant, floor: float, u_applied=None):
    """Closed loop; returns the final compute, the true final damage, the trace and the estimator."""
    est = DamageEstimator(total_steps=T, interval=EVERY)
    c, last_u, jump, trace = 1.0, 0.0, None, []
    for k in range(1, INTERVALS + 1):
        t = k * EVERY
        est.observe(t, plant.probe(t))
        r = est.estimate(t)
        obs = Observation(step=t, progress=t / T, compute=c, damage=r["damage"], jump=jump, last_action=last_u,
                          final_damage=r["final"], final_std=r["final_std"], damage_std=r["damage_std"],
                          reference=r["reference"], rho=r["rho"])
        u = ctl.step(obs)
        assert 0.0 <= u <= max(0.0, c - floor) + 1e-12  # never below the floor
        jump, last_u = None, 0.0
        if u > 0:
            s = plant.jump(c, u)
            plant.cuts.append((t, s))
            est.add_cut(t, s + plant.noise * plant.rng.standard_normal() * 0.1)
            jump, last_u, c = s, u, c - u
        trace.append((t, c, r, u, ctl.reason))
    return c, plant.damage(T), trace, est


def oracle_final_compute(plant_args: dict, floor: float, budget: float, u_max: float = 0.1) -> float:
    """The lowest final compute a controller that knows the plant reaches within the budget, cutting
    at the same rate limit (u_max per interval) from the first interval."""
    best = 1.0
    for c_end in np.arange(1.0, floor - 1e-9, -0.005):
        p = Plant(**plant_args, noise=0.0)
        c, k = 1.0, 1
        while c - c_end > 1e-9 and k <= INTERVALS:
            u = min(u_max, c - c_end)
            p.cuts.append((k * EVERY, p.jump(c, u)))
            c, k = c - u, k + 1
        if p.damage(T) <= budget:
            best = c_end
    return float(best)


PLANTS = {  # different slack: the same loop must find different compute levels
    "roomy": dict(beta=0.002, c_min=0.05, rho=0.2, a=0.7),
    "tight": dict(beta=0.004, c_min=0.25, rho=0.5, a=0.8),
}


# Share of the oracle's compute removal reached (measured, seeds 0-2, warm-up 0.1: roomy lqr 0.93-1.0, pid 1.0;
# tight: lqr 0.72-0.84, pid 0.90-0.97; true final damage 0.003-0.008 for a 0.01 budget). On the tight plant
# single cuts' transients are below the probe noise, so the sensor cannot see that half of each cut's damage
# recovers (ρ stays near its conservative prior 1) and the loop spends its budget on damage that would have
# healed; PI's integral keeps cutting the small slack left, LQR's proportional gain stops short of it.
ORACLE_SHARE = {("roomy", "lqr"): 0.9, ("roomy", "pid"): 0.95, ("tight", "lqr"): 0.7, ("tight", "pid"): 0.88}


@pytest.mark.parametrize("name", sorted(PLANTS))
@pytest.mark.parametrize("cls", [BudgetLQRController, BudgetPIDController], ids=["lqr", "pid"])
def test_the_loop_ends_within_budget_and_removes_most_of_what_an_oracle_would(name: str, cls) -> None:
    budget, floor = 0.01, 0.1
    oracle = oracle_final_compute(PLANTS[name], floor, budget)
    for seed in range(3):
        plant = Plant(**PLANTS[name], noise=0.002, seed=seed)
        ctl = cls(target=floor, budget=budget)
        c, final, trace, _ = run(ctl, plant, floor)
        assert final <= budget, (name, seed, final)  # within the budget, measured on the true plant
        assert (1 - c) >= ORACLE_SHARE[name, ctl.name] * (1 - oracle), (name, seed, c, oracle)
        assert ctl.cuts <= 30  # no chattering: a bounded number of cuts in 60 intervals
        assert c >= floor - 1e-9


def test_the_same_config_finds_different_compute_levels_per_plant() -> None:
    finals = {}
    for name, args in PLANTS.items():
        c, _, _, _ = run(BudgetLQRController(target=0.1, budget=0.01), Plant(**args, noise=0.002), 0.1)
        finals[name] = c
    assert finals["roomy"] < finals["tight"] - 0.15, finals


def test_a_floor_that_would_break_the_budget_is_not_reached_and_the_reason_says_why() -> None:
    plant = Plant(**PLANTS["tight"], noise=0.002)
    ctl = BudgetLQRController(target=0.05, budget=0.01)
    c, final, trace, _ = run(ctl, plant, 0.05)
    assert c > 0.3 and final <= 0.01  # an open-loop ramp to 0.05 would blow the budget:
    p = Plant(**PLANTS["tight"], noise=0.0)
    cc = 1.0
    for k in range(1, 11):
        u = min(0.1, cc - 0.05)
        p.cuts.append((k * EVERY, p.jump(cc, u)))
        cc -= u
    assert p.damage(T) > 0.05
    assert any(r.startswith("budget:") for *_, r in trace[-10:])


def test_sensor_noise_between_cuts_is_below_a_fifth_of_the_budget() -> None:
    plant = Plant(**PLANTS["roomy"], noise=0.002)
    _, _, trace, _ = run(BudgetLQRController(target=0.1, budget=0.01), plant, 0.1)
    quiet = [r["final"] for (t, c, r, u, _), prev in zip(trace[1:], trace[:-1]) if u == 0 and prev[3] == 0]
    assert len(quiet) >= 10
    assert float(np.std(np.diff(quiet))) <= 0.01 / 5


def test_estimator_reads_zero_without_cuts_and_identifies_isolated_cuts() -> None:
    est = DamageEstimator(total_steps=T, interval=EVERY)
    for k in range(1, 20):
        est.observe(k * EVERY, dense_loss(k * EVERY))
    r = est.estimate(19 * EVERY)
    assert r["damage"] == r["final"] == 0.0 and r["reference"] == pytest.approx(dense_loss(19 * EVERY))
    # cuts 6 intervals apart: each transient is seen against the local trend, so ρ and a are identified
    plant = Plant(beta=0.0, c_min=0.0, rho=0.5, a=0.8, noise=0.0)
    plant.cuts = [(EVERY * (2 + 6 * i), 0.01) for i in range(8)]
    est = DamageEstimator(total_steps=T, interval=EVERY)
    for k in range(1, 60):
        t = k * EVERY
        est.observe(t, plant.probe(t))
        est.estimate(t)
        if any(tj == t for tj, _ in plant.cuts):
            est.add_cut(t, 0.01)
    r = est.estimate(59 * EVERY)
    assert r["recovery"] == pytest.approx(0.8) and r["rho"] == pytest.approx(0.5, abs=0.05)
    assert r["final"] == pytest.approx(plant.damage(T), abs=0.003)
    assert r["jumps"] == pytest.approx(0.08)


def test_budget_controllers_validate_and_round_trip_their_state() -> None:
    with pytest.raises(ValueError, match="quality_budget"):
        BudgetLQRController(target=0.1, budget=0.0)
    ctl = BudgetPIDController(target=0.1, budget=0.01)
    run(ctl, Plant(**PLANTS["roomy"], noise=0.002), 0.1)
    clone = BudgetPIDController(target=0.1, budget=0.01)
    clone.load_state_dict(ctl.state_dict())
    assert clone.state_dict() == ctl.state_dict()


def test_no_cut_during_the_warm_up_and_the_reason_says_so() -> None:
    ctl = BudgetLQRController(target=0.1, budget=0.01, warmup=0.2)
    _, final, trace, _ = run(ctl, Plant(**PLANTS["roomy"], noise=0.002), 0.1)
    early = [row for row in trace if row[0] / T < 0.2]
    assert len(early) == 11 and all(u == 0 and r.startswith("warm-up") for _, _, _, u, r in early)
    assert trace[len(early)][3] > 0 and final <= 0.01  # it cuts as soon as the warm-up ends
    with pytest.raises(ValueError, match="warmup"):
        BudgetLQRController(target=0.1, warmup=1.0)


def test_estimator_state_round_trips_mid_run() -> None:
    _, _, _, est = run(BudgetLQRController(target=0.1, budget=0.01), Plant(**PLANTS["tight"], noise=0.002), 0.1)
    clone = DamageEstimator(total_steps=1, interval=1)
    clone.load_state_dict(est.state_dict())
    assert clone.state_dict() == est.state_dict()
    assert clone.estimate(T) == est.estimate(T) and est.estimate(T)["final"] > 0
