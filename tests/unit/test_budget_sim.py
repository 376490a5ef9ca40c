"""The quality-budget loop (DamageSensor + budget controller + size_cut) on random simulated plants.

The plants (:mod:`tests.sim.plant`) are as hard as the real runs: LR-area learning curves with an annealing
drop, a capacity cliff, slow partial recovery toward a persistent fraction up to 1.2, correlated probe noise
of 0.5–5 %, jump measurements off by up to 1 % absolute, planner quantisation, readings that cost what they cost
on the real runs (2–7 % of an interval's training each) under the product's 3 % sensing budget. Each plant is
replayed through the real loop's sequence (whether the interval is read → observe → estimate → controller → the
payback rule → size_cut → the check of the sized cut on unselected batches → cut → add_cut) and judged on the TRUE
final damage, against the best fixed GMP schedule in hindsight (which reads nothing).

``CTPRUNE_SIM_PLANTS`` sets the number of plants (default 200: the criteria below are stated for it).
The closed-loop tests are marked slow (15–50 s per controller and setting on 2 cores); ``.ci/run`` runs the lqr
ones.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from typing import Any

import numpy as np
import pytest

from tests.sim.plant import (
    SENSE_BUDGET,
    STALL_RUN,
    KnownPlantController,
    NaiveJumpController,
    NullSensor,
    Plant,
    RunResult,
    gmp_oracle,
    reference_size_cut,
    run_loop,
    run_plants,
)

N_PLANTS = int(os.environ.get("CTPRUNE_SIM_PLANTS", "200"))
BUDGET, FLOOR = 0.01, 0.1
COVERAGE_MIN = 0.95  # the 2σ band at the end (every cut's jump in) covers the true final damage
WITHIN_MIN = 0.95  # the true final damage is within the budget
RATIO_MIN = 0.9  # the median plant saves at least this much of the hindsight-best GMP's saving
CHATTER_MAX = 7  # a run of 7 strictly alternating decisions (cut, hold, cut, hold, cut, hold, cut) chatters


def _ratio(saving: float, oracle: float) -> float:
    """Saving over the oracle's; where no GMP target fits the budget, any saving beats it."""
    if oracle > 0:
        return saving / oracle
    return math.inf if saving > 1e-9 else 1.0


@functools.lru_cache(maxsize=None)
def closed_loop(controller: str, n: int = N_PLANTS) -> tuple[list[RunResult], list[dict[str, float]]]:
    """The closed loop and the oracle on plants ``0 .. n-1`` (cached: every test reads the same runs)."""
    runs = run_plants(controller, list(range(n)), budget=BUDGET, target=FLOOR)
    return [r for r, _ in runs], [o for _, o in runs]


def summary(results: list[RunResult], oracles: list[dict[str, float]]) -> dict[str, Any]:
    """The numbers the criteria read, and what the failing plants have in common."""
    n = len(results)
    ratios = np.array([_ratio(r.saving, o["saving"]) for r, o in zip(results, oracles)])
    over = [r for r in results if r.final_true > BUDGET]
    uncovered = [r for r in results if not r.covered]
    z = np.array([r.z for r in results if r.pred_final_std > 0])
    holds = Counter(row["held_by"] if row["held_by"] != "controller" else row["reason"].split(":")[0][:40]
                    for r in results for row in r.trace if row["u"] <= 0 and row["progress"] >= r.warmup)
    return {
        "plants": n,
        "coverage": sum(r.covered for r in results) / n,
        "within_budget": 1 - len(over) / n,
        "median_ratio": float(np.median(ratios)),
        "ratio_q25": float(np.quantile(ratios, 0.25)),
        "stalls": sum(r.stalls for r in results),
        "plants_with_stalls": sum(r.stalls > 0 for r in results),
        "chattering_plants": sum(r.chatter >= CHATTER_MAX for r in results),
        "mean_saving": float(np.mean([r.saving for r in results])),
        "mean_oracle_saving": float(np.mean([o["saving"] for o in oracles])),
        "over_budget_true_final_median": float(np.median([r.final_true for r in over])) if over else 0.0,
        "over_budget_first_cut_share": float(np.median([r.cuts[0]["jump"] / max(r.final_true_log, 1e-12)
                                                        for r in over if r.cuts])) if over else 0.0,
        "uncovered_z_median": float(np.median([r.z for r in uncovered])) if uncovered else 0.0,
        "uncovered_underpredicted": sum(r.z > 0 for r in uncovered),
        "z_abs_median": float(np.median(np.abs(z))) if len(z) else 0.0,  # ≈ 0.67 for a calibrated σ
        "no_cut_plants": sum(not r.cuts for r in results),
        # measured / true immediate jump, summed over a run's cuts: < 1 when size_cut keeps the cuts whose
        # trial happened to read low (a winner's curse on the probe batches' error)
        "measured_over_true_jump_median": float(np.median([sum(c["measured"] for c in r.cuts)
                                                           / sum(c["jump"] for c in r.cuts)
                                                           for r in results if r.cuts])) if any(
            r.cuts for r in results) else 1.0,
        "cuts_per_plant_median": float(np.median([len(r.cuts) for r in results])),
        "hold_reasons": dict(holds.most_common(6)),
    }


