"""The trial-jump ladders of `jump_curve.py` beside the GMP sweep's final quality (issue 16 analysis).

    python experiments/jump_table.py experiments/results/suite/jump_curves experiments/results/suite > OUT.md

For each task and compute fraction f of the ladder: the one-shot trial cut's immediate log-jump at 15% of
training (mean over the seeds measured), the GMP sweep's final Δ test loss at the target f (3 seeds), and
their ratio: the share of the immediate jump that is still there at the end of a GMP run to f.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import deltas  # noqa: E402
from report import group_runs  # noqa: E402

AT = 0.15


def main() -> None:
    curves, suite = Path(sys.argv[1]), Path(sys.argv[2])
    print(f"| task | f | trial log-jump at p≈{AT} (per seed) | GMP final Δ loss (%) | final ÷ jump |")
    print("|---|---|---|---|---|")
    for task in ("mlp", "gpt", "resnet", "lru"):
        rows = [json.loads(p.read_text()) for p in sorted(curves.glob(f"{task}_s*.json"))]
        if not rows:
            continue
        groups = group_runs(suite / task)
        dense = {r.get("seed"): r for r in groups.get("dense", [])}
        finals = {}
        for label, runs in groups.items():
            if label.startswith("gmp") and " " in label:
                finals[round(float(label.split()[-1]), 2)] = statistics.fmean(deltas(runs, dense, "loss"))
        for f in ("0.9", "0.8", "0.7", "0.6", "0.5", "0.4", "0.3", "0.2", "0.1"):
            jumps = [min(r["rows"], key=lambda x: abs(x["progress"] - AT))["jumps"][f] for r in rows]
            final = finals.get(float(f))
            j = statistics.fmean(jumps)
            ratio = f"{final / 100 / j:.2f}" if final is not None and j > 1e-3 else "—"
            fin = "—" if final is None else f"{final:+.2f}"
            print(f"| {task} | {f} | {', '.join(f'{v:.3f}' for v in jumps)} | {fin} | {ratio} |")


if __name__ == "__main__":
    main()
