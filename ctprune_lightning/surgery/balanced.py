"""Balanced truncation of diagonal complex SSM layers (LRU), as in CompreSSM.

CompreSSM: Chahine et al., arXiv 2510.02823 (ICLR 2026); its reduction follows Forgione et al., arXiv 2403.14833.

An LRU layer is the complex system x_k = Λ x_{k-1} + B u_k, y_k = C x_k (it outputs Re(C x) + D u).
Its Gramians have a closed form (A = diag λ)::

    P_ij = (B B^H)_ij / (1 - λ_i conj(λ_j)),      Q_ij = (C^H C)_ij / (1 - conj(λ_i) λ_j),

and its Hankel singular values are σ = svd(L_o^H L_c) with P = L_c L_c^H, Q = L_o L_o^H. Square-root
balanced truncation keeps the balanced states ``keep`` (by default the r largest σ) with the projectors::

    L_o^H L_c = U Σ V^H,   T = L_c V_k Σ_k^{-1/2},   W = Σ_k^{-1/2} U_k^H L_o^H   (W T = I),
    A_r = W Λ T,   B_r = W B,   C_r = C T,      ‖G - G_r‖_∞ ≤ 2 Σ_{dropped} σ_i,

then re-diagonalises A_r = V diag(μ) V^{-1} (B' = V^{-1} B_r, C' = C_r V) and maps back to LRU parameters
(ν = log(-log|μ|), θ = log(arg μ mod 2π), γ = sqrt(1 - |μ|²), B̃ = B'/γ); D is unchanged. Guards: |μ| is
clipped below 1 - 1e-6 (round-off must not make a mode unstable) and a real positive μ gets phase 2π. All
algebra runs on the CPU in complex128 with a fixed mode order and eigenvector scale/phase, so equal inputs give
equal results on every rank (still broadcast from rank 0 under DDP/FSDP: LAPACK builds may differ).

Optimizer state (a documented choice): the cut is a change of basis, not an index selection, so old moments
have no meaning for the new coordinates. By default (``state_policy="zero"``) every per-element state of the
replaced parameters (Adam ``exp_avg``/``exp_avg_sq``, SGD ``momentum_buffer``) restarts at zero and ``step``
is kept: Adam's bias correction is then ≈ 1, so the new parameters take larger-than-usual steps (up to ~3-6x
lr per element, fading over ~1/(1-β2) steps), a fast re-adaptation after the cut. On sequential digits
(2 blocks, N=64, 4 cuts at τ = 0.1 / 0.05, 3 seeds each) it recovered best: val acc 0.969 / 0.913 vs 0.957 /
0.883 for ``"mean"`` (first moments 0, second moments filled with the old tensor's mean, step kept: small
first steps) and 0.964 / 0.888 for ``"fresh"`` (all zero and step 0: an exact fresh Adam). D, which keeps its
meaning, keeps its state. The parameters keep their slot in their param group (LR, weight decay, scheduler
position unchanged).

Example::

    report = reduce_lru_(model.blocks[0].lru, rank_for_tolerance(hankel_singular_values(layer), 0.02),
                         trainer.optimizers)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .optim import swap_parameter_

log = logging.getLogger(__name__)

SSM_PARAM_NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im")  # optimiser group "ssm" (no weight decay)
LRU_STATE_AXES: dict[str, int] = {"nu_log": 0, "theta_log": 0, "gamma_log": 0, "B_re": 0, "B_im": 0,
                                  "C_re": 1, "C_im": 1}  # parameters whose size is N, and their state axis
MIN_DECAY = 1e-6        # -log|λ| >= 1e-6, i.e. |λ| <= 1 - 1e-6 (stability guard against round-off)
MAX_DECAY = 30.0        # |λ| >= e^-30 (ν stays finite for modes at λ ≈ 0)
MIN_PHASE = 1e-6        # arg λ mod 2π below this (a real positive eigenvalue: θ = log 0) is written as arg + 2π
STATE_POLICIES = ("zero", "mean", "fresh")
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")
CDTYPE = torch.complex128


def is_lru_layer(module: nn.Module) -> bool:
    """Duck-typed: the module holds every LRU state parameter and a ``state_dim`` attribute."""
    return hasattr(module, "state_dim") and all(isinstance(getattr(module, n, None), Tensor) for n in LRU_STATE_AXES)


@dataclass(frozen=True)
class DiagonalSystem:
    """x_k = diag(lam) x_{k-1} + B u_k, y_k = C x_k (complex128; ``log_lam`` exact when known)."""

    lam: Tensor
    B: Tensor
    C: Tensor
    log_lam: Tensor | None = None

    @property
    def state_dim(self) -> int:
        return int(self.lam.shape[0])

    def transfer(self, z: Tensor) -> Tensor:
        """G(z) = C (zI - Λ)^{-1} B for a vector of points z -> (len(z), H, H)."""
        return torch.einsum("hn,zn,nk->zhk", self.C, 1.0 / (z[:, None] - self.lam[None, :]), self.B)


def lru_system(layer: nn.Module) -> DiagonalSystem:
    """The layer's complex system in complex128 on the CPU: λ = exp(-e^ν + i e^θ), B = diag(γ)(B_re + iB_im)."""
    with torch.no_grad():
        p = {n: getattr(layer, n).detach().to("cpu", torch.float64) for n in LRU_STATE_AXES}
        log_lam = torch.complex(-torch.exp(p["nu_log"]), torch.exp(p["theta_log"]))
        b = torch.exp(p["gamma_log"])[:, None] * torch.complex(p["B_re"], p["B_im"])
        return DiagonalSystem(torch.exp(log_lam), b, torch.complex(p["C_re"], p["C_im"]), log_lam)


