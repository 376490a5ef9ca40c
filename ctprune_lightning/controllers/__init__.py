"""Compute controllers: decide how much compute to remove each control interval (the plant model is in the README, "Controllers").

>>> ctl = build_controller("lqr", target=0.3, u_max=0.1)
>>> ctl.step(Observation(step=0, progress=0.0, compute=1.0, damage=0.0))
0.1

Only numpy and the standard library are imported here, so ``import ctprune_lightning`` stays light.
"""

from __future__ import annotations

from typing import Any

from ..settings import check_kwargs
from .base import Controller, Observation
from .hankel import HankelController
from .lqr import LQRController, lqr_gain, solve_dare
from .pid import PIDController
from .plant import PlantEstimator, RecursiveLeastSquares, linear_system
from .schedule import GMPController, LinearController, NoneController

__all__ = [
    "CONTROLLERS",
    "Controller",
    "GMPController",
    "HankelController",
    "LQRController",
    "LinearController",
    "NoneController",
    "Observation",
    "PIDController",
    "PlantEstimator",
    "RecursiveLeastSquares",
    "build_controller",
    "linear_system",
    "lqr_gain",
    "solve_dare",
]

CONTROLLERS = ("none", "gmp", "linear", "pid", "lqr", "hankel")

_REGISTRY: dict[str, type[Controller]] = {
    "none": NoneController,
    "gmp": GMPController,
    "linear": LinearController,
    "pid": PIDController,
    "lqr": LQRController,
    "hankel": HankelController,
}


def build_controller(name: str, target: float, **kwargs: Any) -> Controller:
    """Build the controller registered as ``name`` (one of :data:`CONTROLLERS`).

    Raises:
        ValueError: unknown ``name`` or an argument out of range.
        TypeError: a keyword argument the controller does not take.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"Unknown controller {name!r}. Choose one of: {', '.join(CONTROLLERS)}")
    cls = _REGISTRY[key]
    check_kwargs("controller", key, cls, kwargs, fixed=("target",))
    return cls(target=target, **kwargs)
