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


def exclusive_flops(per_module: Mapping[str, int]) -> dict[str, int]:
    """Each module's own FLOPs: its count minus its direct children's (FlopCounterMode counts are inclusive)."""
    own = dict(per_module)
    for name, flops in per_module.items():
        parent = name.rpartition(".")[0]
        if parent and parent in own:
            own[parent] -= flops
    return own


def predict_flops(
    widths: Mapping[str, int],
    new_widths: Mapping[str, int],
    per_module: Mapping[str, int],
    total: int,
    groups: Sequence[PrunableGroup],
) -> float:
    """FLOPs per step after changing ``widths`` to ``new_widths`` (first-order in each width).

    A module's own FLOPs scale with the product of the width ratios of the groups that cut it: a
    Linear or a Conv by (in ratio) × (out ratio), an attention module's own cost (SDPA) by its head
    ratio. Counts of parent modules are made exclusive so nothing is scaled twice.
    """
    ratio: dict[str, float] = {}
    for g in groups:
        r = new_widths[g.name] / widths[g.name]
        for m in g.scaled_modules():
            ratio[m] = ratio.get(m, 1.0) * r
    own = exclusive_flops(per_module)
    return total + sum(own[m] * (ratio[m] - 1.0) for m in own if m in ratio)


def _scaled(width: int, s: float, min_width: int, round_to: int) -> int:
    """``width * s`` rounded to the nearest multiple of ``round_to``, within ``[min_width, width]``.

    Rounding to the nearest (not down) makes the widest groups step first as ``s`` falls, so the
    smallest cut is one rounding step of the widest group, not of every group at once.
    """
    w = math.floor(width * s / round_to + 0.5) * round_to
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
    limits = {g.name: (min_width if g.min_width is None else g.min_width,
                       round_to if g.round_to is None else g.round_to) for g in groups}

    def new(s: float) -> dict[str, int]:
        out = {}
        for n, w in widths.items():
            lo, step = limits.get(n, (min_width, round_to))
            out[n] = _scaled(w, s, min(lo, w), step)
        return out

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
