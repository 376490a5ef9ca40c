"""The quality-budget pieces one at a time: the sensor (DamageSensor), the budget mode of the feedback
controllers, and trial sizing. The closed loop on hard random plants is in ``test_budget_sim.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctprune_lightning.controllers import Observation, build_controller
from ctprune_lightning.controllers.budget import slack_gain
from ctprune_lightning.controllers.lqr import lqr_gain
from ctprune_lightning.controllers.sizing import size_cut
from ctprune_lightning.jump_noise import PRIOR, JumpNoise
from ctprune_lightning.sensing import PERSISTENCE_PRIOR, DamageSensor, check_persistence_prior

T, EVERY = 1200, 20


def test_persistence_prior_is_completed_checked_and_spent_by() -> None:
    """Some keys complete with the defaults; a bad value or key names itself and what is allowed; with no reading of
    a cut's recovery the sensor's prediction of a new cut's persistent share is the prior's mean, its σ the prior's."""
    assert check_persistence_prior(None) == PERSISTENCE_PRIOR
    assert check_persistence_prior({"mean": 0.2}) == {**PERSISTENCE_PRIOR, "mean": 0.2}
    for bad, message in ((0.5, "must be a mapping with keys mean, std, spread, got 0.5"),
                         ({"sd": 0.1}, r"unknown key\(s\) \['sd'\]; allowed: mean, std, spread"),
                         ({"spread": -0.1}, "persistence_prior.spread must be a number > 0, got -0.1"),
                         ({"mean": float("nan")}, "persistence_prior.mean must be a finite number, got nan"),
                         ({"std": True}, "persistence_prior.std must be a number > 0, got True")):
        with pytest.raises(ValueError, match=message):
            check_persistence_prior(bad)
    sensor = DamageSensor(T, EVERY, rho_mean=0.2, rho_mean_std=0.3, rho_spread=0.4)
    first = sensor.estimate(0)
    assert first["next_factor"] == pytest.approx(0.2) and first["next_factor_std"] == pytest.approx(0.3)


def dense_log_loss(t: float) -> float:
    return math.log(0.3 + 2.0 / (1.0 + t / 100.0))


def feed(sensor: DamageSensor, cuts: list[tuple[int, float]], rho: float, a: float, noise: float, seed: int = 0,
         until: int = T) -> None:
    rng = np.random.default_rng(seed)
    for t in range(EVERY, until + 1, EVERY):
        effect = sum(s * (rho + (1 - rho) * a ** ((t - tj) / EVERY)) for tj, s in cuts if t > tj)
        sensor.observe(t, math.exp(dense_log_loss(t) + effect + noise * rng.standard_normal()),
                       math.exp(dense_log_loss(t) + 0.1 + effect + noise / 4 * rng.standard_normal()))
        for tj, s in cuts:
            if tj == t:
                sensor.add_cut(t, s, s)


def test_sensor_reads_zero_without_cuts_and_tracks_the_reference() -> None:
    sensor = DamageSensor(total_steps=T, interval=EVERY)
    feed(sensor, [], 1.0, 0.9, noise=0.0, until=400)
    r = sensor.estimate(400)
    assert r["damage"] == r["final"] == 0.0 and r["final_std"] == 0.0
    assert r["reference"] == pytest.approx(math.exp(dense_log_loss(400)), rel=0.05)  # a 4-term basis: approximate


@pytest.mark.parametrize("rho, a", [(0.1, 0.8), (1.0, 0.9), (0.5, 0.95)])
def test_sensor_band_covers_the_true_final_damage(rho: float, a: float) -> None:
    cuts = [(200, 0.08), (400, 0.05)]
    true_final = sum(s * (rho + (1 - rho) * a ** ((T - tj) / EVERY)) for tj, s in cuts)
    early, late = DamageSensor(T, EVERY), DamageSensor(T, EVERY)
    feed(early, cuts, rho, a, noise=0.01, until=440)
    feed(late, cuts, rho, a, noise=0.01, until=T)
    r_early, r_late = early.estimate(440), late.estimate(T)
    assert abs(r_late["final"] - true_final) <= 2 * r_late["final_std"] + 0.005
    assert r_early["final_std"] > 0.003  # not a confident guess from two cuts' first readings


