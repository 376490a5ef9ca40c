"""Unit tests of ctprune_lightning.controllers on a simulated plant (numpy only; scipy as oracle)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from ctprune_lightning.controllers import (
    CONTROLLERS,
    GMPController,
    LinearController,
    LQRController,
    NoneController,
    Observation,
    PIDController,
    PlantEstimator,
    RecursiveLeastSquares,
    build_controller,
    linear_system,
    lqr_gain,
    solve_dare,
)

TARGET = 0.3
REPO = Path(__file__).resolve().parents[2]


def simulate(ctl, a=0.7, b=0.3, n=100, target=TARGET, noise=0.0, seed=0, inject=None, stuck=0):
    """Closed loop on ``d_{k+1} = a (d_k + b0 u_k)`` (so ``b = a b0``), jump ``= b0 u_k``.

    The action is applied *unclamped*, so a controller that asks to cut below its target is caught.
    ``inject`` maps interval -> measured damage override; during the first ``stuck`` intervals the
    actuator does nothing (compute stays put). Returns a list of (k, compute_after, damage, u).
    """
    rng = np.random.default_rng(seed)
    c, d, last, jump, b0, trace = 1.0, 0.0, 0.0, None, b / a, []
    for k in range(n):
        meas = d if inject is None or k not in inject else inject[k]
        u = ctl.step(Observation(k * 20, k / n, c, meas, jump, last))
        assert 0.0 <= u <= max(0.0, c - target) + 1e-12, (k, c, u)
        applied = 0.0 if k < stuck else u
        jump = b0 * applied if applied > 0 else None
        c -= applied
        d = max(0.0, a * (d + b0 * applied) + noise * rng.standard_normal())
        last = applied
        trace.append((k, c, d, u))
    return trace


def intervals_to_reach(trace, target=TARGET, tol=0.02):
    return next((k + 1 for k, c, _, _ in trace if c - target <= tol), None)


# ----------------------------------------------------------------------------- DARE / LQR gain


def riccati_residual(A, B, Q, R, P):
    """``Q + AᵀPA − AᵀPB(R + BᵀPB)⁻¹BᵀPA − P`` (zero at an exact solution)."""
    BtP = B.T @ P
    return Q + A.T @ P @ A - A.T @ P @ B @ np.linalg.solve(R + BtP @ B, BtP @ A) - P


def dare_error_bound(A, B, R, P, residual):
    """First-order bound on ‖P − P_exact‖ from a residual: ‖L⁻¹‖·‖res‖ with L(X) = X − A_clᵀ X A_cl.

    The Riccati map's derivative at the solution is the Stein operator L; its inverse's norm is the
    conditioning that turns a residual (what a solver controls) into an error in P.
    """
    K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
    Acl = A - B @ K
    n = A.shape[0]
    L = np.eye(n * n) - np.kron(Acl.T, Acl.T)
    return np.linalg.norm(np.linalg.inv(L), 2) * np.linalg.norm(residual, "fro")


def check_dare_solution(A, B, Q, R, P):
    """What matters of a DARE solution, and agreement with scipy within the conditioning's reach."""
    eps = np.finfo(float).eps
    scale = np.linalg.norm(Q) + np.linalg.norm(A) ** 2 * np.linalg.norm(P) + np.linalg.norm(P)
    res = riccati_residual(A, B, Q, R, P)
    assert np.linalg.norm(res) <= 1e4 * eps * scale, (np.linalg.norm(res), scale)  # backward stable
    np.testing.assert_allclose(P, P.T, atol=10 * eps * np.abs(P).max())  # symmetric
    assert np.linalg.eigvalsh(0.5 * (P + P.T)).min() >= -1e3 * eps * np.abs(P).max()  # positive semi-definite
    K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
    assert np.abs(np.linalg.eigvals(A - B @ K)).max() < 1.0  # the stabilising solution
    P_ref = scipy.linalg.solve_discrete_are(A, B, Q, R)
    # both are near-solutions: they differ by at most the sum of their first-order error bounds
    bound = dare_error_bound(A, B, R, P, res) + dare_error_bound(A, B, R, P_ref, riccati_residual(A, B, Q, R, P_ref))
    tol = 10 * bound + 1e3 * eps * np.linalg.norm(P)
    assert np.linalg.norm(P - P_ref) <= tol, (np.linalg.norm(P - P_ref), tol)


