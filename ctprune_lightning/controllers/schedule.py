"""Open-loop baselines: ``none`` (dense), ``gmp`` (cubic) and ``linear`` compute schedules.

The schedules prescribe a compute setpoint ``c(p)`` as a function of training progress ``p`` and
cut whatever is above it:

    r(p) = clip((p - start) / (end - start), 0, 1)
    gmp:     c(p) = c* + (1 - c*) * (1 - r(p))**3       (Zhu & Gupta 2017, on the compute fraction)
    linear:  c(p) = c* + (1 - c*) * (1 - r(p))
    u_k = max(0, c_k - c(p_k))

They ignore the damage signal entirely: that is what makes them baselines.

>>> ctl = GMPController(target=0.3, start=0.0, end=0.2)
>>> round(ctl.setpoint(0.1), 4)
0.3875
"""

from __future__ import annotations

from .base import Controller, Observation, cap_action, check_number

__all__ = ["NoneController", "GMPController", "LinearController"]


class NoneController(Controller):
    """Dense baseline: never cuts (``u = 0``). ``target`` is accepted and ignored."""

    name = "none"

    reads_damage = False

    def __init__(self, target: float = 1.0) -> None:
        super().__init__(target)

    def step(self, obs: Observation) -> float:
        return 0.0


class _RampController(Controller):
    """Shared machinery of the open-loop ramps; subclasses define :meth:`shape`."""

    reads_damage = False  # a schedule of progress only

    def __init__(self, target: float, start: float = 0.0, end: float = 0.15) -> None:
        super().__init__(target)
        self.start = check_number("start", start, 0.0, 1.0)
        self.end = check_number("end", end, 0.0, 1.0)
        if not self.start < self.end:
            raise ValueError(f"`start` must be < `end`, got start={start!r}, end={end!r}")

    @staticmethod
    def shape(remaining: float) -> float:
        """Fraction of the removable compute ``1 - c*`` still kept, given ``1 - r(p)`` in [0, 1]."""
        raise NotImplementedError

    def setpoint(self, progress: float) -> float:
        """Scheduled compute ``c(p) = c* + (1 - c*) * shape(1 - r(p))``."""
        r = min(max((float(progress) - self.start) / (self.end - self.start), 0.0), 1.0)
        return self.target + (1.0 - self.target) * self.shape(1.0 - r)

    def step(self, obs: Observation) -> float:
        return cap_action(obs.compute - self.setpoint(obs.progress), obs.compute, self.target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target}, start={self.start}, end={self.end})"


class GMPController(_RampController):
    """Gradual magnitude pruning schedule (cubic): ``c(p) = c* + (1 - c*)(1 - r)^3``.

    Args:
        target: final compute fraction ``c*`` in ``(0, 1]``.
        start: progress at which cutting starts, in ``[0, 1]``.
        end: progress by which ``c*`` is reached, in ``(start, 1]``.
    """

    name = "gmp"

    @staticmethod
    def shape(remaining: float) -> float:
        return remaining**3


class LinearController(_RampController):
    """Linear compute ramp: ``c(p) = c* + (1 - c*)(1 - r)``; arguments as :class:`GMPController`."""

    name = "linear"

    @staticmethod
    def shape(remaining: float) -> float:
        return remaining

