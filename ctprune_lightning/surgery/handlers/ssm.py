"""Diagonal SSM (LRU) layers: the state dimension, cut by balanced truncation (:mod:`..balanced`).

A unit is a *balanced* state (scores: Hankel singular values), owning no parameter slice of its own. New
states copy the eigenvalues of randomly drawn existing modes (phase jittered, so no eigenvalue repeats
exactly), take an input map drawn like the LRU's init (N(0, 1/(2H))) and a zero output map: the layer's
output does not change, and the output map is trained from the next step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..balanced import is_lru_layer, reduce_lru_
from ..optim import grow_parameter_
from .base import GrowInit, OwnGroup, ParamSlice, SliceHandler, register

SSM_STATE = "ssm_state"
PHASE_JITTER = 0.01  # relative jitter of a copied mode's phase


def grow_lru_states_(layer: nn.Module, n: int, optimizers: Sequence[Optimizer], init: GrowInit) -> None:
    """Append ``n`` modal states with a zero output map (C); eigenvalues from existing modes, B drawn."""
    if not is_lru_layer(layer):
        raise TypeError(f"grow_lru_states_: {type(layer).__name__} is not an LRU layer")
    old = int(layer.state_dim)
    idx = torch.randint(old, (n,), generator=init.generator)
    with torch.no_grad():
        nu = layer.nu_log.detach().cpu()[idx]
        theta = layer.theta_log.detach().cpu()[idx]
        theta = theta + torch.log1p(PHASE_JITTER * torch.randn(n, generator=init.generator, dtype=torch.float64)
                                    .clamp(-0.5, 0.5)).to(theta.dtype)
        gamma = 0.5 * torch.log(-torch.expm1(-2.0 * torch.exp(nu.double()))).to(nu.dtype)
    for name, data in (("nu_log", nu), ("theta_log", theta), ("gamma_log", gamma)):
        grow_parameter_(layer, name, data, 0, optimizers)
    h = int(layer.B_re.shape[1])
    for name in ("B_re", "B_im"):
        grow_parameter_(layer, name, init.normal(getattr(layer, name), (n, h), 1.0 / math.sqrt(2 * h)), 0, optimizers)
    for name in ("C_re", "C_im"):
        c = getattr(layer, name)
        grow_parameter_(layer, name, c.new_zeros(c.shape[0], n), 1, optimizers)
    layer.state_dim = old + n


@register
class LRUHandler(SliceHandler):
    kinds = {SSM_STATE: "out"}
    size_attrs = ("state_dim",)
    units = {SSM_STATE: "state"}
    priority = 20

    def owns(self, module: nn.Module, kind: str) -> bool:
        return is_lru_layer(module)

    def own_group(self, module: nn.Module) -> OwnGroup | None:
        return OwnGroup(SSM_STATE) if is_lru_layer(module) else None

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        return int(module.state_dim)

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        return []  # a balanced state owns no parameter slice (scores: Hankel singular values)

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        reduce_lru_(module, keep, optimizers)  # keep = balanced states (arange(r) keeps the r largest σ)

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        grow_lru_states_(module, n, optimizers, init)
