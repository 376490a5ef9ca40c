"""Which units to cut: one score per unit, higher = more important."""

from __future__ import annotations

from typing import Any

from .base import Importance, reduce_to_units
from .criteria import MagnitudeImportance, TaylorImportance, TrajectoryImportance

IMPORTANCES: dict[str, type[Importance]] = {
    "magnitude": MagnitudeImportance,
    "taylor": TaylorImportance,
    "trajectory": TrajectoryImportance,
}


def build_importance(name: str, **kwargs: Any) -> Importance:
    """Build an importance criterion by name; unknown names raise with the allowed ones."""
    if name not in IMPORTANCES:
        raise ValueError(f"Unknown importance {name!r}. Choose one of: {', '.join(IMPORTANCES)}")
    return IMPORTANCES[name](**kwargs)


__all__ = [
    "IMPORTANCES",
    "Importance",
    "MagnitudeImportance",
    "TaylorImportance",
    "TrajectoryImportance",
    "build_importance",
    "reduce_to_units",
]