def gramians(sys: DiagonalSystem) -> tuple[Tensor, Tensor]:
    """Closed-form controllability P and observability Q Gramians (Hermitian, complex128).

    1 - λ_i conj(λ_j) is computed as -expm1(log λ_i + conj(log λ_j)) to avoid cancellation for |λ| ≈ 1.
    """
    log_lam = sys.log_lam if sys.log_lam is not None else torch.log(sys.lam)
    denom = -torch.expm1(log_lam[:, None] + log_lam.conj()[None, :])  # 1 - λ_i conj(λ_j)
    p = (sys.B @ sys.B.mH) / denom
    q = (sys.C.mH @ sys.C) / denom.conj()
    return 0.5 * (p + p.mH), 0.5 * (q + q.mH)


def _psd_factor(m: Tensor) -> Tensor:
    """L with m = L L^H: Cholesky, or for a numerically singular m the eigh factor U sqrt(s), with the
    eigenvalues below round-off (s < N·eps·max s) set to 0 so that uncontrollable/unobservable directions
    give exactly zero Hankel singular values instead of sqrt(eps)-sized noise."""
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        return chol
    s, u = torch.linalg.eigh(m)
    floor = float(s.max().clamp(min=0)) * m.shape[0] * torch.finfo(s.dtype).eps
    return u * torch.where(s > floor, s, torch.zeros_like(s)).sqrt()


def _balancing_svd(sys: DiagonalSystem) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(L_c, L_o, U, σ, V^H) with L_o^H L_c = U diag(σ) V^H."""
    p, q = gramians(sys)
    lc, lo = _psd_factor(p), _psd_factor(q)
    u, s, vh = torch.linalg.svd(lo.mH @ lc)
    return lc, lo, u, s, vh


def hankel_singular_values(layer_or_sys: nn.Module | DiagonalSystem) -> Tensor:
    """Hankel singular values (float64, descending) of an LRU layer's complex N-state system."""
    sys = layer_or_sys if isinstance(layer_or_sys, DiagonalSystem) else lru_system(layer_or_sys)
    p, q = gramians(sys)
    return torch.linalg.svdvals(_psd_factor(q).mH @ _psd_factor(p))


def _as_keep(keep: int | Tensor | Iterable[int], n: int) -> Tensor:
    if isinstance(keep, Tensor):
        keep = torch.arange(int(keep)) if keep.dim() == 0 else keep.detach().cpu().long().flatten()
    elif isinstance(keep, Iterable):
        keep = torch.as_tensor(list(keep), dtype=torch.long).flatten()
    else:
        keep = torch.arange(int(keep))
    if keep.numel() < 1 or keep.numel() > n or int(keep.min()) < 0 or int(keep.max()) >= n or \
            keep.unique().numel() != keep.numel():
        raise ValueError(f"keep must name 1..{n} distinct balanced states in [0, {n}); got {keep.tolist()}")
    return keep


