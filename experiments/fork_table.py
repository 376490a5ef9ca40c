"""The paired forks of `fork_curve.py` beside the GMP sweep's final quality (issue 16 analysis).

    python experiments/fork_table.py experiments/results/suite/fork_curves experiments/results/suite > OUT.md

For each task and compute fraction f: the gap ``log(probe of the fork cut to f / probe of the dense fork)`` after
40, 80 and 160 steps of training on the same batches (mean and spread over the seeds measured), the GMP sweep's
final Δ test loss at the target f (3 seeds), and final ÷ gap at 80 steps.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import deltas  # noqa: E402
from report import group_runs  # noqa: E402

READS = (2, 4, 8)  # reading index: every 20 steps, so 40, 80 and 160 steps after the fork


def fmt(values: list[float]) -> str:
    if not values:
        return "—"
    m = statistics.fmean(values) * 100
    return f"{m:+.2f}" + (f" ± {statistics.stdev(values) * 100:.2f}" if len(values) > 1 else "")


def main() -> None:
    forks, suite = Path(sys.argv[1]), Path(sys.argv[2])
    print("| task | f | gap after 40 steps (%) | 80 steps | 160 steps | seeds | GMP final Δ loss (%) | final ÷ gap(80) |")
    print("|---|---|---|---|---|---|---|---|")
    for task in ("mlp", "gpt", "resnet", "lru"):
        runs = [json.loads(p.read_text()) for p in sorted(forks.glob(f"{task}_s*.json"))]
        runs = [r for r in runs if r["rows"]]
        if not runs:
            continue
        groups = group_runs(suite / task)
        dense = {r.get("seed"): r for r in groups.get("dense", [])}
        finals = {round(float(label.split()[-1]), 2): statistics.fmean(deltas(rs, dense, "loss"))
                  for label, rs in groups.items() if label.startswith("gmp") and " " in label}
        for f in ("0.8", "0.7", "0.6", "0.5", "0.4", "0.3", "0.2"):
            cols = []
            for i in READS:
                cols.append([r["rows"][0]["gaps"][f][i] for r in runs if len(r["rows"][0]["gaps"][f]) > i])
            final = finals.get(float(f))
            g80 = statistics.fmean(cols[1]) if cols[1] else None
            ratio = f"{final / 100 / g80:.2f}" if final is not None and g80 and g80 > 1e-3 else "—"
            print(f"| {task} | {f} | {fmt(cols[0])} | {fmt(cols[1])} | {fmt(cols[2])} | {len(runs)} | "
                  f"{'—' if final is None else f'{final:+.2f}'} | {ratio} |")


if __name__ == "__main__":
    main()
