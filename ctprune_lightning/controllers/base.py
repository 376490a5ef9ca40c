"""The controller protocol: an :class:`Observation` in, a cut ``u`` out.

Each control interval ``k`` the pruning callback measures the plant and asks the controller how much
compute to remove::

    obs = Observation(step=120, progress=0.05, compute=0.82, damage=0.01, jump=0.004, last_action=0.1)
    u = controller.step(obs)          # fraction of DENSE FLOPs per step to remove now, u >= 0

Sign conventions shared by every controller:

* ``e_k = c_k - c*`` is the compute above the setpoint ``c* = target``; the plant integrates the cut,
  ``e_{k+1} = e_k - u_k``.
* ``0 <= u_k <= max(0, c_k - c*)``: a controller never asks to cut below its target.

Controllers are small, deterministic objects; their ``state_dict`` holds plain Python values only so
the callback can put it straight into a Lightning checkpoint (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

__all__ = ["Observation", "Controller", "check_number", "cap_action", "sanitize_damage"]


@dataclass(frozen=True)
class Observation:
    """What the callback measured at the start of control interval ``k``.

    Attributes:
        step: optimizer step (``trainer.global_step``) at which the interval starts.
        progress: ``step / total_steps`` in ``[0, 1]``.
        compute: ``c_k`` = FLOPs per step of the current net / dense FLOPs per step, in ``(0, 1]``.
        damage: ``d_k >= 0``, unrecovered relative loss damage on the fixed probe batch,
            ``max(0, L_probe_now - L_best) / L_best``, measured *before* this interval's cut.
        jump: immediate relative probe-loss jump caused by the previous interval's cut
            (``(L_after - L_before) / L_best`` around that surgery), ``None`` if there was no cut.
        last_action: ``u_{k-1}`` actually applied last interval (after the callback's clamping and
            rounding), ``0.0`` if none.
        final_damage / final_std / damage_std / reference / rho: with a quality budget, the damage
            sensor's reading (:mod:`ctprune_lightning.sensing`): the predicted damage at the end of
            training and its standard deviation, the current damage's, the estimated dense loss now,
            and the persistent fraction of a cut's damage; ``damage`` is then the sensor's current
            damage (loss now vs the dense reference now). ``None`` / ``0.0`` without a budget.
        next_factor / next_factor_std: the sensor's final damage per unit of immediate log-jump of a
            cut made now (how much of it will persist), and its standard deviation.
        jump_noise: ``κ``, a measured jump's standard error per unit of compute removed where the jump is small
            (reported; the trial's margin is the sensor's whole law, :mod:`ctprune_lightning.jump_noise`).
        cut_damage_rate: with a quality budget, the predicted final damage per unit of dense compute the cuts
            removed (``final_damage / (1 − compute)``, the sensor's damage being the sum of the cuts'); ``None``
            before any cut. Sizes a growth (:mod:`.budget`).
        sensed: False when the probe was not read this interval (the sensing budget): ``damage`` is NaN and
            means "not measured", not "blown up"; a feedback controller holds its last reading and learns nothing.
    """

    step: int
    progress: float
    compute: float
    damage: float
    jump: float | None = None
    last_action: float = 0.0
    final_damage: float | None = None
    final_std: float = 0.0
    damage_std: float = 0.0
    reference: float | None = None
    rho: float | None = None
    next_factor: float | None = None
    next_factor_std: float = 0.0
    jump_noise: float = 0.0
    cut_damage_rate: float | None = None
    sensed: bool = True


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``float(value)`` or raise ``ValueError`` naming the value and the allowed range.

    >>> check_number("u_max", 0.1, 0.0, 1.0, low_open=True)
    0.1
    """
    lo_b, hi_b = ("(" if low_open else "["), (")" if high_open else "]")
    allowed = f"{lo_b}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi_b}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a real number in {allowed}, got {value!r}")
    x = float(value)
    bad = not math.isfinite(x)
    if low is not None:
        bad = bad or (x <= low if low_open else x < low)
    if high is not None:
        bad = bad or (x >= high if high_open else x > high)
    if bad:
        raise ValueError(f"`{name}` must be in {allowed}, got {value!r}")
    return x


