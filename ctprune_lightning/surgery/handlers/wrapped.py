"""A slice of any kind whose channels are tied ``n`` to a unit: the shared part of the tiled (grouped convolution,
:mod:`.conv`) and blocked (GroupNorm, :mod:`.blocked`) slices.

Such a slice's kind is ``<prefix><n>:<inner kind>``; :class:`WrappedHandler` cuts it through the inner kind's
handler. A subclass sets ``prefix`` and says which unit an inner channel belongs to (:meth:`unit_of`), which
channels a set of kept units is (:meth:`channels`), and how ``n`` new units are appended (:meth:`grow_`). It is
registered by the subclass (``@register``), not here.
"""

from __future__ import annotations

import re
from typing import ClassVar, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .base import GrowInit, ParamSlice, SliceHandler, handler_for, handler_of_kind, role_of


class _WrappedKinds(dict):
    """``{<prefix><n>:<kind>: role of <kind>}`` for every known inner kind, without listing them."""

    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def parse(self, kind: object) -> tuple[int, str] | None:
        m = self.pattern.match(kind) if isinstance(kind, str) else None
        return (int(m.group(1)), m.group(2)) if m else None

    def __contains__(self, kind: object) -> bool:
        found = self.parse(kind)
        if found is None:
            return False
        try:
            handler_of_kind(found[1])
        except ValueError:
            return False
        return True

    def __getitem__(self, kind: str) -> str:
        if kind not in self:
            raise KeyError(kind)
        return role_of(self.parse(kind)[1])

    def get(self, kind: str, default: object = None) -> object:
        return self[kind] if kind in self else default


class WrappedHandler(SliceHandler):
    """A slice of another kind, ``n`` of whose channels make one unit (see the module docstring)."""

    prefix: ClassVar[str] = ""
    kinds: ClassVar[_WrappedKinds]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.kinds = _WrappedKinds(re.compile(rf"^{cls.prefix}(\d+):(.+)$"))

    @classmethod
    def wrap(cls, n: int, kind: str) -> str:
        """The kind of a slice of ``kind`` whose channels are tied ``n`` to a unit."""
        return f"{cls.prefix}{int(n)}:{kind}"

    @classmethod
    def parse(cls, kind: str) -> tuple[int, str] | None:
        """``(n, inner kind)`` of a wrapped kind, else None."""
        return cls.kinds.parse(kind)

    # ------------------------------------------------------------------------------------ the subclass's part
    def unit_of(self, index: Tensor, n: int, width: int) -> Tensor:
        """The unit (of ``width``) each inner channel ``index`` belongs to."""
        raise NotImplementedError

    def channels(self, keep: Tensor, n: int, width: int) -> Tensor:
        """The inner channels of the kept units ``keep``, in order."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ shared
    def owns(self, module: nn.Module, kind: str) -> bool:
        found = self.parse(kind)
        if found is None:
            return False
        try:
            handler_for(module, found[1])
        except ValueError:
            return False
        return True

    def inner(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]
              ) -> tuple[int, str, SliceHandler, int]:
        """``(n, inner kind, its handler, this slice's width in units)``."""
        n, inner = self.parse(kind)
        h = handler_for(module, inner)
        return n, inner, h, int(h.width(module, inner, block, parts)) // n

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        return self.inner(module, kind, block, parts)[3]

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        n, inner, h, w = self.inner(module, kind, block, parts)
        out = []
        for owner, name, dim, units in h.unit_slices(module, inner, block, parts):
            p = getattr(module.get_submodule(owner) if owner else module, name, None)
            if not isinstance(p, Tensor):
                continue
            base = units if units is not None else torch.arange(p.shape[dim])
            out.append(ParamSlice(owner, name, dim, self.unit_of(base, n, w)))
        return out

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        n, inner, h, w = self.inner(module, kind, block, parts)
        h.shrink_(module, inner, block, parts, self.channels(keep.to(torch.long), n, w), optimizers)

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        raise NotImplementedError

    def grow_refusal(self, module: nn.Module, kind: str) -> str | None:
        inner = self.parse(kind)[1]
        return handler_for(module, inner).grow_refusal(module, inner)

    def scaled_modules(self, module_name: str, kind: str, parts: tuple[str, ...]) -> list[str]:
        inner = self.parse(kind)[1]
        return handler_of_kind(inner).scaled_modules(module_name, inner, parts)
