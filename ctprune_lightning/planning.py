"""Turn "remove this much compute" into a plan ``{group: kept indices}``.

Widths step down one rounding step (``round_to``) of one group at a time, the group that has kept the
largest share of its dense width first, until the *predicted* FLOPs reach the requested level; a
plan never cuts below the controller's floor. Prediction uses the per-module FLOPs of the current
architecture: a Linear's cost scales with (in-width ratio) × (out-width ratio). Importance picks
which units stay. Given a measured :class:`~ctprune_lightning.cost.CostModel`, a step goes to the next
width on the group's cost frontier (never to a width measured no faster than a wider one), and
``predict`` may state the target in modelled time instead of FLOPs.

Example::

    widths = plan_widths(current, per_module, total, groups, target_flops, min_width=8, round_to=8)
    keep = select_units(scores, widths["net.1"])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Sequence

import torch
from torch import Tensor

from .surgery.groups import PrunableGroup

if TYPE_CHECKING:
    from .cost import CostModel

#: A group may take the next step only while its kept share of width is within this of the largest one,
#: so small requests cannot drive one narrow group to its floor while the others stay wide.
BALANCE_BAND = 0.15


def exclusive_flops(per_module: Mapping[str, int]) -> dict[str, int]:
    """Each module's own FLOPs: its count minus its direct children's (FlopCounterMode counts are inclusive)."""
    own = dict(per_module)
    for name, flops in per_module.items():
        parent = name.rpartition(".")[0]
        if parent and parent in own:
            own[parent] -= flops
    return own


def flop_predictor(
    widths: Mapping[str, int], per_module: Mapping[str, int], total: int, groups: Sequence[PrunableGroup],
) -> Callable[[Mapping[str, int]], float]:
    """``predict(new_widths)``: the FLOPs per step after changing ``widths`` to ``new_widths`` (first-order in each
    width), with what does not depend on the new widths worked out once (a planner asks thousands of times).

    A module's own FLOPs scale with the product of the width ratios of the groups that cut it: a
    Linear or a Conv by (in ratio) × (out ratio), an attention module's own cost (SDPA) by its head
    ratio. Counts of parent modules are made exclusive so nothing is scaled twice.
    """
    own = exclusive_flops(per_module)
    scaled = [(g.name, g.scaled_modules()) for g in groups]

    def predict(new_widths: Mapping[str, int]) -> float:
        ratio = _module_ratios(scaled, widths, new_widths)
        return total + sum(own[m] * (ratio[m] - 1.0) for m in own if m in ratio)

    return predict


def _module_ratios(scaled: Sequence[tuple[str, Collection[str]]], widths: Mapping[str, int],
                   new_widths: Mapping[str, int]) -> dict[str, float]:
    """Each scaled module's FLOP ratio: the product of the width ratios of the groups that cut it."""
    ratio: dict[str, float] = {}
    for name, modules in scaled:
        r = new_widths[name] / widths[name]
        for m in modules:
            ratio[m] = ratio.get(m, 1.0) * r
    return ratio


def predict_count(
    widths: Mapping[str, int], per_module: Mapping[str, int], total: int, groups: Sequence[PrunableGroup],
    new_widths: Mapping[str, int],
) -> tuple[int, dict[str, int]]:
    """(FLOPs per step, per module) after changing ``widths`` to ``new_widths``, in the form a count takes: each
    module's own FLOPs scaled as :func:`flop_predictor` scales them and rounded, then summed into its parents
    again (the inverse of :func:`exclusive_flops`)."""
    own = exclusive_flops(per_module)
    ratio = _module_ratios([(g.name, g.scaled_modules()) for g in groups], widths, new_widths)
    new_own = {m: round(f * ratio.get(m, 1.0)) for m, f in own.items()}
    inclusive = dict(new_own)
    for name in sorted(inclusive, key=lambda n: n.count("."), reverse=True):
        parent = name.rpartition(".")[0]
        if parent and parent in inclusive:
            inclusive[parent] += inclusive[name]
    return total + sum(new_own[m] - own[m] for m in own), inclusive


def predict_flops(
    widths: Mapping[str, int],
    new_widths: Mapping[str, int],
    per_module: Mapping[str, int],
    total: int,
    groups: Sequence[PrunableGroup],
) -> float:
    """FLOPs per step after changing ``widths`` to ``new_widths``: one prediction of :func:`flop_predictor` (build the
    predictor once where many are asked)."""
    return flop_predictor(widths, per_module, total, groups)(new_widths)


def group_floor(group: PrunableGroup, min_width: int) -> int:
    """The one rule for a group's minimum width: its own limit (``group_limits``) when it has one, else the
    planner's ``min_width`` -- as discovery decides which groups are too small (channels, heads and SSM states)."""
    return int(min_width if group.min_width is None else group.min_width)