def test_sensor_state_round_trips_mid_run() -> None:
    sensor = DamageSensor(T, EVERY)
    feed(sensor, [(200, 0.05)], 0.5, 0.9, noise=0.01, until=600)
    clone = DamageSensor(total_steps=1, interval=1)
    clone.load_state_dict(sensor.state_dict())
    assert clone.state_dict() == sensor.state_dict() and clone.estimate(600) == sensor.estimate(600)


def test_the_free_training_channel_is_read_between_probe_readings_and_narrows_the_band() -> None:
    """An interval the probe does not read (the sensing budget) still gives the sensor its training channel
    (``observe(step, None, train_loss)``). A 10% cut read by the probe only every 10th interval after it: with the
    training channel in between, the band of a cut that heals (ρ = 0) narrows about threefold and the band of one that
    stays (ρ = 1) covers the truth, which the probe's readings alone miss. Fails if the training-only readings are
    dropped or their channel is not fitted."""

    def run(rho: float, free: bool) -> tuple[dict, DamageSensor]:
        rng = np.random.default_rng(0)
        sensor, cut, jump = DamageSensor(T, EVERY), 200, 0.1
        for t in range(EVERY, 801, EVERY):
            effect = jump * (rho + (1 - rho) * 0.7 ** ((t - cut) / EVERY)) if t > cut else 0.0
            probe = math.exp(dense_log_loss(t) + effect + 0.02 * rng.standard_normal())
            train = math.exp(dense_log_loss(t) + 0.1 + effect + 0.005 * rng.standard_normal())
            sensor.observe(t, probe if t <= cut or t % 200 == 0 else None, train if free or t <= cut or t % 200 == 0
                           else None)
            if t == cut:
                sensor.add_cut(t, jump, jump)
        return sensor.estimate(800), sensor

    for rho in (0.0, 1.0):
        (free, sensor), (probe_only, sparse) = run(rho, True), run(rho, False)
        assert len(sensor.readings) == 40 and len(sparse.readings) == 13  # a reading of neither channel is none
        true_final = 0.1 * (rho + (1 - rho) * 0.7 ** ((T - 200) / EVERY))
        assert abs(free["final"] - true_final) <= 2 * free["final_std"], (rho, free)
        if rho == 0.0:
            assert free["final_std"] < probe_only["final_std"] / 2.5  # 0.011 against 0.034
        else:
            assert abs(probe_only["final"] - true_final) > 2 * probe_only["final_std"]  # the probe alone misses it
    sensor.observe(820, None, None)
    sensor.observe(840, float("nan"), -1.0)
    assert len(sensor.readings) == 40
    clone = DamageSensor(total_steps=1, interval=1)
    clone.load_state_dict(sensor.state_dict())
    assert clone.readings == sensor.readings and clone.estimate(800) == sensor.estimate(800)
    old = sensor.state_dict()  # a checkpoint from before the span: four fields a reading, one interval each
    old["readings"] = [r[:4] for r in old["readings"]]
    clone.load_state_dict(old)
    assert [r[4] for r in clone.readings] == [EVERY] * 40


def test_a_training_mean_over_several_intervals_is_read_at_its_middle() -> None:
    """The training channel's reading is the mean over the steps since the last one (``span``); the fit places it at
    their middle. A mean over steps 61-120 read at step 120 lies mostly before a cut at step 100 (middle 90): the
    cut's column is 0 in its row. Stamped half an interval back (110), as before the span, it would carry the cut."""
    sensor = DamageSensor(T, EVERY)
    for t in (20, 40, 60):
        sensor.observe(t, 2.0, 2.1)
    sensor.observe(120, 1.9, 2.0, span=60)
    sensor.add_cut(100, 0.05, 0.05)
    X, _, channel = sensor._design(0.9)
    train_rows = X[channel == 1]
    assert train_rows[-1, 0] == 0.0 and train_rows[:, 0].tolist() == [0.0] * 4
    probe_rows = X[channel == 0]
    assert probe_rows[-1, 0] != 0.0  # the probe reads at step 120, after the cut: its persistent part counts
    sensor.readings[-1] = sensor.readings[-1][:4] + (EVERY,)
    assert sensor._design(0.9)[0][channel == 1][-1, 0] != 0.0


