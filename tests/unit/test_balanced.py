"""Balanced truncation of LRU layers: Gramians, HSVs, the H∞ bound, re-diagonalisation, ranks, optimizer
state, the hankel importance and the FLOPs model."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from ctprune_lightning.data.sequential import SequentialDigitsDataModule
from ctprune_lightning.importance.hankel import HankelImportance, find_lru_layers, plan_lru_ranks
from ctprune_lightning.models.lru import LRUClassifier, LRULayer
from ctprune_lightning.surgery.balanced import (LRU_STATE_AXES, MIN_DECAY, DiagonalSystem,
                                                balanced_truncation, balancing_projectors, diagonalize, gramians,
                                                hankel_singular_values, lru_parameters,
                                                lru_system, passes_gate, rank_for_fraction, rank_for_tolerance,
                                                reduce_lru_)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_system(seed: int, n: int, h: int, rmax: float = 0.999, real: bool = False) -> DiagonalSystem:
    """A random stable diagonal system (|λ| in [0.1, rmax]); ``real``: real λ in (0, 1), real B and C."""
    g = torch.Generator().manual_seed(seed)
    r = 0.1 + (rmax - 0.1) * torch.rand(n, generator=g, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    if real:
        phase = torch.zeros_like(phase)
    lam = torch.polar(r, phase)
    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64 if real else torch.complex128).to(torch.complex128)

    return DiagonalSystem(lam, draw(n, h), draw(h, n))


def system_of(params: dict[str, torch.Tensor]) -> DiagonalSystem:
    return lru_system(SimpleNamespace(**params))


def hinf_error(full: DiagonalSystem, reduced: DiagonalSystem, points: int = 2048) -> float:
    """max over a unit-circle grid (plus the poles' angles) of ‖G(z) - G_r(z)‖_2."""
    omega = torch.cat([torch.linspace(0, 2 * math.pi, points, dtype=torch.float64), full.lam.angle(),
                       reduced.lam.angle()])
    z = torch.polar(torch.ones_like(omega), omega)
    return float(torch.linalg.matrix_norm(full.transfer(z) - reduced.transfer(z), ord=2).max())


def systems(max_n: int = 10, max_h: int = 4) -> st.SearchStrategy:
    return st.builds(random_system, seed=st.integers(0, 2**31 - 1), n=st.integers(1, max_n),
                     h=st.integers(1, max_h), rmax=st.sampled_from([0.5, 0.9, 0.99, 0.999, 0.9999]),
                     real=st.booleans())


# ------------------------------------------------------------------------------------------- Gramians
EPS = np.finfo(float).eps


def stein_residual(a: np.ndarray, x: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``X − A X Aᴴ − RHS`` (zero at the exact Gramian)."""
    return x - a @ x @ a.conj().T - rhs


def check_gramian(lam: np.ndarray, x: np.ndarray, rhs: np.ndarray, x_ref: np.ndarray) -> None:
    """A backward-stable closed form, and agreement with scipy within the conditioning's reach.

    For A = diag λ the Stein operator X ↦ X − A X Aᴴ acts entry-wise, so ‖L⁻¹‖ = max 1/|1 − λ_i conj(λ_j)|:
    each solution is within ‖L⁻¹‖·‖its residual‖ of the exact one (no fixed rtol against another LAPACK).
    """
    a = np.diag(lam)
    scale = np.linalg.norm(rhs) + np.linalg.norm(x)
    res = np.linalg.norm(stein_residual(a, x, rhs))
    assert res <= 100 * x.shape[0] * EPS * scale, (res, scale)
    inv_norm = 1.0 / np.abs(1.0 - lam[:, None] * lam.conj()[None, :]).min()
    bound = inv_norm * (res + np.linalg.norm(stein_residual(a, x_ref, rhs)))
    assert np.linalg.norm(x - x_ref) <= 10 * bound + 100 * EPS * np.linalg.norm(x), (np.linalg.norm(x - x_ref), bound)


def psd_sqrt_factor(m: np.ndarray) -> np.ndarray:
    s, u = np.linalg.eigh(0.5 * (m + m.conj().T))
    return u * np.sqrt(np.clip(s, 0, None))


@settings(max_examples=30, deadline=None)
@given(sys=systems())
def test_closed_form_gramians_equal_scipy_lyapunov(sys: DiagonalSystem) -> None:
    p, q = (g.numpy() for g in gramians(sys))
    lam, bb, cc = sys.lam.numpy(), (sys.B @ sys.B.mH).numpy(), (sys.C.mH @ sys.C).numpy()
    p_ref = scipy.linalg.solve_discrete_lyapunov(np.diag(lam), bb)
    q_ref = scipy.linalg.solve_discrete_lyapunov(np.diag(lam).conj().T, cc)
    check_gramian(lam, p, bb, p_ref)
    check_gramian(lam.conj(), q, cc, q_ref)
    hsv = hankel_singular_values(sys)
    assert torch.all(hsv[:-1] >= hsv[1:]) and float(hsv[-1]) >= 0
    # σ² are the eigenvalues of the Hermitian Fᴴ Q F (P = F Fᴴ): by Weyl, a change δP, δQ of the Gramians moves
    # each σ² by at most ‖P‖‖δQ‖ + ‖Q‖‖δP‖. (sqrt(eig(P Q)) of the non-symmetric product is no reference:
    # its error in small σ is ~sqrt(eps)·σ_1.)
    f = psd_sqrt_factor(p_ref)
    ref_sq = np.clip(np.sort(np.linalg.eigvalsh(f.conj().T @ q_ref @ f))[::-1], 0, None)
    norm2 = lambda m: np.linalg.norm(m, 2)  # noqa: E731
    tol = 2 * (norm2(p) * norm2(q - q_ref) + norm2(q_ref) * norm2(p - p_ref)) + 100 * len(lam) * EPS * norm2(p) * norm2(q)
    assert np.abs(hsv.numpy() ** 2 - ref_sq).max() <= tol, (np.abs(hsv.numpy() ** 2 - ref_sq).max(), tol)


def test_layer_gramians_use_the_exact_parametrisation() -> None:
    torch.manual_seed(0)
    layer = LRULayer(d_model=4, d_state=6, r_min=0.999, r_max=0.99999)  # |λ| near 1: cancellation-prone
    sys = lru_system(layer)
    p, _ = gramians(sys)
    b_norm2 = (sys.B.abs() ** 2).sum(dim=1)
    exact = b_norm2 / -torch.expm1(-2 * torch.exp(layer.nu_log.detach().double()))  # ‖B_i‖²/(1 - |λ_i|²)
    assert torch.allclose(p.diagonal().real, exact, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(sys=systems(max_n=6), data=st.data())
def test_balanced_gramians_are_diagonal_and_equal_to_the_hsvs(sys: DiagonalSystem, data: st.DataObject) -> None:
    hsv = hankel_singular_values(sys)
    assume(float(hsv[-1]) > 1e-6 * float(hsv[0]))
    w, t, s = balancing_projectors(sys, sys.state_dim)
    p, q = gramians(sys)
    sigma = torch.diag(s).to(torch.complex128)
    scale = float(s[0])
    assert float((w @ t - torch.eye(sys.state_dim)).abs().max()) < 1e-9
    assert float((w @ p @ w.mH - sigma).abs().max()) <= 1e-9 * scale
    assert float((t.mH @ q @ t - sigma).abs().max()) <= 1e-9 * scale
    # the balanced realisation's own Lyapunov solutions
    a_b, b_b, c_b, _ = balanced_truncation(sys, sys.state_dim)
    p_b = scipy.linalg.solve_discrete_lyapunov(a_b.numpy(), (b_b @ b_b.mH).numpy())
    q_b = scipy.linalg.solve_discrete_lyapunov(a_b.numpy().conj().T, (c_b.mH @ c_b).numpy())
    assert np.abs(p_b - sigma.numpy()).max() <= 1e-8 * scale and np.abs(q_b - sigma.numpy()).max() <= 1e-8 * scale


# ------------------------------------------------------------------------------------------- truncation
@pytest.mark.parametrize(("seed", "h", "n"), [(0, 4, 8), (1, 3, 16), (2, 8, 5)])
def test_truncation_to_full_rank_changes_no_output(seed: int, h: int, n: int) -> None:
    torch.manual_seed(seed)
    layer = LRULayer(d_model=h, d_state=n, r_min=0.5, r_max=0.99).double()
    u = torch.randn(3, 40, h, dtype=torch.float64)
    before = layer(u).detach()
    report = reduce_lru_(layer, n)
    after = layer(u).detach()
    assert layer.state_dim == n and report.new_dim == n and report.kept_energy == pytest.approx(1.0)
    assert float((after - before).abs().max()) <= 1e-10 * float(before.abs().max())
    assert all(getattr(layer, k).dtype == torch.float64 for k in LRU_STATE_AXES)


@settings(max_examples=30, deadline=None)
@given(sys=systems(), data=st.data())
def test_reduced_system_is_stable_and_within_the_hinf_bound(sys: DiagonalSystem, data: st.DataObject) -> None:
    hsv = hankel_singular_values(sys)
    positive = int((hsv > 1e-12 * hsv[0]).sum())
    r = data.draw(st.integers(1, positive), label="rank")
    a, b, c, _ = balanced_truncation(sys, r)
    reduced, _ = diagonalize(a, b, c)
    params = lru_parameters(reduced)
    assert all(torch.isfinite(v).all() for v in params.values())
    back = system_of(params)  # through the LRU parametrisation, guards included
    assert back.state_dim == r and float(back.lam.abs().max()) < 1.0
    bound = 2.0 * float(hsv[r:].sum())
    assert hinf_error(sys, back) <= bound * (1 + 1e-6) + 1e-9 * float(hsv[0])


def numpy_balanced_truncation(lam: np.ndarray, b: np.ndarray, c: np.ndarray, r: int):
    """Square-root balanced truncation written independently of the library: scipy's Lyapunov solver,
    numpy's Cholesky and SVD. Returns the dense reduced (A_r, B_r, C_r)."""
    a = np.diag(lam)
    p = scipy.linalg.solve_discrete_lyapunov(a, b @ b.conj().T)
    q = scipy.linalg.solve_discrete_lyapunov(a.conj().T, c.conj().T @ c)
    lc, lo = np.linalg.cholesky(0.5 * (p + p.conj().T)), np.linalg.cholesky(0.5 * (q + q.conj().T))
    u, s, vh = np.linalg.svd(lo.conj().T @ lc)
    isq = 1.0 / np.sqrt(s[:r])
    t = lc @ vh.conj().T[:, :r] * isq[None, :]
    w = isq[:, None] * (u[:, :r].conj().T @ lo.conj().T)
    return w @ a @ t, w @ b, c @ t


def markov(a: np.ndarray, b: np.ndarray, c: np.ndarray, steps: int) -> np.ndarray:
    """Impulse response h_k = C A^k B, k = 0..steps-1 (the map from u to y = Cx of x_k = A x_{k-1} + B u_k)."""
    out, x = [], b
    for _ in range(steps):
        out.append(c @ x)
        x = a @ x
    return np.stack(out)


@pytest.mark.parametrize(("seed", "h", "n", "r"), [(0, 3, 12, 5), (1, 2, 8, 3)])
def test_reduced_layer_has_the_balanced_truncation_response_and_canonical_mode_scaling(seed: int, h: int, n: int,
                                                                                       r: int) -> None:
    torch.manual_seed(seed)
    layer = LRULayer(d_model=h, d_state=n, r_min=0.5, r_max=0.95).double()
    full = lru_system(layer)
    b_raw = torch.complex(layer.B_re.detach(), layer.B_im.detach())
    c_old = torch.complex(layer.C_re.detach(), layer.C_im.detach())
    ratio = float(torch.exp((b_raw.norm(dim=1) / c_old.norm(dim=0)).log().mean()))  # kept through the cut
    d_before = layer.D.detach().clone()
    report = reduce_lru_(layer, r)
    reduced = lru_system(layer)
    assert reduced.state_dim == r and torch.equal(layer.D.detach(), d_before)
    # 1. the same input-output map as the balanced truncation computed independently (40 Markov parameters)
    ref = markov(*numpy_balanced_truncation(full.lam.numpy(), full.B.numpy(), full.C.numpy(), r), steps=40)
    got = markov(np.diag(reduced.lam.numpy()), reduced.B.numpy(), reduced.C.numpy(), steps=40)
    eps = np.finfo(float).eps
    # round-off of the re-diagonalisation grows with cond(V); of the Lyapunov/Cholesky/SVD chain with σ_1/σ_r
    hsv = report.hsv
    tol = 1e3 * eps * report.cond_eigvec * (hsv[0] / hsv[r - 1]) * np.abs(ref).max()
    assert np.abs(got - ref).max() <= tol, (np.abs(got - ref).max(), tol)
    assert np.abs(got - ref).max() > 0 or r == n  # a real comparison, not the same numbers twice
    # 2. what the per-mode rescaling guarantees: ‖B̃_i‖/‖C_i‖ = the old layer's geometric-mean ratio, and the
    #    largest entry of each C_i real positive (the free factor of each eigenvector fixed)
    b_new = torch.complex(layer.B_re.detach(), layer.B_im.detach())
    c_new = torch.complex(layer.C_re.detach(), layer.C_im.detach())
    torch.testing.assert_close(b_new.norm(dim=1) / c_new.norm(dim=0), torch.full((r,), ratio, dtype=torch.float64),
                               rtol=1e-9, atol=0)
    top = c_new.gather(0, c_new.abs().argmax(dim=0, keepdim=True))[0]
    assert torch.all(top.real > 0) and float(top.imag.abs().max()) <= 1e-12 * float(top.abs().min())


def test_real_system_with_real_eigenvalues_is_handled() -> None:
    sys = random_system(3, n=8, h=2, rmax=0.9, real=True)  # arg λ = 0 everywhere
    hsv = hankel_singular_values(sys)
    a, b, c, _ = balanced_truncation(sys, 4)
    reduced, _ = diagonalize(a, b, c)
    real_modes = reduced.lam.imag.abs() < 1e-8
    assert bool(real_modes.any())  # real eigenvalues (arg λ = 0) survive the truncation; the rest pair up
    pairs = reduced.lam[~real_modes]
    assert all(float((pairs - mu.conj()).abs().min()) < 1e-8 for mu in pairs)
    params = lru_parameters(reduced)
    assert all(torch.isfinite(v).all() for v in params.values())
    back = system_of(params)
    assert hinf_error(sys, back) <= 2.0 * float(hsv[4:].sum()) * (1 + 1e-6) + 1e-9 * float(hsv[0])


def test_parameter_guards_clip_unstable_zero_and_real_modes() -> None:
    lam = torch.tensor([1.0, 1.0001, 0.5, -0.5, 0.0, 0.9 * np.exp(0.3j), 0.9 * np.exp(-0.3j)], dtype=torch.complex128)
    sys = DiagonalSystem(lam, torch.ones(7, 2, dtype=torch.complex128), torch.ones(2, 7, dtype=torch.complex128))
    params = lru_parameters(sys)
    assert all(torch.isfinite(v).all() for v in params.values())
    back = system_of(params).lam
    assert float(back.abs().max()) <= math.exp(-MIN_DECAY) + 1e-15
    assert torch.allclose(back[2:4], lam[2:4], atol=1e-14) and 0 < float(back[4].abs()) < 1e-12
    assert params["theta_log"][2] == pytest.approx(math.log(2 * math.pi))  # real positive λ: phase 2π, exact
    assert torch.allclose(back[5:], lam[5:], atol=1e-14)  # a conjugate pair is two ordinary complex modes
    assert torch.allclose(system_of(params).B, sys.B, atol=1e-12)  # γ·B̃ = B


def test_uncontrollable_modes_and_a_dead_layer() -> None:
    sys = random_system(5, n=6, h=2)
    b = sys.B.clone()
    b[[1, 4]] = 0  # two uncontrollable modes: P is singular (Cholesky fails, the eigh factor takes over)
    sys = DiagonalSystem(sys.lam, b, sys.C)
    assert int(torch.linalg.cholesky_ex(gramians(sys)[0])[1]) != 0
    hsv = hankel_singular_values(sys)
    assert float(hsv[4:].max()) < 1e-12 * float(hsv[0]) and float(hsv[3]) > 1e-3 * float(hsv[0])
    a, b_r, c, _ = balanced_truncation(sys, 4)  # dropping the two zero-σ states loses nothing
    assert hinf_error(sys, system_of(lru_parameters(diagonalize(a, b_r, c)[0]))) < 1e-6 * float(hsv[0])
    with pytest.raises(ValueError, match="zero Hankel singular value"):
        balanced_truncation(sys, 6)
    layer = LRULayer(d_model=3, d_state=5).double()
    with torch.no_grad():
        layer.C_re.zero_(), layer.C_im.zero_()  # no input-output map: keep the first modal states
    kept_nu = layer.nu_log.detach()[:2].clone()
    report = reduce_lru_(layer, 2)
    assert layer.state_dim == 2 and torch.allclose(layer.nu_log.detach(), kept_nu) and report.error_bound == 0


def _trained_digits_model() -> tuple[LRUClassifier, torch.Tensor]:
    """An LRU (N=32) trained ~2 s on sequential digits, and the LRU layer's input on a fixed val batch."""
    L.seed_everything(0, verbose=False)
    dm = SequentialDigitsDataModule(batch_size=32, seed=0)
    model = LRUClassifier(input_dim=64, d_model=32, d_state=32, num_blocks=1, lr=1e-2, weight_decay=0.0,
                          dropout=0.0, warmup_fraction=0.05)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, max_epochs=3).fit(model, datamodule=dm)
    model.eval()
    x, _ = next(iter(dm.val_dataloader()))
    seen = {}
    hook = model.blocks[0].lru.register_forward_hook(lambda m, inp, out: seen.setdefault("u", inp[0].detach()))
    with torch.no_grad():
        model(x)
    hook.remove()
    return model, seen["u"]


def test_balanced_truncation_of_a_trained_layer_beats_dropping_states_by_index() -> None:
    model, u = _trained_digits_model()
    layer = copy.deepcopy(model.blocks[0].lru).double()
    u = u.double()
    with torch.no_grad():
        full = layer(u)
        for r in (24, 16, 8):
            bt = copy.deepcopy(layer)
            report = reduce_lru_(bt, r)
            by_index = copy.deepcopy(layer)
            for name, axis in LRU_STATE_AXES.items():
                setattr(by_index, name, torch.nn.Parameter(getattr(layer, name).narrow(axis, 0, r).clone()))
            err_bt = float((bt(u) - full).norm() / full.norm())
            err_index = float((by_index(u) - full).norm() / full.norm())
            assert err_bt < 0.7 * err_index, (r, err_bt, err_index)
            assert report.max_abs_lambda < 1.0 and report.error_bound > 0


# ------------------------------------------------------------------------------------------- in-place cut
def _step(model: LRUClassifier, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("policy", ["mean", "zero", "fresh"])
def test_reduce_lru_keeps_the_optimizer_consistent_and_the_model_trains(policy: str) -> None:
    dm = SequentialDigitsDataModule()
    dm.setup()
    x, y = dm.data_train.tensors[0][:64], dm.data_train.tensors[1][:64]
    torch.manual_seed(0)
    model = LRUClassifier(input_dim=64, d_model=16, d_state=16, num_blocks=2, dropout=0.0)
    opt = torch.optim.AdamW(model.param_groups(), lr=2e-2)
    for _ in range(5):
        _step(model, opt, x, y)
    dense = copy.deepcopy(model)
    dense_opt = torch.optim.AdamW(dense.param_groups(), lr=2e-2)
    dense_opt.load_state_dict(opt.state_dict())
    layer = model.blocks[0].lru
    old = {n: getattr(layer, n) for n in LRU_STATE_AXES}
    old_v = {n: opt.state[p]["exp_avg_sq"].mean().item() for n, p in old.items()}
    d_before = layer.D
    report = reduce_lru_(layer, 6, [opt], state_policy=policy)
    assert report.old_dim == 16 and report.new_dim == 6 and layer.state_dim == 6 and model.state_dims == [6, 16]
    assert tuple(layer.nu_log.shape) == (6,) and tuple(layer.B_re.shape) == (6, 16) and layer.C_im.shape == (16, 6)
    live = [id(p) for p in model.parameters()]
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(live) == sorted(in_opt)  # every live parameter, no dead one, no duplicate
    assert not {id(p) for p in old.values()} & set(in_opt) and layer.D is d_before
    ssm_group = {id(p) for p in opt.param_groups[0]["params"]}
    assert all((id(getattr(layer, n)) in ssm_group) == (n in ("nu_log", "theta_log", "gamma_log", "B_re", "B_im"))
               for n in LRU_STATE_AXES)
    for name in LRU_STATE_AXES:
        state = opt.state[getattr(layer, name)]
        assert torch.count_nonzero(state["exp_avg"]) == 0 and state["exp_avg"].shape == getattr(layer, name).shape
        expected_v = old_v[name] if policy == "mean" else 0.0
        assert policy != "mean" or expected_v > 0
        # relative only: second moments are ~1e-6..1e-3, below allclose's default atol=1e-8 x a few
        torch.testing.assert_close(state["exp_avg_sq"], torch.full_like(state["exp_avg_sq"], expected_v),
                                   rtol=1e-6, atol=0)
        assert float(state["step"]) == (0.0 if policy == "fresh" else 5.0)
    assert float(opt.state[layer.D]["step"]) == 5.0  # untouched parameters keep their state
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = [_step(model, opt, x, y)]
    assert all(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters()), "a parameter is stale"
    losses += [_step(model, opt, x, y) for _ in range(40)]
    dense_losses = [_step(dense, dense_opt, x, y) for _ in range(41)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] - losses[-1] > 0.5 * (dense_losses[0] - dense_losses[-1]) > 0.1  # still learns


def test_reduction_inside_lightning_training() -> None:
    class Cut(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: LRUClassifier, *args: object) -> None:
            if trainer.global_step == 6:
                reduce_lru_(pl_module.blocks[0].lru, 8, trainer.optimizers)

    L.seed_everything(0, verbose=False)
    model = LRUClassifier(input_dim=64, d_model=16, d_state=24, num_blocks=1, lr=1e-2, weight_decay=0.0,
                          dropout=0.0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_steps=30, callbacks=[Cut()])
    trainer.fit(model, datamodule=SequentialDigitsDataModule(batch_size=32))
    assert model.state_dims == [8]
    ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 30  # the schedule kept its position


def test_reduction_is_deterministic_and_independent_of_the_modal_order() -> None:
    torch.manual_seed(4)
    layer = LRULayer(d_model=6, d_state=12, r_min=0.5, r_max=0.99).double()
    a, b = copy.deepcopy(layer), copy.deepcopy(layer)
    reduce_lru_(a, 5)
    reduce_lru_(b, 5)
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in LRU_STATE_AXES)
    perm = torch.randperm(12)
    shuffled = copy.deepcopy(layer)
    for name, axis in LRU_STATE_AXES.items():
        setattr(shuffled, name, torch.nn.Parameter(getattr(layer, name).detach().index_select(axis, perm)))
    reduce_lru_(shuffled, 5)
    for name in LRU_STATE_AXES:
        assert torch.allclose(getattr(shuffled, name), getattr(a, name), rtol=1e-6, atol=1e-8), name


def test_resize_then_load_a_reduced_state_dict() -> None:
    from ctprune_lightning.surgery.arch import apply_arch_, capture_arch

    torch.manual_seed(0)
    reduced = LRUClassifier(input_dim=16, d_model=4, d_state=10, num_blocks=2)
    reduce_lru_(reduced.blocks[1].lru, 3)
    fresh = LRUClassifier(input_dim=16, d_model=4, d_state=10, num_blocks=2)
    apply_arch_(fresh, capture_arch(reduced))
    fresh.load_state_dict(reduced.state_dict())
    x = torch.randn(2, 16, 1)
    reduced.eval(), fresh.eval()
    assert fresh.state_dims == [10, 3] and torch.equal(fresh(x), reduced(x))


# ------------------------------------------------------------------------------------------- ranks
def test_rank_rules() -> None:
    hsv = torch.tensor([4.0, 3.0, 2.0, 1.0])  # tail energies 0.6, 0.3, 0.1, 0
    assert [rank_for_tolerance(hsv, t) for t in (0.0, 0.05, 0.1, 0.35, 0.7)] == [4, 4, 3, 2, 1]
    assert rank_for_tolerance(torch.zeros(5), 0.1) == 1
    assert [rank_for_fraction(n) for n in (256, 10, 1)] == [230, 9, 1] and rank_for_fraction(100, 0.5) == 50
    assert passes_gate(243, 256) and not passes_gate(244, 256) and not passes_gate(10, 10, gate=1.0)
    for bad in (lambda: rank_for_tolerance(hsv, 1.0), lambda: rank_for_fraction(10, 0.0)):
        with pytest.raises(ValueError):
            bad()


# ------------------------------------------------------------------------------------------- importance, plan
def test_hankel_importance_scores_plans_and_apply() -> None:
    torch.manual_seed(0)
    model = LRUClassifier(input_dim=16, d_model=4, d_state=16, num_blocks=2)
    assert [n for n, _ in find_lru_layers(model)] == ["blocks.0.lru", "blocks.1.lru"]
    imp = HankelImportance()
    scores = imp.scores(model, "blocks.0.lru")
    assert imp.name == "hankel" and scores.shape == (16,) and torch.all(scores[:-1] >= scores[1:])
    assert torch.allclose(scores.double(), hankel_singular_values(model.blocks[0].lru), rtol=1e-6)
    assert torch.equal(imp.scores(model, SimpleNamespace(name="blocks.0.lru")), scores)
    with pytest.raises(ValueError, match="not an LRU layer"):
        imp.scores(model, "encoder")
    restored = HankelImportance()
    restored.load_state_dict(imp.state_dict())
    assert restored.spectra == imp.spectra and list(imp.spectra) == ["blocks.0.lru"]
    assert plan_lru_ranks(model, mode="fraction") == {"blocks.0.lru": 14, "blocks.1.lru": 14}
    assert plan_lru_ranks(model, mode="tolerance", tau=0.0) == {}  # r = N fails the 5% gate
    budget = plan_lru_ranks(model, mode="fraction", fraction=0.4)
    assert budget == {"blocks.0.lru": 9, "blocks.1.lru": 9}
    for bad in ("magic", "budget"):  # "budget" was a mode nothing used; removed
        with pytest.raises(ValueError, match="mode"):
            plan_lru_ranks(model, mode=bad)
    hsvs = {n: hankel_singular_values(model.get_submodule(n)) for n in budget}
    reports = {n: reduce_lru_(model.get_submodule(n), r) for n, r in sorted(budget.items())}
    assert model.state_dims == [budget["blocks.0.lru"], budget["blocks.1.lru"]]
    for name, rep in reports.items():  # the r largest σ are kept: energy and H∞ bound from the spectrum
        r, hsv = budget[name], hsvs[name]
        tol = 1e-10 * float(hsv[0])  # σ from two SVD routes agree to round-off of the largest σ, not relatively
        assert (rep.old_dim, rep.new_dim) == (16, r) and rep.hsv == pytest.approx(hsv.tolist(), abs=tol)
        assert rep.kept_energy == pytest.approx(float(hsv[:r].sum() / hsv.sum()), abs=1e-10) and rep.kept_energy < 1
        assert rep.error_bound == pytest.approx(2 * float(hsv[r:].sum()), abs=2 * 16 * tol) and rep.error_bound > 0


# ------------------------------------------------------------------------------------------- cost
def test_flop_counter_scales_linearly_with_the_state_dim() -> None:
    torch.manual_seed(0)
    model = LRUClassifier(input_dim=40, d_model=8, d_state=12, num_blocks=2, dropout=0.0)
    x, y = torch.randn(3, 40, 1), torch.randint(0, 10, (3,))

    def counted() -> dict[str, int]:
        model.eval()
        with FlopCounterMode(display=False) as fc:
            torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        return {k: int(sum(v.values())) for k, v in fc.get_flop_counts().items()}

    before = counted()
    reduce_lru_(model.blocks[0].lru, 5)
    counts = counted()
    assert counts["LRUClassifier.blocks.0.lru"] * 12 == before["LRUClassifier.blocks.0.lru"] * 5  # linear in N
    assert counts["LRUClassifier.blocks.1.lru"] == before["LRUClassifier.blocks.1.lru"]