def _report(s: dict[str, Any]) -> str:
    return "; ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())


# ---------------------------------------------------------------------------------------------- the loop
# The closed loop on 200 plants takes 15–50 s per controller on 2 cores: marked slow, and .ci/run runs the
# lqr ones (`-m slow tests/unit/test_budget_sim.py -k "lqr or measured_levels"`).
LQR = pytest.param("lqr", marks=pytest.mark.slow)
# The targets, not met yet: kept as strict expected failures (an XPASS fails the suite, so a fix must
# promote them) next to a guard of the levels measured today (test_measured_levels_hold).
MEASURED = ("lqr on 200 plants (2026-12-07, eighth session; persistence prior N(0.5, 0.45²) + N(0, 0.25²), sized "
            "cuts checked on 6 unselected batches, scaled down to that read when over; readings priced under the 3% "
            "sensing budget, the training channel read on every interval, a sizing that fits nothing backs off; "
            "the plants' cliffs of power 1.5-4): 2σ coverage 100%, within budget 100%, median saving 0.35 of the "
            "hindsight GMP (0.36 with every cliff of power 2), 87% of the intervals unread, 27 plants make no cut "
            "(no first cut repays its sizing); with every interval read for free (sense_budget=None): coverage "
            "100%, within 98.5%, median 0.51")
TARGET = [pytest.param("lqr", marks=[pytest.mark.slow, pytest.mark.xfail(strict=True, reason=MEASURED)]),
          pytest.param("pid", marks=[pytest.mark.slow, pytest.mark.xfail(strict=False, reason=MEASURED)])]
MET = [LQR, pytest.param("pid", marks=[pytest.mark.slow, pytest.mark.xfail(strict=False, reason=MEASURED)])]


@pytest.mark.parametrize("controller", MET)
def test_sensor_band_covers_true_final_damage(controller: str) -> None:
    results, oracles = closed_loop(controller)
    s = summary(results, oracles)
    print(f"\n[{controller}] {_report(s)}")
    assert s["coverage"] >= COVERAGE_MIN, f"2σ band covers {s['coverage']:.1%} < {COVERAGE_MIN:.0%}: {_report(s)}"


@pytest.mark.parametrize("controller", MET)
def test_true_final_damage_within_budget(controller: str) -> None:
    results, oracles = closed_loop(controller)
    s = summary(results, oracles)
    worst = sorted(results, key=lambda r: -r.final_true)[:5]
    detail = [(r.plant_seed, round(r.final_true, 4), round(r.pred_final, 4), round(r.pred_final_std, 4),
               len(r.cuts)) for r in worst]
    assert s["within_budget"] >= WITHIN_MIN, (
        f"within budget on {s['within_budget']:.1%} < {WITHIN_MIN:.0%}; worst (seed, true, pred, std, cuts) "
        f"{detail}: {_report(s)}")


@pytest.mark.parametrize("controller", TARGET)
def test_median_saving_near_hindsight_gmp(controller: str) -> None:
    results, oracles = closed_loop(controller)
    s = summary(results, oracles)
    assert s["median_ratio"] >= RATIO_MIN, (
        f"median saving {s['median_ratio']:.2f} of the best GMP in hindsight < {RATIO_MIN}: {_report(s)}")


@pytest.mark.parametrize("controller", MET)
def test_no_stalls(controller: str) -> None:
    """No run of STALL_RUN read intervals past warm-up holding while > half the budget is left by the sensor's own
    reading, compute is a quantum above the floor and a quantum cut would truly cost < half the budget. Intervals
    left unread (sensing budget, backoff, idle) are holds with their reason, not stalls: lqr has none with the
    readings priced (1 plant with every interval read for free, sense_budget=None)."""
    results, oracles = closed_loop(controller)
    stalled = [(r.plant_seed, [round(p, 2) for p in r.stall_intervals],
                Counter(f"{row['held_by']}: {row['reason'][:50]}" for row in r.trace
                        if row["u"] <= 0 and row["slack"] > 0.5 and row["progress"] >= r.warmup).most_common(2))
               for r in results if r.stalls]
    assert not stalled, f"{len(stalled)} plants stall (>= {STALL_RUN} intervals): {stalled[:5]}"