def test_slack_gain_is_the_dare_gain_of_the_slack_integrator() -> None:
    for q, r in ((1.0, 0.25), (1.0, 4.0), (3.0, 0.1)):
        K = lqr_gain(np.eye(1), -np.eye(1), q * np.eye(1), r * np.eye(1))
        assert slack_gain(q, r) == pytest.approx(-K[0, 0], rel=1e-9)


def obs(progress: float, compute: float = 1.0, final: float = 0.0, std: float = 0.0, factor: float = 0.5,
        factor_std: float = 0.1, last: float = 0.0) -> Observation:
    return Observation(step=int(progress * T), progress=progress, compute=compute, damage=final, final_damage=final,
                       final_std=std, next_factor=factor, next_factor_std=factor_std, last_action=last)


@pytest.mark.parametrize("name", ["lqr", "pid"])
def test_budget_mode_holds_with_a_reason_and_sizes_the_allowed_jump(name: str) -> None:
    ctl = build_controller(name, 0.1, budget=0.01, warmup=0.1)
    assert ctl.step(obs(0.05)) == 0 and ctl.reason.startswith("warm-up")
    u = ctl.step(obs(0.12))
    assert u == pytest.approx(5.0 * 0.02) and ctl.reason == ""  # the rate cap: max_rate × progress since warm-up
    v = ctl.spend(1.0) if name == "lqr" else None  # lqr: the DARE share of the slack, over f + 2σ_f
    if v is not None:
        assert ctl.max_jump == pytest.approx(v * 0.01 / (0.5 + 2 * 0.1))
    assert not ctl.spent
    assert ctl.step(obs(0.2, final=0.008, std=0.002)) == 0 and ctl.reason.startswith("budget spent") and ctl.spent
    assert ctl.step(obs(0.3, compute=0.1)) == 0 and ctl.reason == "at the compute floor" and not ctl.spent
    assert ctl.step(obs(0.4, final=-0.05)) > 0  # a predicted improvement is not banked...
    assert ctl.max_jump <= 0.01 / 0.7 + 1e-12  # ...beyond one budget of slack
    assert ctl.step(obs(0.5, final=-0.004, std=0.005)) > 0  # the chance constraint reads D + 2σ = 0.006 < 0.01
    growing = build_controller(name, 0.1, budget=0.01, warmup=0.1, grow=True)  # it watches for a growth: not spent
    assert growing.step(obs(0.2, final=0.008, std=0.002)) == 0 and not growing.spent


def test_budget_mode_counts_realised_cuts_and_round_trips_through_state_dict() -> None:
    ctl = build_controller("lqr", 0.1, budget=0.02, margin=1.5, warmup=0.0, max_rate=3.0, slack_q=2.0, slack_r=0.5)
    for p, last in ((0.1, 0.0), (0.2, 0.05), (0.3, 0.0), (0.4, 0.02)):
        ctl.step(obs(p, last=last))
    assert ctl.cuts == 2
    clone = build_controller("lqr", 0.1, budget=0.02, margin=1.5, warmup=0.0, max_rate=3.0, slack_q=2.0, slack_r=0.5)
    clone.load_state_dict(ctl.state_dict())
    assert clone.state_dict() == ctl.state_dict()
    assert clone.step(obs(0.5)) == ctl.step(obs(0.5)) and clone.max_jump == ctl.max_jump