@pytest.mark.parametrize(
    "a,b,q_e,q_d,r",
    [(0.7, 0.5, 1.0, 10.0, 1.0), (0.7, 0.3, 1.0, 20.0, 1.0), (0.0, 0.01, 2.0, 0.0, 0.1),
     (0.99, 5.0, 1.0, 100.0, 10.0), (0.5, 1e-3, 0.5, 1.0, 1e-3)],
)
def test_solve_dare_residual_and_agreement_with_scipy(a, b, q_e, q_d, r):
    A, B = linear_system(a, b)
    Q, R = np.diag([q_e, q_d]), np.array([[r]])
    P = solve_dare(A, B, Q, R)
    check_dare_solution(A, B, Q, R, P)
    K = lqr_gain(A, B, Q, R)
    np.testing.assert_allclose(K, np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A), rtol=1e-12, atol=1e-15)
    assert K.shape == (1, 2) and K[0, 0] < 0.0  # cut while compute is above target
    assert K[0, 1] >= 0.0 and (q_d == 0.0 or K[0, 1] > 0.0)  # cut less while damaged


def test_solve_dare_general_system_residual_and_agreement_with_scipy():
    rng = np.random.default_rng(3)
    A = rng.normal(size=(4, 4))
    B = rng.normal(size=(4, 2))
    M = rng.normal(size=(4, 4))
    Q, R = M @ M.T + np.eye(4), np.diag([0.5, 2.0])
    check_dare_solution(A, B, Q, R, solve_dare(A, B, Q, R))


def test_dare_check_catches_a_wrong_solution():
    """The check above must fail for a perturbed or non-stabilising P (else it would pass anything)."""
    A, B = linear_system(0.7, 0.3)
    Q, R = np.diag([1.0, 20.0]), np.eye(1)
    P = solve_dare(A, B, Q, R)
    with pytest.raises(AssertionError):
        check_dare_solution(A, B, Q, R, P * (1 + 1e-6))


def test_lqr_gain_known_values_and_shape_errors():
    K = lqr_gain(*linear_system(0.7, 0.3), np.diag([1.0, 20.0]), np.eye(1))
    np.testing.assert_allclose(K, [[-0.465, 0.744]], atol=5e-4)
    # pure integrator, q = r = 1: P = golden ratio, K = -P / (1 + P)
    phi = (1 + 5**0.5) / 2
    np.testing.assert_allclose(lqr_gain([[1.0]], [[-1.0]], [[1.0]], [[1.0]]), [[-phi / (1 + phi)]])
    with pytest.raises(ValueError, match="Inconsistent shapes"):
        solve_dare(np.eye(2), np.ones((3, 1)), np.eye(2), np.eye(1))


# ----------------------------------------------------------------------------- closed loop


@pytest.mark.parametrize("name,max_intervals", [("lqr", 16), ("pid", 16), ("gmp", 16), ("linear", 17)])
def test_closed_loop_reaches_setpoint_without_undershoot(name, max_intervals):
    ctl = build_controller(name, TARGET)
    trace = simulate(ctl, a=0.7, b=0.3, noise=0.002)
    reached = intervals_to_reach(trace)
    assert reached is not None and reached <= max_intervals, reached
    assert min(c for _, c, _, _ in trace) >= TARGET - 1e-12
    assert trace[-1][1] - TARGET < 0.01  # and stays there


def test_lqr_identifies_plant_in_closed_loop():
    ctl = LQRController(TARGET)
    simulate(ctl, a=0.6, b=0.9, n=30, noise=0.001)
    assert abs(ctl.a - 0.6) < 0.05 and abs(ctl.b - 0.9) < 0.05
    K = lqr_gain(*linear_system(*ctl.gain_plant), np.diag([1.0, 10.0]), np.eye(1))
    np.testing.assert_allclose(ctl.gain, K[0])


