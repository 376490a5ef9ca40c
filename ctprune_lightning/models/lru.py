"""Deep Linear Recurrent Unit (LRU) classifier, the model family of CompreSSM.

LRU: Orvieto et al., arXiv 2303.06349; CompreSSM: Chahine et al., arXiv 2510.02823.

One LRU layer (state dim N, model dim H) is a diagonal complex linear system, output real part::

    x_k = Λ x_{k-1} + B u_k,      y_k = Re(C x_k) + D ⊙ u_k,
    λ_j = exp(-exp(ν_j) + i·exp(θ_j)),  B = diag(γ)(B_re + i B_im),  γ_j = exp(gamma_log_j),  C = C_re + i C_im.

The recurrence is evaluated without a Python loop over time: the sequence is cut into chunks of ``chunk``
steps; inside a chunk x = K b with the lower-triangular Toeplitz matrix K_ts = λ^{t-s} (one batched
matmul per state), and the chunk-final states are carried across chunks with a log-depth
(Hillis-Steele) scan in λ^chunk. The backward pass is the same scan run backwards in time with conj(λ)
(a custom autograd Function that saves only the states). Cost and memory are linear in N.

Example::

    model = LRUClassifier(input_dim=784, d_input=1, d_model=64, d_state=128, num_blocks=2)
    lightning.Trainer(max_epochs=2).fit(model, datamodule=SequentialFashionMNISTDataModule(pool=4))
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ctprune_lightning.models.classifier import ClassifierModule
from ctprune_lightning.models.common import WarmupCosine
from ctprune_lightning.surgery.balanced import SSM_PARAM_NAMES

SCHEDULERS = ("cosine", "none")
NORMS = ("batchnorm", "layernorm")
DEFAULT_CHUNK = 16


# ----------------------------------------------------------------------------------------------- scan
def _powers(log_lam: Tensor, k: Tensor) -> Tensor:
    """λ^k = exp(k·log λ) for integer k (any shape) -> shape (*k.shape, N); accurate for |λ| near 1."""
    return torch.exp(k.to(log_lam.real.dtype).unsqueeze(-1) * log_lam)


def _scan(b: Tensor, log_lam: Tensor, chunk: int, reverse: bool = False) -> Tensor:
    """x_t = λ x_{t-1} + b_t (x_{-1} = 0) over dim 1 of b (B, L, N); chunked Toeplitz + log-depth carry.

    ``reverse=True`` runs the adjoint recurrence G_t = b_t + conj(λ) G_{t+1} (G_L = 0) instead.
    """
    bsz, length, n = b.shape
    t = max(1, min(int(chunk), length))
    m = -(-length // t)
    if m * t != length:
        b = F.pad(b, (0, 0, 0, m * t - length))
    if reverse:
        log_lam = log_lam.conj()
    steps = torch.arange(t, device=b.device)
    lag = steps[:, None] - steps[None, :]
    kmat = _powers(log_lam, lag.clamp(min=0)) * (lag >= 0).unsqueeze(-1)  # (t, t, N), K_ts = λ^(t-s), t >= s
    if reverse:
        kmat = kmat.transpose(0, 1)  # K_ts = conj(λ)^(s-t), s >= t
    x = torch.einsum("tsn,bmsn->bmtn", kmat, b.reshape(bsz, m, t, n))
    if m > 1:
        s, lam_pow = 1, torch.exp(t * log_lam)
        if not reverse:  # chunk-final states, scanned across chunks: h_j = λ^t h_{j-1} + x_{j, t-1}
            carry = x[:, :, -1].clone()
            while s < m:
                carry[:, s:] += lam_pow * carry[:, :-s]
                lam_pow, s = lam_pow * lam_pow, 2 * s
            x[:, 1:] += carry[:, :-1, None, :] * _powers(log_lam, steps + 1)
        else:  # chunk-initial adjoints, scanned backwards: k_j = conj(λ)^t k_{j+1} + G_{j, 0}
            carry = x[:, :, 0].clone()
            while s < m:
                carry[:, :-s] += lam_pow * carry[:, s:]
                lam_pow, s = lam_pow * lam_pow, 2 * s
            x[:, :-1] += carry[:, 1:, None, :] * _powers(log_lam, t - steps)
    x = x.reshape(bsz, m * t, n)
    return x[:, :length] if m * t != length else x


class _DiagonalScan(torch.autograd.Function):
    """Linear recurrence with gradients by the adjoint recurrence (saves only the states x).

    With G_t = ∂L/∂x̄_t accumulated backwards, G_t = g_t + conj(λ) G_{t+1}; then ∂L/∂b̄ = G and
    ∂L/∂λ̄ = Σ_t G_t conj(x_{t-1}), ∂L/∂(log λ)‾ = conj(λ)·∂L/∂λ̄.
    """

    @staticmethod
    def forward(ctx: Any, b: Tensor, log_lam: Tensor, chunk: int) -> Tensor:
        x = _scan(b, log_lam, chunk)
        ctx.save_for_backward(x, log_lam)
        ctx.chunk = chunk
        return x

    @staticmethod
    def backward(ctx: Any, grad_x: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, log_lam = ctx.saved_tensors
        grad = _scan(grad_x.contiguous(), log_lam, ctx.chunk, reverse=True)
        grad_log_lam = None
        if ctx.needs_input_grad[1]:
            grad_lam = torch.einsum("btn,btn->n", grad[:, 1:], x[:, :-1].conj())
            grad_log_lam = grad_lam * torch.exp(log_lam).conj()
        return (grad if ctx.needs_input_grad[0] else None), grad_log_lam, None


def diagonal_scan(b: Tensor, log_lam: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """States of x_t = λ ⊙ x_{t-1} + b_t for complex ``b`` (B, L, N) and λ = exp(``log_lam``) (N,)."""
    if b.dim() != 3 or log_lam.shape != b.shape[-1:]:
        raise ValueError(f"need b of shape (B, L, N) and log_lam of shape (N,); got {tuple(b.shape)}, "
                         f"{tuple(log_lam.shape)}")
    return _DiagonalScan.apply(b, log_lam.to(b.dtype), int(chunk))


def sequential_scan(b: Tensor, lam: Tensor) -> Tensor:
    """Reference recurrence with a Python loop over time (tests only)."""
    x, out = torch.zeros_like(b[:, 0]), []
    for k in range(b.shape[1]):
        x = lam * x + b[:, k]
        out.append(x)
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------------------------- layers
class LRULayer(nn.Module):
    """Diagonal complex LRU layer (H -> H) with ``state_dim`` = N states; parameter names as in CompreSSM.

    ``state_dim`` is a plain attribute that :func:`ctprune_lightning.surgery.balanced.reduce_lru_` updates
    when it replaces the parameters.
    """

    def __init__(self, d_model: int, d_state: int, r_min: float = 0.9, r_max: float = 0.999,
                 max_phase: float = 6.28, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__()
        if int(d_model) < 1 or int(d_state) < 1 or int(chunk) < 1:
            raise ValueError(f"need d_model, d_state, chunk >= 1; got {d_model=}, {d_state=}, {chunk=}")
        if not 0.0 <= float(r_min) < float(r_max) < 1.0 or float(max_phase) <= 0:
            raise ValueError(f"need 0 <= r_min < r_max < 1 and max_phase > 0; got {r_min=}, {r_max=}, {max_phase=}")
        h, n = int(d_model), int(d_state)
        self.d_model, self.state_dim, self.chunk = h, n, int(chunk)
        u1, u2 = torch.rand(n), torch.rand(n)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))  # ring init
        theta_log = torch.log(max_phase * u2.clamp(min=1e-4))
        gamma_log = 0.5 * torch.log(-torch.expm1(-2.0 * torch.exp(nu_log)))  # γ = sqrt(1 - |λ|²)
        self.nu_log, self.theta_log, self.gamma_log = (nn.Parameter(t) for t in (nu_log, theta_log, gamma_log))
        self.B_re = nn.Parameter(torch.randn(n, h) / math.sqrt(2 * h))
        self.B_im = nn.Parameter(torch.randn(n, h) / math.sqrt(2 * h))
        self.C_re = nn.Parameter(torch.randn(h, n) / math.sqrt(n))
        self.C_im = nn.Parameter(torch.randn(h, n) / math.sqrt(n))
        self.D = nn.Parameter(torch.randn(h))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, state_dim={self.state_dim}, chunk={self.chunk}"

    def log_lambda(self) -> Tensor:
        """log λ = -exp(ν) + i·exp(θ), shape (N,)."""
        return torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log))

    def forward(self, u: Tensor) -> Tensor:
        """(B, L, H) -> (B, L, H); computed in the parameters' precision (autocast off)."""
        dtype = self.nu_log.dtype
        with torch.autocast(device_type=u.device.type, enabled=False):
            u = u.to(dtype)
            n = self.nu_log.shape[0]
            gamma = torch.exp(self.gamma_log).unsqueeze(-1)
            w_in = torch.stack((self.B_re * gamma, self.B_im * gamma), dim=1).reshape(2 * n, -1)  # rows re, im
            bu = torch.view_as_complex((u @ w_in.T).unflatten(-1, (n, 2)))
            x = diagonal_scan(bu, self.log_lambda(), self.chunk)
            # Re(Cx) = [C_re, -C_im]·[x_re, x_im], interleaved like view_as_real(x)
            w_out = torch.stack((self.C_re, -self.C_im), dim=-1).reshape(-1, 2 * n)
            return torch.view_as_real(x).flatten(-2) @ w_out.T + self.D * u