PID_CHATTERS = ("pid on 200 plants (2026-12-06): 1 plant alternates cut/hold 9 times with the sized cuts checked on "
                "unselected batches, 2 plants (8, 9) without")


@pytest.mark.parametrize("controller", [LQR, pytest.param("pid", marks=[pytest.mark.slow, pytest.mark.xfail(
    strict=False, reason=PID_CHATTERS)])])
def test_no_chattering(controller: str) -> None:
    results, _ = closed_loop(controller)
    chat = [(r.plant_seed, r.chatter) for r in results if r.chatter >= CHATTER_MAX]
    assert not chat, f"{len(chat)} plants alternate cut/hold >= {CHATTER_MAX} times in a row: {chat[:10]}"


@pytest.mark.slow
def test_measured_levels_hold() -> None:
    """Regression guard: what the lqr loop achieves today on the same 200 plants must not get worse (MEASURED; the
    median share was 0.51 while the harness read every interval for free, at a median 11% of the training FLOPs).
    The readings keep to the sensing budget: at most it plus one decision's readings (a sizing may pass it)."""
    results, oracles = closed_loop("lqr")
    s = summary(results, oracles)
    assert s["coverage"] >= 0.95 and s["within_budget"] >= 0.95, _report(s)
    assert s["median_ratio"] >= 0.33 and s["plants_with_stalls"] <= 3 and s["chattering_plants"] == 0, _report(s)
    sensing = np.array([r.sensing for r in results])
    assert np.median(sensing) <= SENSE_BUDGET and sensing.max() <= 0.08, (np.median(sensing), sensing.max())


@pytest.mark.slow
def test_lqr_keeps_the_budget_when_the_probe_misses_a_cuts_damage_by_checking_it_on_unselected_batches() -> None:
    """On 10% of the control steps the probe's 2 batches read only 0–40% of a cut's damage, with their usual small
    spread (the sparse per-sample damage measured on real runs: ``experiments/results/suite/not_kept_2026-12-06.md``).
    The loop reads each sized cut on 6 more held-out batches before making it: the budget holds on ≥ 95% of plants.
    Without that check the trial takes the largest cut the missing batches read as free, and it does not (measured
    2026-12-06: 97.5% within with it, 77% without; 2026-12-07, a refused cut scaled down to the check's read and
    made if it fits there: 97.5%, coverage 97.5%, median 0.53 of the hindsight GMP). With every interval read
    (``sense_budget=None``) the loop makes the most decisions, each one more chance of a missed cut: the pair is
    compared there (2026-12-07: 97.5% with the check, 77% without); under the default 3% sensing budget the check
    keeps 100% (coverage 98%; without it 90%)."""
    def run(**kwargs: Any) -> dict[str, Any]:
        return summary(*zip(*run_plants("lqr", list(range(N_PLANTS)), budget=BUDGET, target=FLOOR, miss=0.1,
                                        **kwargs)))

    for checked in (run(), run(sense_budget=None)):
        assert checked["within_budget"] >= WITHIN_MIN and checked["coverage"] >= COVERAGE_MIN, _report(checked)
    blind = run(sense_budget=None, confirm_batches=0)
    assert blind["within_budget"] < 0.9, _report(blind)


# ---------------------------------------------------------------------------------------------- the harness itself
def _harness_run(make: Any, n: int = N_PLANTS) -> tuple[float, float]:
    """(within-budget fraction, median saving ratio) of a harness controller (no sensor, reference sizing)."""
    within, ratios = [], []
    for seed in range(n):
        plant = Plant.random(seed)
        ctl = make(plant)
        res = run_loop(plant, ctl, budget=BUDGET, target=FLOOR, seed=seed, sensor=NullSensor(),
                       sizer=reference_size_cut)
        within.append(res.final_true <= BUDGET)
        ratios.append(_ratio(res.saving, gmp_oracle(plant, ctl.warmup, BUDGET, floor=FLOOR)["saving"]))
    return float(np.mean(within)), float(np.median(ratios))


def test_harness_is_hard() -> None:
    """The plants are not friendly: cutting while each cut's own measured jump fits the budget, or trusting
    that all damage recovers (ρ = 0, even knowing the true recovery rate and the true jumps), busts the budget."""
    naive, _ = _harness_run(lambda p: NaiveJumpController(FLOOR, BUDGET))
    rho0, _ = _harness_run(lambda p: KnownPlantController(p, FLOOR, BUDGET, rho=0.0))
    assert naive < 0.5, f"a per-cut-jump controller is within budget on {naive:.0%} of plants: the plants are soft"
    assert rho0 < 0.5, f"a ρ=0 controller is within budget on {rho0:.0%} of plants: recovery is too complete"