def _step_down(width: int, lo: int, step: int, allowed: Callable[[int], bool] | None = None) -> int | None:
    """The next allowed width below ``width``: the largest multiple of ``step`` under it, >= ``lo``, that
    ``allowed`` accepts (a cost model's frontier; default: any)."""
    while True:
        w = max(lo, (width - 1) // step * step)
        if w >= width:
            return None
        if allowed is None or allowed(w):
            return w
        width = w


def plan_widths(
    widths: Mapping[str, int],
    per_module: Mapping[str, int],
    total: int,
    groups: Sequence[PrunableGroup],
    target_flops: float,
    min_width: int = 1,
    round_to: int = 1,
    floor_flops: float | None = None,
    reference: Mapping[str, int] | None = None,
    cost: CostModel | None = None,
    predict: Callable[[Mapping[str, int]], float] | None = None,
) -> dict[str, int]:
    """New width per group whose predicted FLOPs come closest to ``target_flops``.

    Greedy, one rounding step of one group at a time: of the steps that stay at or above the target,
    taken by groups whose kept share of their ``reference`` width (default: the current width; the
    callback passes the dense widths) is within ``BALANCE_BAND`` of the largest share, the group with
    the largest share takes the next one, so groups shrink in proportion with the granularity of a
    single step of a single group. When no such step fits, the leading group's step is taken if it
    lands closer to the target than no cut, but nothing goes below ``floor_flops`` (default: the
    target itself, i.e. never cut more than asked). Returns the current widths when nothing fits.

    With ``cost`` (a measured :class:`~ctprune_lightning.cost.CostModel`), every step lands on the group's
    cost frontier. ``predict(widths)`` replaces the FLOP prediction (``total``, ``target_flops`` and
    ``floor_flops`` are then in its unit, e.g. the cost model's modelled seconds per step).
    """
    if predict is None:
        predict = flop_predictor(widths, per_module, total, groups)
    floor = target_flops if floor_flops is None else floor_flops
    reference = reference or widths
    limits = {g.name: (group_floor(g, min_width), round_to if g.round_to is None else g.round_to) for g in groups}
    new, flops = dict(widths), float(total)
    while flops > target_flops:
        trials = []
        for n, w in new.items():
            lo, step = limits.get(n, (min_width, round_to))
            down = _step_down(w, min(lo, w), step, None if cost is None else lambda x, n=n: cost.allowed(n, x))
            if down is not None:
                trial = {**new, n: down}
                trials.append((new[n] / reference[n], w, n, trial, predict(trial)))
        if not trials:
            break
        top = max(t[0] for t in trials)
        fitting = [t for t in trials if t[4] >= target_flops and t[0] >= top - BALANCE_BAND]
        if fitting:  # of the groups near the largest kept share, the one with the largest share steps
            *_, new, flops = max(fitting, key=lambda t: t[:3])
            continue
        # no step fits within the band: the leading group's step, if it lands closer than no cut and >= floor
        *_, trial, trial_flops = max(trials, key=lambda t: t[:3])
        if trial_flops >= floor and target_flops - trial_flops < flops - target_flops:
            new = trial
            break
        # else a fitting step of a group that kept at least half the leading share (no deadlock, bounded skew)
        fitting = [t for t in trials if t[4] >= target_flops and t[0] >= top / 2]
        if not fitting:
            break
        *_, new, flops = max(fitting, key=lambda t: t[:3])
    return new


def select_units(scores: Tensor, width: int) -> Tensor:
    """Indices (sorted) of the ``width`` highest scores; ties keep the lower index."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return order[:width].sort().values


def plan_growth(widths: Mapping[str, int], history: Sequence[Mapping[str, Any]], dense_widths: Mapping[str, int],
                refused: Collection[str], request: float, round_to: int = 1) -> dict[str, int]:
    """``{group: units to add}`` giving back about ``request`` of the dense compute, from the cuts recorded in
    ``history`` (``{"widths", "compute"}`` after each surgery), the last one first: each cut's groups grow in
    proportion to the units it took (its compute taken as proportional to them), never above their width before
    it nor their dense width; ``refused`` groups (no function-preserving growth: a LayerNorm's, tied weights)
    are left as they are."""
    cuts, before, before_c = [], dict(dense_widths), 1.0
    for h in history:
        if h["compute"] < before_c - 1e-9 and "rollback_to_step" not in h:
            cuts.append((before, dict(h["widths"]), before_c - h["compute"]))
        before, before_c = dict(h["widths"]), h["compute"]
    have, grow, left = dict(widths), {}, float(request)
    for b, a, removed in reversed(cuts):
        taken = {n: b[n] - a[n] for n in a if n in b and n in have and b[n] > a[n]}
        missing = {n: max(0, min(b[n], dense_widths.get(n, b[n])) - have[n]) for n in taken if n not in refused}
        if not sum(missing.values()):
            continue
        still = removed * sum(missing.values()) / sum(taken.values())  # this cut's compute not yet given back
        share = min(1.0, left / still)
        for n, d in missing.items():
            k = min(d, round_to * math.ceil(share * d / round_to))
            if k > 0:
                grow[n], have[n] = grow.get(n, 0) + k, have[n] + k
        left -= share * still
        if left <= 1e-9:
            break
    return grow