def test_lqr_backs_off_when_damage_is_high():
    fresh = LQRController(TARGET)
    assert fresh.step(Observation(0, 0.0, 0.8, 0.0)) == pytest.approx(0.1)
    assert LQRController(TARGET).step(Observation(0, 0.0, 0.8, 0.5)) == 0.0
    mild = LQRController(TARGET).step(Observation(0, 0.0, 0.8, 0.3))
    assert 0.0 < mild < 0.6 * 0.1
    # injected damage mid-run stops cutting at once
    trace = simulate(LQRController(TARGET), inject={3: 0.6})
    assert trace[2][3] > 0.05 and trace[3][3] == 0.0
    # on a plant that is hurt badly by cuts, the identified LQR cuts far less
    easy = simulate(LQRController(TARGET), a=0.7, b=0.3, n=12)
    hard = simulate(LQRController(TARGET), a=0.7, b=3.0, n=12)
    assert sum(t[3] for t in hard) < 0.4 * sum(t[3] for t in easy)
    assert max(t[3] for t in hard[1:]) < 0.03


def test_lqr_deadband_nan_and_gain_cache():
    ctl = LQRController(TARGET, deadband=0.01)
    assert ctl.step(Observation(0, 0.0, TARGET + 0.009, 0.0)) == 0.0
    assert ctl.step(Observation(1, 0.0, 0.9, float("nan"))) == 0.0  # blown-up loss: no cut
    assert ctl.step(Observation(2, 0.0, 0.25, 0.0)) == 0.0  # below target
    ctl = LQRController(TARGET)
    solves = ctl.num_solves
    for k in range(5):  # data consistent with the prior: no re-solve
        ctl.step(Observation(k, 0.0, 0.9, 0.0, None, 0.0))
    assert ctl.num_solves == solves
    simulate(ctl, a=0.3, b=2.0, n=5)
    assert ctl.num_solves > solves


def test_pid_damage_guard_freezes_integrator():
    ctl = PIDController(TARGET, rate_limit=None)
    ctl.step(Observation(0, 0.0, 0.35, 0.0))
    integral = ctl.integral
    for k in range(1, 20):
        assert ctl.step(Observation(k, 0.0, 0.35, 0.2)) == 0.0
    assert ctl.integral == integral and ctl.guarded
    trace = simulate(PIDController(TARGET), a=0.5, b=0.05, inject={2: 0.2})
    assert [round(t[3], 12) for t in trace[:5]] == [0.05, 0.1, 0.0, 0.05, 0.1]  # ramps again


def test_pid_anti_windup_recovers_promptly():
    kp, ki, u_max = 0.5, 0.05, 0.1
    ctl = PIDController(TARGET, kp=kp, ki=ki, u_max=u_max, rate_limit=None)
    trace = simulate(ctl, n=50, stuck=50)  # actuator stuck: compute stays at 1.0, output saturated
    assert all(t[3] == pytest.approx(u_max) for t in trace)
    assert abs(ki * ctl.integral) <= u_max + 1e-12
    naive_integral = sum(1.0 - TARGET for _ in range(51))  # what a plain PI would have accumulated
    assert kp * 0.1 + ki * naive_integral > u_max  # ... which would still saturate at e = 0.1
    u = ctl.step(Observation(50, 0.5, TARGET + 0.1, 0.0, None, u_max))
    assert u == pytest.approx(kp * 0.1 + ki * ctl.integral) and u < 0.6 * u_max
    # error changes sign: no cut, integrator does not wind down below the actuator range
    for k in range(20):
        assert ctl.step(Observation(51 + k, 0.5, TARGET - 0.05, 0.0)) == 0.0
    assert ctl.integral >= -u_max / ki - 1e-12
    u = ctl.step(Observation(80, 0.5, TARGET + 0.05, 0.0))
    assert u == pytest.approx(kp * 0.05 + ki * ctl.integral, abs=1e-12) and 0.0 < u <= 0.05


def test_pid_integral_overcomes_actuator_dead_zone():
    ctl = PIDController(TARGET, kp=0.1, ki=0.1, rate_limit=None)
    c, last = TARGET + 0.05, 0.0
    for k in range(40):
        u = ctl.step(Observation(k, 0.5, c, 0.0, None, last))
        last = u if u >= 0.02 else 0.0  # rounding swallows cuts below 0.02 of dense
        c -= last
    assert c <= TARGET + 0.03 + 1e-12 and ctl.integral > 0.0


def test_pid_rate_limit():
    ctl = PIDController(TARGET, kp=2.0, rate_limit=0.03, u_max=0.2)
    us = [t[3] for t in simulate(ctl, b=0.01, n=8)]
    assert us[0] == pytest.approx(0.03)
    assert all(b - a <= 0.03 + 1e-12 for a, b in zip([0.0] + us, us))


