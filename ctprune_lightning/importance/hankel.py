"""Hankel-singular-value importance for diagonal SSM (LRU) layers, and the rank plan of CompreSSM.

A unit of an SSM group is one *balanced* state, not a modal index: the scores of the layer named by the
group are its Hankel singular values σ_1 ≥ … ≥ σ_N (CompreSSM, arXiv 2510.02823). Keeping the top-k units
is therefore keeping the balanced states ``arange(k)``, and the actuator is balanced truncation
(:func:`ctprune_lightning.surgery.balanced.reduce_lru_`), not index selection.

A rank plan is ``{qualified layer name: rank}`` (plain ints), e.g. ``{"blocks.0.lru": 48}``; it holds only
layers that should shrink.

Example::

    plan = plan_lru_ranks(model, mode="tolerance", tau=0.02)
    apply_plan_(model, groups, {name: torch.arange(r) for name, r in plan.items()}, trainer.optimizers)
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..controllers.hankel import RANK_MODES  # the one definition: how a rank event picks each SSM layer's rank
from ..surgery.balanced import hankel_singular_values, is_lru_layer, passes_gate, rank_for_fraction, rank_for_tolerance
from .base import Importance



def find_lru_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every LRU layer in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if name and is_lru_layer(m)]


def _layer(model: nn.Module, group: object) -> tuple[str, nn.Module]:
    name = group if isinstance(group, str) else getattr(group, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"group must be a layer name or have a .name; got {group!r}")
    layer = model.get_submodule(name)
    if not is_lru_layer(layer):
        raise ValueError(f"'{name}' is a {type(layer).__name__}, not an LRU layer")
    return name, layer


class HankelImportance(Importance):
    """Scores of an SSM group = the layer's Hankel singular values (descending, one per balanced state).

    The last spectrum of each layer is kept in ``spectra`` (plain lists) for logging and the run summary.
    """

    name = "hankel"

    def __init__(self) -> None:
        self.spectra: dict[str, list[float]] = {}

    def scores(self, model: nn.Module, group: object) -> Tensor:
        name, layer = _layer(model, group)
        hsv = hankel_singular_values(layer)
        self.spectra[name] = hsv.tolist()
        return hsv.to(torch.float32)

    def state_dict(self) -> dict:
        return {"spectra": {k: list(v) for k, v in self.spectra.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.spectra = {k: list(v) for k, v in state.get("spectra", {}).items()}


def plan_lru_ranks(model: nn.Module, mode: str = "tolerance", tau: float = 0.02, fraction: float = 0.1,
                   gate: float = 0.95, min_rank: int = 1,
                   hsvs: Mapping[str, Tensor] | None = None) -> dict[str, int]:
    """Per-layer ranks for the next balanced-truncation event, gated as in the paper.

    Modes (:data:`RANK_MODES`): ``"tolerance"`` (r = min{k : Σ_{i≤k} σ_i ≥ (1-τ) Σ σ}, per layer) and
    ``"fraction"`` (r = ⌊(1-fraction)·N⌋). A layer enters the plan only if r < gate·N
    (gate = 0.95: the paper's 5% gate; 1.0 accepts any cut). ``hsvs`` reuses spectra already computed.
    """
    if mode not in RANK_MODES:
        raise ValueError(f"mode={mode!r} is not supported; choose one of {RANK_MODES}")
    if not 0.0 < float(gate) <= 1.0:
        raise ValueError(f"gate must be in (0, 1], got {gate}")
    layers = dict(find_lru_layers(model))
    spectra = {n: (hsvs[n] if hsvs is not None and n in hsvs else hankel_singular_values(m))
               for n, m in layers.items()}
    if mode == "tolerance":
        ranks = {n: max(int(min_rank), rank_for_tolerance(s, tau)) for n, s in spectra.items()}
    else:
        ranks = {n: max(int(min_rank), rank_for_fraction(s.numel(), fraction)) for n, s in spectra.items()}
    return {n: r for n, r in ranks.items() if passes_gate(r, int(layers[n].state_dim), gate)}