def test_harness_criteria_are_attainable() -> None:
    """With the plant known (true a, mean ρ and jumps; only the per-cut ρ jitter unknown), aiming at 85 % of
    the budget meets both the within-budget and the saving criterion: they do not contradict each other."""
    within, ratio = _harness_run(lambda p: KnownPlantController(p, FLOOR, BUDGET, safety=0.85))
    assert within >= WITHIN_MIN and ratio >= RATIO_MIN, f"known plant: within {within:.1%}, median ratio {ratio:.2f}"


def test_saving_target_needs_each_plants_own_persistence() -> None:
    """No controller that spends by one persistent share for every plant meets both the within-budget and the
    saving criterion, even knowing each plant's recovery rate and its cuts' true jumps: the saving target asks for
    each plant's ρ learned from its readings (which the probe's noise hides on most plants: the loop's gap).
    Measured: ρ = 0.95 → within 90%, median ratio 0.90; 1.0 → 92%, 0.87; 1.1 → 96%, 0.84."""
    for rho in (0.95, 1.0, 1.1):
        within, ratio = _harness_run(lambda p, r=rho: KnownPlantController(p, FLOOR, BUDGET, rho=r))
        assert not (within >= WITHIN_MIN and ratio >= RATIO_MIN), f"one ρ = {rho} meets both: {within:.1%}, {ratio:.2f}"
    assert within >= WITHIN_MIN and ratio >= 0.8, (within, ratio)  # the pessimistic share keeps the budget


def test_plants_cover_the_measured_ranges() -> None:
    plants = [Plant.random(seed) for seed in range(200)]
    T = np.array([p.total_steps for p in plants])
    assert T.min() >= 250 and T.max() <= 3000 and (T < 500).any() and (T > 2000).any()
    rho = np.array([p.rho for p in plants])
    assert rho.min() >= 0 and rho.max() <= 1.2 and (rho > 1.0).any() and (rho < 0.2).any()
    assert all(0.9 <= p.a <= 0.995 and 0.05 <= p.c_min <= 0.3 and 0.005 <= p.quantum <= 0.03 for p in plants)
    # the first half of the compute costs 8-66x the first tenth on the suite's tasks (their trial-jump ladders)
    half_over_tenth = np.array([sum(p.jump(1 - 0.01 * i, 0.01) for i in range(50))
                                / sum(p.jump(1 - 0.01 * i, 0.01) for i in range(10)) for p in plants])
    assert half_over_tenth.min() < 10 and half_over_tenth.max() > 50, (half_over_tenth.min(), half_over_tenth.max())
    share = np.array([p.read_share for p in plants])  # a reading: the suite's 3.3% (MLP, LRU) to 6.7% (GPT, ResNet)
    assert share.min() >= 0.02 and share.max() <= 0.07 and (share < 0.033).any() and (share > 0.067).any()
    # some plants' first cut (0.05 at the first allowed step) reads near zero or negative on the probe batches
    first = []
    for p in plants:
        rng = np.random.default_rng([p.seed, 1])
        first.append(p.jump(1.0, 0.05) + p.jump_error(0.05, p.jump(1.0, 0.05)) * rng.standard_normal())
    assert 0.05 <= np.mean(np.array(first) <= 0.001) <= 0.5


def test_run_is_deterministic() -> None:
    plant = Plant.random(3)
    runs = [run_loop(plant, KnownPlantController(plant, FLOOR, BUDGET), sensor=NullSensor(),
                     sizer=reference_size_cut, seed=5) for _ in range(2)]
    assert runs[0].cuts == runs[1].cuts and runs[0].final_true == runs[1].final_true
    assert gmp_oracle(plant, 0.1, BUDGET) == gmp_oracle(Plant.random(3), 0.1, BUDGET)


@pytest.mark.parametrize("seed", [7, 20])  # plant 20 resumes inside a backoff's gap
def test_resume_mid_run_changes_nothing(seed: int) -> None:
    """Sensor, controller and read schedule rebuilt from their state_dict half-way (a checkpoint resume): same
    run."""
    plant = Plant.random(seed)
    whole = run_loop(plant, "lqr", budget=BUDGET, target=FLOOR, seed=seed)
    resumed = run_loop(plant, "lqr", budget=BUDGET, target=FLOOR, seed=seed, resume_at=len(plant.steps) // 2)
    assert whole.cuts and resumed.cuts == whole.cuts
    assert [row["reason"] for row in resumed.trace] == [row["reason"] for row in whole.trace]
    assert resumed.pred_final == pytest.approx(whole.pred_final, rel=1e-9, abs=1e-12)