# ----------------------------------------------------------------------------- open-loop schedules


def test_gmp_and_linear_formula():
    gmp = GMPController(TARGET, start=0.1, end=0.3)
    lin = LinearController(TARGET, start=0.1, end=0.3)
    expected = [(0.0, 1.0, 1.0), (0.1, 1.0, 1.0), (0.2, 0.3875, 0.65), (0.3, 0.3, 0.3), (1.0, 0.3, 0.3)]
    for p, c_gmp, c_lin in expected:
        assert gmp.setpoint(p) == pytest.approx(c_gmp)
        assert lin.setpoint(p) == pytest.approx(c_lin)
    assert gmp.step(Observation(0, 0.2, 0.9, 0.0)) == pytest.approx(0.9 - 0.3875)
    assert lin.step(Observation(0, 0.2, 0.5, 0.0)) == 0.0  # already below the schedule
    assert gmp.step(Observation(0, 1.0, 0.31, 0.0)) == pytest.approx(0.01)
    assert NoneController().step(Observation(0, 0.5, 1.0, 0.0)) == 0.0


# ----------------------------------------------------------------------------- identification


def test_rls_identifies_plant_from_noisy_data():
    a, b, rng = 0.8, 0.4, np.random.default_rng(0)
    rls = RecursiveLeastSquares([0.5, 1.0], [0.1, 1.0], forgetting=0.99, noise_var=1e-4)
    d = 0.0
    for _ in range(400):
        u = rng.uniform(0.0, 0.1)
        d_next = a * d + b * u + 0.002 * rng.standard_normal()
        rls.update([d, u], d_next)
        d = d_next
    assert abs(rls.theta[0] - a) < 0.03 and abs(rls.theta[1] - b) < 0.03
    assert rls.noise_var == pytest.approx(0.002**2, rel=0.5)


def test_rls_guards_and_bounds():
    rls = RecursiveLeastSquares([0.5], [1.0], forgetting=0.5, max_trace_ratio=100.0,
                                lower=[0.0], upper=[1.0])
    for _ in range(50):  # no information: skipped, P does not grow as lam^-k
        assert rls.update([0.0], 1.0) == 0.0
    assert rls.num_updates == 0 and rls.P[0, 0] == pytest.approx(1.0)
    for _ in range(50):  # tiny information with strong forgetting: P grows, reset guard fires
        rls.update([1e-4], 0.5e-4)
    assert rls.num_resets > 0 and np.trace(rls.P) <= 100.0
    rls.update([1.0], 5.0)  # wants theta = 5: projected onto [0, 1]
    assert rls.theta[0] == 1.0


def test_plant_estimator_uses_jumps_and_clamps():
    a, b0, rng = 0.6, 1.5, np.random.default_rng(1)
    with_jump, without = PlantEstimator(), PlantEstimator()
    d = 0.0
    for _ in range(30):  # constant cuts: d settles and [d, u] become collinear
        u = 0.05
        jump = b0 * u * (1 + 0.01 * rng.standard_normal())
        d_next = a * (d + b0 * u) + 0.01 * rng.standard_normal()
        with_jump.update(d, u, d_next, jump)
        without.update(d, u, d_next, None)
        d = d_next
    assert abs(with_jump.b - a * b0) < 0.1 * a * b0
    assert abs(with_jump.b - a * b0) < abs(without.b - a * b0)
    est = PlantEstimator()
    for _ in range(20):  # damage that grows on its own and shrinks with cuts: unphysical
        est.update(0.1, 0.05, 0.2, None)
    assert 0.0 <= est.a <= 0.99 and est.b >= 1e-3
    A, B = est.system()
    assert A.shape == (2, 2) and B.shape == (2, 1) and A[1, 1] == est.a and B[1, 0] == est.b


# ----------------------------------------------------------------------------- state, factory, import


def _plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or type(x) in (bool, int, float, str)


