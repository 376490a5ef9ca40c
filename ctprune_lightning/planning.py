"""Turn "remove this much compute" into a plan ``{group: kept indices}``.

Widths shrink by one common factor ``s`` (each rounded to ``round_to``, never below ``min_width``);
``s`` is the smallest factor whose *predicted* FLOPs still reach the requested level, so a plan never
cuts below the controller's floor. Prediction uses the per-module FLOPs of the current architecture:
a Linear's cost scales with (in-width ratio) × (out-width ratio). Importance picks which units stay.

Example::

    widths = plan_widths(current, per_module, total, groups, target_flops, min_width=8, round_to=8)
    keep = select_units(scores, widths["net.1"])
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .surgery.groups import PrunableGroup


def predict_flops(
    widths: Mapping[str, int],
    new_widths: Mapping[str, int],
    per_module: Mapping[str, int],
    total: int,
    groups: Sequence[PrunableGroup],
) -> float:
    """FLOPs per step after changing ``widths`` to ``new_widths`` (first-order in each width)."""
    ratio: dict[str, float] = {}
    for g in groups:
        r = new_widths[g.name] / widths[g.name]
        for s in g.slices:
            ratio[s.module] = ratio.get(s.module, 1.0) * r
    return total + sum(f * (ratio[m] - 1.0) for m, f in per_module.items() if m in ratio)


def _scaled(width: int, s: float, min_width: int, round_to: int) -> int:
    w = math.floor(width * s / round_to) * round_to
    return int(min(width, max(min_width, w)))


def plan_widths(
    widths: Mapping[str, int],
    per_module: Mapping[str, int],
    total: int,
    groups: Sequence[PrunableGroup],
    target_flops: float,
    min_width: int = 1,
    round_to: int = 1,
    floor_flops: float | None = None,
) -> dict[str, int]:
    """New width per group whose predicted FLOPs come closest to ``target_flops``.

    Of the two width assignments around the target (the deepest cut at or above it, and the next
    rounding step below it) the closer one wins, but nothing goes below ``floor_flops`` (default: the
    target itself, i.e. never cut more than asked). Returns the current widths when nothing fits.
    """
    floor = target_flops if floor_flops is None else floor_flops
    def new(s: float) -> dict[str, int]:
        return {n: _scaled(w, s, min(min_width, w), round_to) for n, w in widths.items()}

    def flops(s: float) -> float:
        return predict_flops(widths, new(s), per_module, total, groups)

    lo, hi = 0.0, 1.0  # flops(hi) >= target always holds (no cut)
    if flops(lo) >= target_flops:
        return new(lo)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if flops(mid) >= target_flops:
            hi = mid
        else:
            lo = mid
    above, below = flops(hi), flops(lo)
    if below >= floor and target_flops - below < above - target_flops:
        return new(lo)
    return new(hi)


def select_units(scores: Tensor, width: int) -> Tensor:
    """Indices (sorted) of the ``width`` highest scores; ties keep the lower index."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return order[:width].sort().values
