"""Channels cut in blocks: a GroupNorm of several groups ties its channels into groups of ``C / num_groups``.

A group coupled to such a GroupNorm is cut in whole GroupNorm groups: unit ``k`` is the channels
``k*b .. (k+1)*b - 1`` of every slice (``b`` = the channels per group; for several GroupNorms in one group, the
least common multiple of theirs). Discovery wraps each slice of the group (:func:`block_slices`) as kind
``blocked<b>:<kind>`` (:func:`blocked_kind`), which :class:`BlockedHandler` cuts through the inner kind's handler
with each kept unit expanded to its ``b`` channels. A group also tied to a grouped convolution (whose units take
one channel from each of its groups, :mod:`.conv`) is refused: no one unit fits both.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn
from torch.optim import Optimizer

from ..shrink import expand_units
from .base import GrowInit, register
from .conv import parse_tiled
from .wrapped import WrappedHandler


def blocked_kind(block: int, kind: str) -> str:
    """The kind of a slice whose channel ``c`` belongs to unit ``c // block``."""
    return BlockedHandler.wrap(block, kind)


def block_slices(slices: Sequence, module_of: "dict[str, nn.Module]") -> tuple[list, str | None]:
    """A traced group's slices, each wrapped as blocked when a GroupNorm of several groups is among them, or a
    reason to refuse (the group is also tiled by a grouped convolution)."""
    norms = [s for s in slices if isinstance(module_of.get(s.module), nn.GroupNorm)
             and module_of[s.module].num_groups > 1]
    if not norms:
        return list(slices), None
    names = [s.module for s in norms]
    if any(parse_tiled(s.kind) is not None for s in slices):
        return list(slices), (f"coupled to GroupNorm {names} and a grouped convolution: the GroupNorm is cut in whole "
                              "groups, the convolution one channel per group; no one unit fits both")
    block = math.lcm(*(module_of[s.module].num_channels // module_of[s.module].num_groups for s in norms))
    return [type(s)(s.module, blocked_kind(block, s.kind), s.block, s.parts) for s in slices], None


@register
class BlockedHandler(WrappedHandler):
    """A slice of any kind coupled to a GroupNorm's channels: channel ``c`` is unit ``c // block``."""

    prefix = "blocked"
    priority = 82

    def unit_of(self, index: Tensor, n: int, width: int) -> Tensor:
        return index.div(n, rounding_mode="floor")

    def channels(self, keep: Tensor, n: int, width: int) -> Tensor:
        return expand_units(keep, n)

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        """Append ``block * n`` inner units: ``n`` whole blocks at the end."""
        b, inner, h, _ = self.inner(module, kind, block, parts)
        h.grow_(module, inner, block, parts, b * n, optimizers, init)