class GLU(nn.Module):
    """W1 x ⊙ σ(W2 x), both with bias."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.W1, self.W2 = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.W1(x) * torch.sigmoid(self.W2(x))


class LRUBlock(nn.Module):
    """Pre-norm residual block: x + Dropout(GLU(Dropout(GELU(LRU(Norm(x)))))); BatchNorm without affine."""

    def __init__(self, d_model: int, d_state: int, dropout: float = 0.0, norm: str = "batchnorm",
                 **lru_kwargs: Any) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not supported; choose one of {NORMS}")
        self.norm_kind = norm
        self.norm = (nn.BatchNorm1d(d_model, affine=False) if norm == "batchnorm"
                     else nn.LayerNorm(d_model, elementwise_affine=False))
        self.lru = LRULayer(d_model, d_state, **lru_kwargs)
        self.glu = GLU(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x.transpose(1, 2)).transpose(1, 2) if self.norm_kind == "batchnorm" else self.norm(x)
        h = self.drop(F.gelu(self.lru(h)))
        return x + self.drop(self.glu(h))


# ----------------------------------------------------------------------------------------------- model
class LRUClassifier(ClassifierModule):
    """Encoder Linear(d_input -> d_model), ``num_blocks`` LRU blocks, mean-pool over time, Linear head.

    Inputs of shape (B, L, d_input) or anything that reshapes to it, e.g. (B, 1, 28, 28) with d_input=1.
    ``input_dim`` is the number of features per sample (seq_len · d_input; ``train.py`` fills it with
    prod(input_shape)); it only sets the example input. Optimiser: AdamW with two groups as in CompreSSM:
    "ssm" = {nu_log, theta_log, gamma_log, B_re, B_im} at lr·ssm_lr_factor and no weight decay, "main" =
    everything else (C, D included) at lr with ``weight_decay``; linear warm-up over ``warmup_fraction`` of
    the steps, then cosine decay (``scheduler="cosine"``) or constant (``"none"``).
    """

    def __init__(self, input_dim: int = 784, d_input: int = 1, num_classes: int = 10, d_model: int = 64,
                 d_state: int = 128, num_blocks: int = 2, dropout: float = 0.1, norm: str = "batchnorm",
                 r_min: float = 0.9, r_max: float = 0.999, max_phase: float = 6.28, lr: float = 1e-3,
                 ssm_lr_factor: float = 0.5, weight_decay: float = 0.05, scheduler: str = "cosine",
                 warmup_fraction: float = 0.1, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r} is not supported; choose one of {SCHEDULERS}")
        if int(d_input) < 1 or int(input_dim) < int(d_input) or int(input_dim) % int(d_input):
            raise ValueError(f"input_dim must be a positive multiple of d_input; got {input_dim=}, {d_input=}")
        if int(num_classes) < 2 or int(num_blocks) < 1:
            raise ValueError(f"need num_classes >= 2 and num_blocks >= 1; got {num_classes=}, {num_blocks=}")
        if not 0.0 <= float(dropout) < 1.0 or not 0.0 <= float(warmup_fraction) < 1.0:
            raise ValueError(f"dropout and warmup_fraction must be in [0, 1); got {dropout=}, {warmup_fraction=}")
        if float(lr) <= 0 or float(ssm_lr_factor) <= 0 or float(weight_decay) < 0:
            raise ValueError(f"need lr > 0, ssm_lr_factor > 0, weight_decay >= 0; got {lr=}, {ssm_lr_factor=}, "
                             f"{weight_decay=}")
        self.save_hyperparameters()
        self.d_input = int(d_input)
        self.encoder = nn.Linear(self.d_input, int(d_model))
        self.blocks = nn.ModuleList(
            LRUBlock(int(d_model), int(d_state), float(dropout), norm, r_min=r_min, r_max=r_max,
                     max_phase=max_phase, chunk=chunk) for _ in range(int(num_blocks)))
        self.decoder = nn.Linear(int(d_model), int(num_classes))
        self.init_metrics(int(num_classes))
        self.example_input_array = torch.zeros(2, int(input_dim) // self.d_input, self.d_input)

    @property
    def state_dims(self) -> list[int]:
        """Current state dimension of every block's LRU layer."""
        return [int(b.lru.state_dim) for b in self.blocks]

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, num_classes)."""
        if x.shape[1:].numel() % self.d_input:
            raise ValueError(f"cannot read a sample of shape {tuple(x.shape[1:])} as steps of d_input={self.d_input}")
        h = self.encoder(x.reshape(x.shape[0], -1, self.d_input))
        for block in self.blocks:
            h = block(h)
        return self.decoder(h.mean(dim=1))

    def param_groups(self) -> list[dict[str, Any]]:
        """The two AdamW groups ("ssm" first); a param is "ssm" if its leaf name is in ``SSM_PARAM_NAMES``."""
        hp = self.hparams
        ssm, main = [], []
        for name, p in self.named_parameters():
            (ssm if name.rsplit(".", 1)[-1] in SSM_PARAM_NAMES else main).append(p)
        return [{"params": ssm, "lr": hp.lr * hp.ssm_lr_factor, "weight_decay": 0.0, "name": "ssm"},
                {"params": main, "lr": hp.lr, "weight_decay": hp.weight_decay, "name": "main"}]

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.param_groups(), lr=self.hparams.lr)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            rank_zero_warn("the LR schedule needs a finite number of steps (set max_epochs or max_steps); "
                           "no warm-up, constant LR.")
            return opt
        warmup = int(self.hparams.warmup_fraction * total)
        if self.hparams.scheduler == "none" and warmup == 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, WarmupCosine(warmup, int(total) if self.hparams.scheduler == "cosine" else None))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