@pytest.mark.parametrize("name", CONTROLLERS)
def test_state_dict_round_trip(name):
    ctl = build_controller(name, TARGET)
    trace = simulate(ctl, n=10, noise=0.003)
    state = ctl.state_dict()
    assert _plain(state)
    resumed = build_controller(name, TARGET)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.state_dict() == state
    c, d = trace[-1][1], trace[-1][2] + 0.01
    for k in range(10, 20):
        obs = Observation(k * 20, k / 100, c + 0.1, d, 0.01 * k, 0.02)
        assert ctl.step(obs) == resumed.step(obs)
    assert ctl.state_dict() == resumed.state_dict()
    ctl.reset()
    assert ctl.state_dict() == build_controller(name, TARGET).state_dict()


def test_build_controller_errors():
    assert isinstance(build_controller("LQR", 0.3, q_d=5.0), LQRController)
    msg = r"Unknown controller 'foo'. Choose one of: none, gmp, linear, pid, lqr"
    with pytest.raises(ValueError, match=msg):
        build_controller("foo", 0.3)
    with pytest.raises(TypeError, match=r"'kq'.*Allowed: kp, ki, kd, u_max"):
        build_controller("pid", 0.3, kq=1.0)
    with pytest.raises(TypeError, match=r"Allowed: \(none\)"):
        build_controller("none", 0.3, start=0.1)
    bad = [("lqr", dict(u_max=0.0), "u_max"), ("lqr", dict(forgetting=1.5), "forgetting"),
           ("lqr", dict(forgetting=0.0), "forgetting"), ("gmp", dict(start=0.3, end=0.2), "start"),
           ("pid", dict(damage_max=-1.0), "damage_max"), ("lqr", dict(a_prior=1.0), "a_prior"),
           ("linear", dict(end=float("nan")), "end"), ("pid", dict(kp=0.0, ki=0.0), "kp")]
    for name, kwargs, key in bad:
        with pytest.raises(ValueError, match=key):
            build_controller(name, 0.3, **kwargs)
    for target in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"`target` must be .*\(0.0, 1.0\]"):
            build_controller("lqr", target)


def test_observation_is_frozen_and_package_is_light():
    obs = Observation(0, 0.0, 1.0, 0.0)
    assert obs.jump is None and obs.last_action == 0.0
    with pytest.raises(AttributeError):
        obs.compute = 0.5  # type: ignore[misc]
    # load the controllers package without the parent's __init__ (which imports the callback)
    code = ("import sys, types; pkg = types.ModuleType('ctprune_lightning'); "
            "pkg.__path__ = ['ctprune_lightning']; sys.modules['ctprune_lightning'] = pkg; "
            "import ctprune_lightning.controllers; "
            "bad = [m for m in ('scipy', 'torch', 'lightning') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={"PYTHONPATH": str(REPO)})


def test_an_unread_interval_holds_the_last_damage_and_teaches_the_plant_nothing() -> None:
    """``sensed=False`` (the sensing budget skipped the probe): NaN damage is "not measured", not "blown up" —
    LQR keeps cutting on the last damage, learns nothing from it, and re-anchors at the next reading; the PID
    keeps the last reading's guard."""
    from ctprune_lightning.controllers import LQRController, Observation, PIDController

    lqr = LQRController(target=0.3)
    lqr.step(Observation(step=0, progress=0.0, compute=1.0, damage=0.01))
    plant = lqr.plant.state_dict()
    u_read = LQRController(target=0.3)
    u_read.step(Observation(step=0, progress=0.0, compute=1.0, damage=0.01))
    expected = u_read.step(Observation(step=1, progress=0.1, compute=0.9, damage=0.01, last_action=0.0))
    u = lqr.step(Observation(step=1, progress=0.1, compute=0.9, damage=float("nan"), last_action=0.1,
                             sensed=False))
    assert u == pytest.approx(expected) and u > 0  # same as reading the held damage, without identifying
    assert lqr.plant.state_dict() == plant and lqr.stale
    lqr.step(Observation(step=2, progress=0.2, compute=0.8, damage=0.5, last_action=0.1))
    assert lqr.plant.state_dict() == plant and not lqr.stale  # re-anchored: no update across the gap
    assert lqr.prev_damage == 0.5

    pid = PIDController(target=0.3)
    pid.step(Observation(step=0, progress=0.0, compute=1.0, damage=10.0))
    assert pid.guarded
    assert pid.step(Observation(step=1, progress=0.1, compute=1.0, damage=float("nan"), sensed=False)) == 0.0
    assert pid.guarded
    pid.step(Observation(step=2, progress=0.2, compute=1.0, damage=0.0))
    assert not pid.guarded