def balancing_projectors(sys: DiagonalSystem, keep: int | Tensor,
                         svd: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(W, T, σ): rank-r square-root projectors onto the kept balanced states (W T = I) and all HSVs.

    States with σ = 0 carry no input-output energy; keeping them is refused (there is no balanced direction).
    ``svd``: ``sys``'s :func:`_balancing_svd` when the caller has it already.
    """
    lc, lo, u, s, vh = _balancing_svd(sys) if svd is None else svd
    keep = _as_keep(keep, s.numel())
    sk = s[keep]
    if float(sk.min()) <= float(s[0]) * 1e-14:
        raise ValueError(f"cannot keep balanced states with zero Hankel singular value (σ = {sk.tolist()})")
    isq = sk.rsqrt().to(CDTYPE)
    t = lc @ vh.mH[:, keep] * isq[None, :]
    w = isq[:, None] * (u[:, keep].mH @ lo.mH)
    return w, t, s


def balanced_truncation(sys: DiagonalSystem, keep: int | Tensor,
                        svd: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(A_r, B_r, C_r, σ): the dense reduced system on the kept balanced states, and all HSVs."""
    w, t, s = balancing_projectors(sys, keep, svd)
    return (w * sys.lam[None, :]) @ t, w @ sys.B, sys.C @ t, s


def lru_gamma(lam: Tensor) -> Tensor:
    """γ = sqrt(1 - |λ|²) with the guards of :func:`lru_parameters` (float64)."""
    decay = (-torch.log(lam.abs().clamp(min=1e-300))).clamp(MIN_DECAY, MAX_DECAY)
    return torch.sqrt(-torch.expm1(-2.0 * decay))


def diagonalize(a: Tensor, b: Tensor, c: Tensor, ratio: float | None = None) -> tuple[DiagonalSystem, float]:
    """Re-diagonalise (A, B, C) -> (diag μ, V^{-1}B, CV) in a canonical scale/phase/order; also cond(V).

    Each mode's free factor d (B_i -> B_i/d, C_i -> C_i d) is fixed so that ‖B̃_i‖/‖C_i‖ = ``ratio``
    (B̃ = B/γ, the LRU's raw input weights; 1 if None) and the largest-magnitude entry of C_i is real
    positive. Modes are sorted by the scale-free energy ‖B_i‖‖C_i‖/(1-|μ_i|²), descending.
    """
    mu, v = torch.linalg.eig(a)
    b2, c2 = torch.linalg.solve(v, b), c @ v
    cond = float(torch.linalg.cond(v))
    bn, cn = b2.norm(dim=1), c2.norm(dim=0)
    ok = (bn > 0) & (cn > 0)
    mag = torch.where(ok, (bn / (lru_gamma(mu) * cn.clamp(min=1e-300) * (ratio or 1.0))).sqrt(), torch.ones_like(bn))
    top = c2.abs().argmax(dim=0)
    phase = c2.gather(0, top[None, :])[0]
    phase = torch.where(phase.abs() > 0, phase.abs() / phase, torch.ones_like(phase))
    d = mag.to(CDTYPE) * phase
    b2, c2 = b2 / d[:, None], c2 * d[None, :]
    energy = bn * cn / (1.0 - mu.abs() ** 2).clamp(min=1e-300)
    order = sorted(range(mu.numel()), key=lambda i: (-float(energy[i]), float(mu[i].angle())))
    order = torch.tensor(order, dtype=torch.long)
    return DiagonalSystem(mu[order], b2[order], c2[:, order]), cond


def lru_parameters(sys: DiagonalSystem) -> dict[str, Tensor]:
    """LRU parameters (float64) realising ``sys``: ν = log(-log|λ|), θ = log(arg λ mod 2π), γ = sqrt(1-|λ|²).

    Guards: |λ| is clipped to [e^-30, 1 - 1e-6]; a phase in [0, 1e-6) (a real positive eigenvalue) becomes
    phase + 2π, the same λ with a finite, well-scaled θ.
    """
    decay = (-torch.log(sys.lam.abs().clamp(min=1e-300))).clamp(MIN_DECAY, MAX_DECAY)
    phase = torch.remainder(sys.lam.angle(), 2 * math.pi)
    phase = torch.where(phase < MIN_PHASE, phase + 2 * math.pi, phase)
    gamma = torch.sqrt(-torch.expm1(-2.0 * decay))
    b_raw = sys.B / gamma[:, None]
    return {"nu_log": decay.log(), "theta_log": phase.log(), "gamma_log": gamma.log(), "B_re": b_raw.real,
            "B_im": b_raw.imag, "C_re": sys.C.real, "C_im": sys.C.imag}


def _norm_ratio(layer: nn.Module) -> float:
    """Geometric mean over the layer's modes of ‖B̃_i‖/‖C_i‖ (kept through the cut)."""
    with torch.no_grad():
        bn = torch.complex(layer.B_re.double(), layer.B_im.double()).norm(dim=1).cpu()
        cn = torch.complex(layer.C_re.double(), layer.C_im.double()).norm(dim=0).cpu()
    ok = (bn > 0) & (cn > 0)
    return float(torch.exp((bn[ok] / cn[ok]).log().mean())) if bool(ok.any()) else 1.0


def _reinit_state(state: dict, old: Tensor, new: Tensor, policy: str) -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape == old.shape:
            fill = value.float().mean().item() if policy == "mean" and key in SECOND_MOMENT_KEYS else 0.0
            out[key] = torch.full_like(new, fill, dtype=value.dtype, device=value.device)
        elif policy == "fresh" and key == "step":
            out[key] = torch.zeros_like(value) if isinstance(value, Tensor) else 0
        else:
            out[key] = value
    return out


def swap_parameter_reinit_state_(module: nn.Module, name: str, data: Tensor, optimizers: Iterable[Optimizer] = (),
                                 policy: str = "zero") -> nn.Parameter:
    """Replace ``module.<name>`` by a new Parameter holding ``data`` (old dtype/device), in the old slot of every
    optimizer, with its state re-initialised by ``policy`` (see the module docstring)."""
    if policy not in STATE_POLICIES:
        raise ValueError(f"state_policy={policy!r} is not supported; choose one of {STATE_POLICIES}")
    return swap_parameter_(module, name, data, optimizers,
                           lambda state, old, new: _reinit_state(state, old, new, policy))


@dataclass
class LRUReduction:
    """What one balanced truncation did (plain types, for logging and the run summary)."""

    old_dim: int
    new_dim: int
    hsv: list[float] = field(repr=False)
    kept_energy: float      # Σ_kept σ / Σ σ
    error_bound: float      # 2 Σ_dropped σ (H∞ bound on the complex system's error)
    cond_eigvec: float      # cond(V) of the re-diagonalisation
    max_abs_lambda: float
    seconds: float


def reduce_lru_(layer: nn.Module, keep: int | Tensor, optimizers: Iterable[Optimizer] = (),
                state_policy: str = "zero") -> LRUReduction:
    """Balanced truncation of ``layer`` in place to the balanced states ``keep`` (int r: the r largest σ).

    Replaces every N-sized parameter by a new ``nn.Parameter`` (same dtype, device, requires_grad), swaps it
    into the optimizers' slots with re-initialised state, and sets ``layer.state_dim``. ``keep = N`` is a
    pure change of basis (the layer's input-output map is unchanged up to round-off).
    """
    if not is_lru_layer(layer):
        raise TypeError(f"{type(layer).__name__} is not an LRU layer (needs {sorted(LRU_STATE_AXES)} and state_dim)")
    t0 = time.perf_counter()
    optimizers = list(optimizers)
    sys = lru_system(layer)
    svd = _balancing_svd(sys)  # the Hankel singular values and the balancing, computed once
    hsv = svd[3]
    if float(hsv[0]) == 0.0:  # no input-output map at all: keep the first modal states
        idx = _as_keep(keep, sys.state_dim)
        reduced, cond = DiagonalSystem(sys.lam[idx], sys.B[idx], sys.C[:, idx]), 1.0
        kept = idx
    else:
        a, b, c, hsv = balanced_truncation(sys, keep, svd)
        reduced, cond = diagonalize(a, b, c, ratio=_norm_ratio(layer))
        kept = _as_keep(keep, sys.state_dim)
    if cond > 1e10:
        log.warning("balanced truncation of %s: ill-conditioned eigenvectors (cond %.2e)", type(layer).__name__, cond)
    params = lru_parameters(reduced)
    for name, data in params.items():
        swap_parameter_reinit_state_(layer, name, data, optimizers, state_policy)
    layer.state_dim = int(reduced.state_dim)
    total = float(hsv.sum())
    kept_sum = float(hsv[kept].sum())
    return LRUReduction(old_dim=sys.state_dim, new_dim=layer.state_dim, hsv=hsv.tolist(),
                        kept_energy=kept_sum / total if total > 0 else 1.0, error_bound=2.0 * (total - kept_sum),
                        cond_eigvec=cond, max_abs_lambda=float(torch.exp(-torch.exp(params["nu_log"])).max()),
                        seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- ranks
def tail_energy(hsv: Tensor) -> Tensor:
    """e_k = Σ_{i>k} σ_i / Σ σ_i for k = 1..N (linear in σ, as the paper's Eq. 8)."""
    hsv = hsv.double().flatten()
    total = hsv.sum()
    if float(total) <= 0:
        return torch.zeros_like(hsv)
    return ((total - hsv.cumsum(0)) / total).clamp(min=0.0)


def rank_for_tolerance(hsv: Tensor, tau: float) -> int:
    """r = min{k : Σ_{i≤k} σ_i ≥ (1-τ) Σ σ_i} (≥ 1), the paper's energy criterion with linear σ."""
    if not 0.0 <= float(tau) < 1.0:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    e = tail_energy(hsv)
    return min(int(e.numel()), 1 + int((e[:-1] > float(tau)).sum()))


def rank_for_fraction(state_dim: int, fraction: float = 0.1) -> int:
    """r = max(1, ⌊(1 - fraction)·N⌋) (the paper's "fixed" mode with fraction 0.1)."""
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    return max(1, int(math.floor((1.0 - float(fraction)) * int(state_dim) + 1e-9)))


def passes_gate(rank: int, state_dim: int, gate: float = 0.95) -> bool:
    """The paper's 5% gate: reduce only if r < gate·N."""
    return int(rank) < float(gate) * int(state_dim)
