"""The loop against the sweep: how much of the best fixed GMP schedule's saving one budget-loop run reaches.

    python experiments/oracle.py experiments/results/suite            # every task folder under it
    python experiments/oracle.py experiments/results/suite --loop loop --points loop_points

Per task: the hindsight oracle is the GMP target (over every ``gmp*`` group: 0.1 … 0.9) with the largest
training-FLOPs saving whose mean quality loss is within the budget and whose every seed is within the budget
plus twice the ``null`` group's std (the noise of a paired Δ). The loop's share is its mean saving ÷ the
oracle's. Beside it, the *per-seed* oracle: the largest saving whose every seed is within the budget itself, the
standard one loop run is held to (its chance constraint keeps P(final damage ≤ budget) near 0.98 per run), where
the first oracle may pick a target at which one seed in three ends over the budget. Quality: the test loss's relative excess over the same seed's dense run (budget 1%), and for the
classifiers the error rate's excess in points (budget 0.3 pt).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import group_runs  # noqa: E402

LOSS_BUDGET, POINTS_BUDGET = 1.0, 0.3  # % of test loss; points of test accuracy


def deltas(runs: list[dict[str, Any]], dense: dict[Any, dict[str, Any]], metric: str) -> list[float]:
    """Per seed: the test loss's excess over dense in %, or the accuracy lost in points."""
    out = []
    for r in runs:
        b = dense.get(r.get("seed"))
        if b is None:
            continue
        out.append((r["test_loss"] / b["test_loss"] - 1) * 100 if metric == "loss"
                   else (b["test_acc"] - r["test_acc"]) * 100)
    return out


def saved(runs: list[dict[str, Any]]) -> float:
    return statistics.fmean(r["train_flops_saved"] for r in runs)


def net_saved(runs: list[dict[str, Any]]) -> float | None:
    """The saving net of the sensing's forwards (probe readings, trial cuts: ``sensing_flops``, counted since
    2026-12-05); None when a run predates that count."""
    if any(r.get("sensing_flops") is None for r in runs):
        return None
    return statistics.fmean(1 - (r["train_flops"] + r["sensing_flops"]) / r["dense_train_flops"] for r in runs)


def oracle(groups: dict[str, list[dict[str, Any]]], dense: dict[Any, dict[str, Any]], metric: str,
           budget: float, per_seed: bool = False) -> tuple[str, float, list[float]] | None:
    """The best fixed GMP target within the budget: (label, saving, per-seed Δ), or None. ``per_seed``: every
    seed within the budget itself (no allowance for the noise of a paired Δ)."""
    null = deltas(groups.get("null", []), dense, metric)
    slack = 0.0 if per_seed else 2 * statistics.stdev(null) if len(null) > 1 else 0.0
    best = None
    for label, runs in groups.items():
        if not label.startswith("gmp") or len(runs) < 2:
            continue
        d = deltas(runs, dense, metric)
        if d and statistics.fmean(d) <= budget and max(d) <= budget + slack:
            if best is None or saved(runs) > best[1]:
                best = (label, saved(runs), d)
    return best


def task_rows(root: Path, loop: str, points: str) -> list[str]:
    groups = group_runs(root)
    # the sweep's groups hold several targets: one label per target ("gmp 0.25", "gmp_sweep 0.1")
    dense = {r.get("seed"): r for r in groups.get("dense", [])}
    rows = []
    for group, metric, budget in ((loop, "loss", LOSS_BUDGET), (points, "points", POINTS_BUDGET)):
        runs = groups.get(group)
        if not runs:
            continue
        d = deltas(runs, dense, metric)
        within = sum(v <= budget for v in d)
        unit = "%" if metric == "loss" else " pt"
        cells = []
        for per_seed in (False, True):
            best = oracle(groups, dense, metric, budget, per_seed)
            cells.append("none within budget" if best is None else (
                f"{best[0]}: {best[1]:.1%} saved, Δ {statistics.fmean(best[2]):+.2f}{unit} (max {max(best[2]):+.2f})"))
            cells.append("—" if best is None or best[1] <= 0 else f"{saved(runs) / best[1]:.2f}")
        net = net_saved(runs)
        rows.append(f"| {root.name} | {budget:g}{unit} | {saved(runs):.1%} | {'—' if net is None else f'{net:.1%}'} | "
                    f"{', '.join(f'{v:+.2f}' for v in d)} (mean {statistics.fmean(d):+.2f}) | {within}/{len(d)} | "
                    f"{' | '.join(cells)} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a suite folder holding task folders (or one task folder)")
    parser.add_argument("--loop", default="loop", help="the loop's group with the loss budget")
    parser.add_argument("--points", default="loop_points", help="the loop's group with the points budget")
    args = parser.parse_args(argv)
    tasks = [args.root] if (args.root / "dense").is_dir() else sorted(p for p in args.root.iterdir() if (p / "dense").is_dir())
    lines = ["| task | budget | loop saved | net of sensing | loop Δ per seed | within | oracle (best fixed GMP in hindsight) "
             "| share | per-seed oracle (every seed within budget) | share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        lines += task_rows(task, args.loop, args.points)
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
