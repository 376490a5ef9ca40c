"""CompreSSM's schedule: balanced truncation of SSM layers at a few early events (reference §4).

Not a compute controller: at each event it asks the callback to choose every SSM layer's rank from
its Hankel singular values — by energy tolerance τ (the paper's linear-σ criterion, per layer) or by
a fixed fraction — with the paper's 5% gate (a layer is cut only if r < gate·N). The paper's default
is 4 equidistant events in the first 10% of training::

    events at progress  horizon·k/events,  k = 1..events   (0.025, 0.05, 0.075, 0.1)

>>> ctl = HankelController(tau=0.05)
>>> ctl.rank_event(Observation(step=10, progress=0.03, compute=1.0, damage=0.0))
{'mode': 'tolerance', 'tau': 0.05, 'fraction': 0.1, 'gate': 0.95}
>>> ctl.rank_event(Observation(step=11, progress=0.031, compute=1.0, damage=0.0)) is None
True
"""

from __future__ import annotations

from typing import Any

from .base import Controller, Observation, check_number

__all__ = ["HankelController"]

RANK_MODES = ("tolerance", "fraction")


class HankelController(Controller):
    """CompreSSM events (``rank_event``); never cuts by compute (``step`` returns 0).

    Args:
        target: unused floor kept for the common interface (compute never goes below it).
        tau: energy tolerance of the ``tolerance`` mode, in (0, 1).
        mode: ``tolerance`` or ``fraction`` (cut ``fraction`` of each layer's states per event).
        fraction: the ``fraction`` mode's cut per event, in (0, 1).
        events: number of reduction events; horizon: the last event's training progress, in (0, 1].
        gate: a layer is cut only when the new rank is below ``gate`` × its current size.
        rollback: the paper's pragmatic mode: after each event, wait for the next validation; if the
            monitored metric got worse by more than ``rollback_tol``, undo the event and stop reducing.
        rollback_monitor / rollback_higher_is_better: the validation metric and its direction.
    """

    name = "hankel"

    def __init__(self, target: float = 0.01, tau: float = 0.02, mode: str = "tolerance", fraction: float = 0.1,
                 events: int = 4, horizon: float = 0.1, gate: float = 0.95, rollback: bool = False,
                 rollback_tol: float = 0.0, rollback_monitor: str = "val/acc",
                 rollback_higher_is_better: bool = True) -> None:
        super().__init__(target)
        if mode not in RANK_MODES:
            raise ValueError(f"HankelController: mode={mode!r} is not supported; choose one of {RANK_MODES}")
        if isinstance(events, bool) or not isinstance(events, int) or events < 1:
            raise ValueError(f"HankelController: `events` must be an integer >= 1, got {events!r}")
        self.tau = check_number("tau", tau, 0.0, 1.0, low_open=True, high_open=True)
        self.fraction = check_number("fraction", fraction, 0.0, 1.0, low_open=True, high_open=True)
        self.horizon = check_number("horizon", horizon, 0.0, 1.0, low_open=True)
        self.gate = check_number("gate", gate, 0.0, 1.0, low_open=True)
        self.mode, self.events = mode, events
        self.rollback, self.rollback_tol = bool(rollback), check_number("rollback_tol", rollback_tol)
        self.rollback_monitor, self.rollback_higher_is_better = str(rollback_monitor), bool(rollback_higher_is_better)
        self.reset()

    def reset(self) -> None:
        self.done = 0  # events fired so far
        self.stopped = False  # a rollback happened: no more events

    def step(self, obs: Observation) -> float:
        return 0.0

    def due(self, progress: float) -> bool:
        """Whether an event point has been reached (the callback then runs a control interval now)."""
        return (not self.stopped and self.done < self.events
                and progress >= self.horizon * (self.done + 1) / self.events)

    def rank_event(self, obs: Observation) -> dict[str, Any] | None:
        """The rank rule to apply now, once per event point passed; None between events."""
        if not self.due(obs.progress):
            return None
        while self.done < self.events and obs.progress >= self.horizon * (self.done + 1) / self.events:
            self.done += 1  # a late first call fires once, not once per missed point
        return {"mode": self.mode, "tau": self.tau, "fraction": self.fraction, "gate": self.gate}

    def worse(self, before: float, after: float) -> bool:
        """Whether the validation metric moved the wrong way by more than ``rollback_tol``."""
        change = (after - before) if self.rollback_higher_is_better else (before - after)
        return change < -self.rollback_tol

    def state_dict(self) -> dict[str, Any]:
        return {"done": int(self.done), "stopped": bool(self.stopped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = int(state.get("done", 0))
        self.stopped = bool(state.get("stopped", False))
