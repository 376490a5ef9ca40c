"""Size a cut by trial: the largest cut whose measured immediate jump fits what the controller allows.

``trial(u)`` evaluates the cut that removes ``u`` of the dense compute with the planned units masked
out on the probe batches, and returns its immediate log-jump, committing nothing. The jump grows with
``u`` (more units, and the least important go first), so a bisection finds the largest ``u`` on the
planner's grid whose jump is at most ``max_jump``. The first guess scales ``u`` by how far its jump
overshoots (a cut's jump is roughly proportional to its size), which usually lands in one or two trials.

>>> size_cut(lambda u: 0.1 * u, u=0.5, max_jump=0.02, quantum=0.01)   # jump 0.1 per unit: 0.2 fits
0.2
"""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["size_cut"]


def size_cut(trial: Callable[[float], float], u: float, max_jump: float | None, quantum: float = 0.005,
             max_trials: int = 8) -> float:
    """The largest ``u' <= u`` (a multiple of ``quantum``, or ``u`` itself) with ``trial(u') <= max_jump``; 0 if none.

    ``max_jump=None`` accepts ``u`` untried. At most ``max_trials`` evaluations of ``trial``.
    """
    if u <= 0 or max_jump is None:
        return max(u, 0.0)
    if max_jump <= 0:
        return 0.0
    snap = lambda x: math.floor(x / quantum + 1e-9) * quantum  # noqa: E731
    lo, hi = 0.0, u
    guess = u
    for _ in range(max_trials):
        jump = trial(guess)
        if math.isfinite(jump) and jump <= max_jump * (1 + 1e-9):
            lo = guess
            if guess >= hi - 1e-12:
                break
        else:
            hi = guess
            if not math.isfinite(jump):
                jump = math.inf
        if hi - lo <= quantum + 1e-12:
            break
        if lo == 0.0 and math.isfinite(jump) and jump > 0:  # proportional first step from the overshoot
            nxt = snap(guess * 0.98 * max_jump / jump)
        else:
            nxt = snap(0.5 * (lo + hi))
        nxt = min(max(nxt, lo + quantum), hi - quantum) if hi - lo > 2 * quantum else lo + quantum
        if nxt <= lo + 1e-12 or nxt >= hi - 1e-12:
            break
        guess = nxt
    return float(lo)
