"""How precisely a cut's immediate jump is measured: a law of the cut, fitted on every jump read in the run.

A jump is read on a few probe batches, the mean of their samples' changes, so it is a sample too. Its
standard error, read from the spread of the per-batch changes, has one degree of freedom on the default
two batches, and it grows steeply with the cut (the MLP's held-out probe on 8 batches, 10% of training:
0.0005 at 10% of the compute removed, 0.004 at 40%, 0.07 at 80%; a jump of 0.02, 0.3 and 1.2). It is
modelled as::

    error² = κ² u² + η² J²        (u: compute removed, J: its log-jump)

the units' own scatter growing with how many go, plus a relative error once the cut really hurts. ``κ, η``
are fitted on the errors of every trial and cut read so far (least squares on ``error²`` relative to the
prior's prediction, each read with its one degree of freedom, non-negative, under the prior ``PRIOR`` with
``PRIOR_WEIGHT`` reads' weight). A cut is taken only if its trial fits with this error to spare, and it adds
the law's error² (never its own reading's, which the trial's selection biased low) to the final damage's
spread.

Example::

    noise = JumpNoise()
    noise.add(size=0.2, jump=0.004, error=0.003)
    noise(0.2, 0.004)       # the law's standard error of a jump of 0.004 by a cut of 0.2
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from scipy.optimize import nnls

__all__ = ["JumpNoise"]

PRIOR = (0.02, 0.1)  # (κ, η) on two probe batches: 0.002 at a 10% cut with no jump, 10% of a large jump
PRIOR_WEIGHT = 1.0  # reads' worth of the prior, per coefficient


class JumpNoise:
    """The standard error of a measured jump as a function of the cut (see the module docstring)."""

    def __init__(self) -> None:
        self.reads: list[tuple[float, float, float]] = []  # (size, log-jump, standard error)
        self._fit: tuple[float, float] | None = None

    def add(self, size: float, jump: float, error: float | None) -> None:
        """A jump read: ``jump`` by a cut of ``size`` (fraction of dense compute), with standard error ``error``
        (``None``: one batch gave no spread; ignored)."""
        if error is None or not all(math.isfinite(x) for x in (size, jump, error)) or size <= 0 or error < 0:
            return
        self.reads.append((float(size), float(jump), float(error)))
        self._fit = None

    @property
    def coefficients(self) -> tuple[float, float]:
        """``(κ, η)``: the fitted law."""
        if self._fit is None:
            k0, e0 = PRIOR
            rows = [[PRIOR_WEIGHT / k0 ** 2, 0.0], [0.0, PRIOR_WEIGHT / e0 ** 2]]
            target = [PRIOR_WEIGHT, PRIOR_WEIGHT]
            for u, j, err in self.reads:
                scale = (k0 * u) ** 2 + (e0 * j) ** 2  # relative: small cuts weigh as much as large ones
                rows.append([u * u / scale, j * j / scale])
                target.append(err * err / scale)
            squares, _ = nnls(np.array(rows), np.array(target))
            self._fit = (math.sqrt(squares[0]), math.sqrt(squares[1]))
        return self._fit

    def __call__(self, size: float, jump: float) -> float:
        kappa, eta = self.coefficients
        return math.hypot(kappa * max(size, 0.0), eta * jump)

    def state_dict(self) -> dict[str, Any]:
        return {"reads": [list(r) for r in self.reads]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reads = [(float(u), float(j), float(e)) for u, j, e in state.get("reads", [])]
        self._fit = None