def test_budget_mode_rejects_bad_settings_and_controllers_without_one() -> None:
    with pytest.raises(ValueError, match="quality_budget"):
        build_controller("lqr", 0.1, budget=0.0)
    with pytest.raises(ValueError, match="warmup"):
        build_controller("pid", 0.1, budget=0.01, warmup=1.0)
    with pytest.raises(ValueError, match="needs controller 'lqr' or 'pid'.*'gmp'"):
        build_controller("gmp", 0.5).set_budget(0.01)


def test_size_cut_finds_the_largest_cut_that_fits() -> None:
    calls: list[float] = []

    def trial(u: float) -> float:
        calls.append(u)
        return 0.02 * u + 0.3 * u * u  # convex: cuts cost more as the net nears its capacity

    u = size_cut(trial, 0.5, max_jump=0.01, quantum=0.005)
    assert len(calls) <= 8 and trial(u) <= 0.01 < trial(u + 0.02)
    assert size_cut(trial, 0.5, max_jump=None) == 0.5 and size_cut(trial, 0.5, max_jump=0.0) == 0.0
    assert size_cut(lambda v: 1e-4 * v, 0.3, max_jump=0.01) == 0.3  # the whole request fits: one trial


def test_the_jump_noise_law_is_fitted_on_the_reads_and_widens_final_std() -> None:
    """error² = κ² u² + η² J²: fitted from one-dof reads of a known law it lands near it (a fit that ignored the
    jump term, or the size, misses one of the two); each cut adds its law error² to final_std, and a cut's
    predicted jump is its probe jump plus that error (the trial's selection read it low)."""
    assert JumpNoise().coefficients == pytest.approx(PRIOR)  # nothing read: the prior
    rng = np.random.default_rng(0)
    noise = JumpNoise()
    for _ in range(400):
        u = rng.uniform(0.02, 0.8)
        j = 3.0 * max(u - 0.3, 0.0) ** 2  # small jumps, then a cliff
        noise.add(u, j, math.hypot(0.01 * u, 0.06 * j) * abs(rng.standard_normal()))
    noise.add(0.1, 0.01, None)  # one batch: no spread, ignored
    kappa, eta = noise.coefficients
    assert len(noise.reads) == 400 and kappa == pytest.approx(0.01, rel=0.2) and eta == pytest.approx(0.06, rel=0.2)
    restored = JumpNoise()
    restored.load_state_dict(noise.state_dict())
    assert restored.coefficients == pytest.approx(noise.coefficients)

    def final(reads: list[tuple[float, float, float]]) -> dict:
        s = DamageSensor(T, EVERY)
        for k in range(1, 11):
            s.observe(k * EVERY, 2.0 * k ** -0.3)
        for u, j, e in reads:
            s.add_jump_read(u, j, e)
        s.add_cut(10 * EVERY, 0.0, 0.0, size=0.2)
        clone = DamageSensor(1, 1)
        clone.load_state_dict(s.state_dict())
        assert clone.estimate(10 * EVERY + 5) == s.estimate(10 * EVERY + 5)
        return s.estimate(10 * EVERY + 5)

    quiet, loud = final([(0.2, 0.0, 0.001)] * 5), final([(0.2, 0.0, 0.02)] * 5)
    assert loud["final_std"] > 3 * quiet["final_std"] > 0 and loud["final"] > quiet["final"] > 0


def test_the_controller_states_the_allowance_and_the_trial_keeps_the_margin() -> None:
    ctl = build_controller("lqr", 0.1, budget=0.01, warmup=0.0)
    quiet = dict(step=100, progress=0.1, compute=1.0, damage=0.0, final_damage=0.0, next_factor=0.5)
    ctl.step(Observation(**quiet))
    allowance = ctl.max_jump
    ctl = build_controller("lqr", 0.1, budget=0.01, warmup=0.0)
    ctl.step(Observation(**quiet, jump_noise=0.05))
    assert allowance > 0 and ctl.max_jump == pytest.approx(allowance)
