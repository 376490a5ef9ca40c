"""Which units to cut: one score per unit, higher = more important."""

from __future__ import annotations

from typing import Any

from ..settings import check_kwargs
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
    check_kwargs("importance", name, cls, kwargs)
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
