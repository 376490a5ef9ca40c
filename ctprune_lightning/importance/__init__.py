"""Which units to cut: one score per unit, higher = more important."""

from __future__ import annotations

import inspect
from typing import Any

from .base import Importance, reduce_to_units
from .criteria import MagnitudeImportance, TaylorImportance, TrajectoryImportance

IMPORTANCES: dict[str, type[Importance]] = {
    "magnitude": MagnitudeImportance,
    "taylor": TaylorImportance,
    "trajectory": TrajectoryImportance,
}


def build_importance(name: str, **kwargs: Any) -> Importance:
    """Build an importance criterion by name.

    Raises:
        ValueError: unknown ``name`` (the message lists the allowed ones) or a setting out of range.
        TypeError: a keyword argument the criterion does not take (the message lists the ones it takes).
    """
    if name not in IMPORTANCES:
        raise ValueError(f"Unknown importance {name!r}. Choose one of: {', '.join(IMPORTANCES)}")
    cls = IMPORTANCES[name]
    params = inspect.signature(cls.__init__).parameters.values() if cls.__init__ is not object.__init__ else ()
    allowed = [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unexpected = sorted(k for k in kwargs if k not in allowed)
    if unexpected:
        raise TypeError(f"Unexpected argument(s) {unexpected} for importance {name!r}. "
                        f"Allowed: {', '.join(allowed) if allowed else '(none)'}")
    return cls(**kwargs)


__all__ = [
    "IMPORTANCES",
    "Importance",
    "MagnitudeImportance",
    "TaylorImportance",
    "TrajectoryImportance",
    "build_importance",
    "reduce_to_units",
]
