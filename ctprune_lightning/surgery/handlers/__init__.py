"""Slice handlers: one file per layer family, found by :func:`~.base.register`.

Every module of this package is imported here, so a new family is one new file with an ``@register``
class and no edit anywhere else. A handler for your own layer type can live anywhere (your project, a test
file): decorate it with ``@register`` before groups are discovered.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (GROW_INITS, REGISTRY, Claim, ClaimContext, GrowInit, OwnGroup, ParamSlice, SliceHandler,
                   all_kinds, claim, handler_for, handler_of_kind, handlers, kinds_with_role, register, role_of, size_attrs,
                   stand_in, traced_layers, unit_of)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "GROW_INITS", "REGISTRY", "Claim", "ClaimContext", "GrowInit", "OwnGroup", "ParamSlice", "SliceHandler",
    "all_kinds", "claim", "handler_for", "handler_of_kind", "handlers", "kinds_with_role", "register", "role_of", "size_attrs",
    "stand_in", "traced_layers", "unit_of",
]
