"""Can the budget sensor tell a cut that heals from one that stays, given one large early cut? (issue 16 analysis)

    python experiments/identify_rho.py            # 40 simulated plants per row, prints a table; writes nothing

On the simulated plants of ``tests/sim/plant.py`` (their recovery rates a ∈ [0.9, 0.995] per interval, persistent
shares ρ ∈ [0, 1.2], probe and training noise as measured on the suite), one cut with an immediate log-jump ``J`` is
made at 5% of training, and both channels are read at every interval (no sensing budget) for ``watch`` intervals
after it. The table gives how well the sensor's ρ follows each plant's true ρ (their correlation and the mean
absolute error), and the final damage it predicts against the truth (medians, per unit of ``J``), and how often its
2σ band covers the truth.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctprune_lightning.sensing import DamageSensor  # noqa: E402
from tests.sim.plant import Plant  # noqa: E402


def run(seed: int, jump: float, watch: int) -> tuple[float, float, float, float, float] | None:
    """(true ρ, sensor's ρ, predicted final, its σ, true final) for plant ``seed``; None if the run is too short."""
    plant = Plant.random(seed)
    rng = np.random.default_rng(seed + 99)
    steps, D = plant.steps, plant.interval
    t_cut = steps[max(2, int(0.05 * len(steps)))]
    sensor = DamageSensor(total_steps=plant.total_steps, interval=D)
    cuts: list[tuple[int, float]] = []
    innov = plant.sigma_probe * math.sqrt(1 - plant.phi ** 2)
    noise, last = plant.sigma_probe * rng.standard_normal(), 0
    for t in steps:
        noise = plant.phi * noise + innov * rng.standard_normal()
        window = plant.log_train[last + 1:t + 1]
        train = math.exp(float(np.log(np.mean(np.exp(window)))) + plant.effects((t + last) / 2, cuts, gains=True)
                         + plant.sigma_train * rng.standard_normal())
        last = t
        sensor.observe(t, math.exp(plant.log_dense[t] + plant.effects(t, cuts) + noise), train,
                       float(plant.lr_curve[t]))
        if t == t_cut:
            sensor.add_cut(t, jump + 0.005 * rng.standard_normal(),
                           plant.gain_j[0] * jump + plant.sigma_train * rng.standard_normal(), size=0.3)
            cuts.append((t, jump))
        if t >= t_cut + watch * D:
            r = sensor.estimate(t)
            return plant.rho_j[0], r["rho"], r["final"], r["final_std"], plant.final_log_damage(cuts)
    return None


def main() -> None:
    print("| J | watch (intervals) | corr(ρ true, ρ read) | mean abs error of ρ | true final / J | predicted / J "
          "| σ / J | 2σ covers |")
    print("|---|---|---|---|---|---|---|---|")
    for jump in (0.03, 0.1, 0.3):
        for watch in (5, 10):
            out = np.array([o for o in (run(s, jump, watch) for s in range(40)) if o is not None])
            true, read, final, std, final_true = out.T
            print(f"| {jump} | {watch} | {np.corrcoef(true, read)[0, 1]:.2f} | {np.mean(np.abs(true - read)):.2f} "
                  f"| {np.median(final_true / jump):.2f} | {np.median(final / jump):.2f} | {np.median(std / jump):.2f} "
                  f"| {np.mean(np.abs(final - final_true) <= 2 * std):.0%} |", flush=True)


if __name__ == "__main__":
    main()
