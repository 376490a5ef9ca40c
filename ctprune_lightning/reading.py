"""When a quality budget reads the model, and what a reading must repay.

Every reading costs forwards (the probe batches, the trial cuts, the check of a sized cut on more batches) that
the cuts it leads to must pay back. :class:`ReadSchedule` decides, at each control interval, whether to read
(:meth:`ReadSchedule.due`: ``""``, or why not) and learns from what each reading's plan did
(:meth:`ReadSchedule.note`):

* the **sensing budget**: the forwards so far at most ``sense_budget`` of the training FLOPs so far (counted in
  FLOPs, not seconds, so a run decides alike on any machine and a resumed run as the uninterrupted one);
* the **backoff**: the ``n``-th reading in a row that found nothing to do (the budget spent with no growth to
  watch for, or no cut that fits repays its sizing) skips the next ``2ⁿ − 1`` intervals; any other outcome reads
  every interval again;
* **idle**: no cut was made and none that repays its sizing fits; no later reading can change that, so none is
  made.

:func:`sizing_price` is the smallest cut (a fraction of the dense compute) whose saving over the rest of the run
repays the most a sizing and its check can cost. :class:`~ctprune_lightning.loop.ControlLoop` asks both; they hold
no model, so the simulated-plant harness (``tests/sim/plant.py``) asks them too and reads when the loop would.

Example::

    reads = ReadSchedule(sense_budget=0.03)
    reads.due(step=40, sensing_flops=2.0, train_flops=100.0)    # "" -> read this interval
    reads.note(step=40, quiet=True, interval=10)                 # found nothing to do: skip step 50
    reads.due(step=50, sensing_flops=2.0, train_flops=110.0)    # "backoff: 1 reading(s) in a row ..."
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["SIZING_TRIALS", "CONFIRM_READS", "ReadSchedule", "check_sense_budget", "likely_cut", "sizing_price"]

#: The most trial readings one sizing makes (:func:`ctprune_lightning.controllers.sizing.size_cut`).
SIZING_TRIALS = 8
#: The reads of the confirm batches one check of a sized cut makes at most (before, the cut, the cut scaled down).
CONFIRM_READS = 3


def check_sense_budget(value: Any) -> float | None:
    """``sense_budget``: None (no limit) or the share of the training FLOPs the sensing's forwards may take, in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"sense_budget must be null or a share of the training FLOPs in (0, 1], e.g. 0.03; "
                         f"got {value!r}")
    return float(value)


def sizing_price(reading_flops: float, confirm_flops: float, dense_step_flops: float, remaining_steps: int) -> float:
    """The smallest cut (fraction of the dense compute) whose training FLOPs saved over the ``remaining_steps``
    repay the most its sizing and check can cost: :data:`SIZING_TRIALS` readings of the probe (``reading_flops``
    each, at the current width) and :data:`CONFIRM_READS` of the confirm batches (``confirm_flops`` each); ``inf``
    when nothing is left to repay it."""
    if dense_step_flops <= 0 or remaining_steps <= 0:
        return math.inf
    cost = SIZING_TRIALS * reading_flops + CONFIRM_READS * confirm_flops
    return cost / (dense_step_flops * remaining_steps)


def likely_cut(u: float, max_jump: float, jump_rate: float | None) -> float:
    """The cut (fraction of the dense compute) a sizing of the request ``u`` under ``max_jump`` is likely to find:
    ``u``, or less at the log-jump per unit of compute the last cut measured (``jump_rate``; none or <= 0: ``u``).
    Where it is below :func:`sizing_price`, the sizing is not worth running."""
    return u if not jump_rate or jump_rate <= 0 else min(u, max_jump / jump_rate)


class ReadSchedule:
    """Whether a quality budget's control interval is read (see the module docstring).

    Args:
        sense_budget: the most the forwards of the readings may cost, as a share of the training FLOPs so far
            (None: no limit).
    """

    def __init__(self, sense_budget: float | None = None) -> None:
        self.sense_budget = check_sense_budget(sense_budget)
        self.idle = ""  # why no reading is made any more ("" while the loop reads)
        self.quiet = 0  # readings in a row that found nothing to do
        self.read_after = 0  # ... so the next reading is due at this step

    def due(self, step: int, sensing_flops: float, train_flops: float, capped: bool = True) -> str:
        """Why the interval at ``step`` is not read (``""`` when it is due). ``capped``: whether the sensing budget
        applies (not to the first interval, nor to a controller that reads no damage)."""
        if self.idle:
            return self.idle
        if step < self.read_after:
            return (f"backoff: {self.quiet} reading(s) in a row found nothing to do (budget spent, or no cut that "
                    f"repays its sizing); the next at step {self.read_after}")
        if self.sense_budget is None or not capped or sensing_flops <= self.sense_budget * train_flops:
            return ""
        return (f"sensing budget: the probe's forwards so far are {sensing_flops / max(train_flops, 1e-9):.1%} of "
                f"the training FLOPs > {self.sense_budget:.1%}")

    def note(self, step: int, quiet: bool, interval: int) -> None:
        """After the reading at ``step``: ``quiet`` when its plan found nothing to do (control intervals of
        ``interval`` steps). The ``n``-th such reading in a row makes the next due at ``step + interval · 2ⁿ``;
        any other outcome reads every interval again."""
        if not quiet:
            self.quiet, self.read_after = 0, 0
            return
        self.quiet += 1
        self.read_after = step + interval * 2 ** self.quiet

    def next_due(self, step: int, interval: int, sensing_flops: float, train_flops: float, interval_flops: float,
                 capped: bool = True) -> int | None:
        """The first control step after ``step`` (every ``interval`` steps) whose reading :meth:`due` allows, if
        nothing is read until then and each interval adds ``interval_flops`` of training FLOPs; None when idle, or
        when the sensing budget is spent and the training adds nothing to it."""
        if self.idle:
            return None
        k, cap = 1, self.sense_budget
        if cap is not None and capped and sensing_flops > cap * (train_flops + interval_flops):
            if interval_flops <= 0:
                return None
            k = math.ceil((sensing_flops / cap - train_flops) / interval_flops - 1e-9)
        k = max(k, math.ceil((self.read_after - step) / interval))
        return step + k * interval

    def go_idle(self, reason: str) -> None:
        """Read no more, because of ``reason``."""
        self.idle = reason + "; no further reading"

    def state_dict(self) -> dict[str, Any]:
        return {"idle": self.idle, "quiet": self.quiet, "read_after": self.read_after}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.idle = str(state.get("idle", ""))
        self.quiet, self.read_after = int(state.get("quiet", 0)), int(state.get("read_after", 0))