def cap_action(u: float, compute: float, target: float, u_max: float = math.inf) -> float:
    """Saturate a raw action: ``u <- min(max(u, 0), u_max, max(0, c_k - c*))``; NaN gives 0."""
    if not (math.isfinite(u) and math.isfinite(compute)):
        return 0.0
    return float(min(max(u, 0.0), u_max, max(0.0, compute - target)))


def sanitize_damage(damage: float) -> float:
    """Damage as a safe float: negative values read 0, NaN/inf read +inf (the loss blew up)."""
    d = float(damage)
    return math.inf if not math.isfinite(d) else max(d, 0.0)


class Controller(ABC):
    """Base class of all compute controllers.

    Subclasses implement :meth:`step`, and :meth:`reset` / :meth:`state_dict` /
    :meth:`load_state_dict` when they carry state between intervals.

    Args:
        target: compute setpoint ``c*`` as a fraction of dense FLOPs per step, in ``(0, 1]``.

    Event controllers (CompreSSM's schedule) also override :meth:`due` and :meth:`rank_event`, and may
    set ``rollback`` to have the loop undo an event that made ``rollback_monitor`` worse.
    """

    name: str = "base"
    #: the quality budget this controller runs on (``None``: it drives compute to ``target``); see :meth:`set_budget`
    budget: float | None = None
    #: why the last :meth:`step` held back (empty when it cut)
    reason: str = ""
    #: the largest immediate log-jump the cut asked for by the last :meth:`step` may cause (``None``: no limit);
    #: the loop sizes the cut by trial under it
    max_jump: float | None = None
    #: the compute (fraction of dense FLOPs per step) the last :meth:`step` asks the loop to add back by growing the
    #: groups cut last (0: none; the budget mode's ``grow``); the loop reports a realised growth as a negative
    #: ``last_action``
    grow_request: float = 0.0
    #: undo an event that made the validation metric ``rollback_monitor`` worse (see :meth:`worse`)
    rollback: bool = False
    rollback_monitor: str | None = None
    #: the compute error ``c - c*`` within which a compute-target :meth:`step` never cuts (LQR's deadband); the loop
    #: stops tracking importance and reading the probe once no cut down to ``c* + settle`` changes a width
    settle: float = 0.0
    #: whether :meth:`step` reads ``Observation.damage`` (an open-loop schedule does not: the loop then pays for
    #: no probe reading)
    reads_damage: bool = True
    #: whether the last :meth:`step` held because its quality budget is spent and it may not grow: only a change of
    #: the damage estimate can make it act again, so the loop reads less often (``ControlLoop.sensing_due``)
    spent: bool = False

    def __init__(self, target: float) -> None:
        self.target = check_number("target", target, 0.0, 1.0, low_open=True)
        self.stopped = False  # set by the loop after a rollback: no more events

    @abstractmethod
    def step(self, obs: Observation) -> float:
        """Return ``u_k >= 0``, the fraction of dense compute to remove this interval."""

    def set_budget(self, budget: float) -> None:
        """Run on a quality budget instead of a compute target (``target`` becomes the floor).

        Only the feedback controllers (``lqr``, ``pid``) have a budget mode; the others raise ``ValueError``.
        """
        raise ValueError(f"quality_budget={budget!r} needs controller 'lqr' or 'pid' (the feedback controllers), "
                         f"got {self.name!r}")

    def due(self, progress: float) -> bool:
        """Whether the controller wants a control interval now, between the regular ones."""
        return False

    def rank_event(self, obs: Observation) -> dict[str, Any] | None:
        """A rank rule for the SSM layers to apply now (``mode``, ``tau``, ``fraction``, ``gate``), or None."""
        return None

    def worse(self, before: float, after: float) -> bool:
        """Whether the rollback monitor moved from ``before`` to ``after`` the wrong way."""
        return False

    def reset(self) -> None:
        """Forget everything learned since construction (stateless controllers: no-op)."""

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (floats, ints, lists, None) sufficient to resume identically."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` produced; missing keys fall back to defaults."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target})"
