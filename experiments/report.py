"""Aggregate run summaries into one side-by-side table (markdown), relative to the dense baseline.

    python experiments/report.py outputs/**/summary.json            # or run directories
    python experiments/report.py --baseline none multirun/2026-11-28/12-00-00

The baseline rows (``controller == --baseline``, default ``none``) give the reference accuracy and
wall-clock per seed; every row reports its accuracy difference and its training wall-clock ratio to
the baseline of its own seed (wall-clock ratios are only meaningful for runs made side by side).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load_summaries(paths: list[str]) -> list[dict[str, Any]]:
    found: list[Path] = []
    for p in map(Path, paths):
        found += sorted(p.rglob("summary.json")) if p.is_dir() else [p]
    if not found:
        raise SystemExit(f"report: no summary.json under {paths}")
    return [json.loads(f.read_text()) | {"_path": str(f)} for f in found]


def table(rows: list[dict[str, Any]], baseline: str = "none") -> str:
    """One row per run; Δ accuracy and time ratio against the baseline run of the same seed."""
    bases = {r.get("seed"): r for r in rows if r.get("controller") == baseline}
    head = ("| controller | importance | seed | target | test acc | Δ acc (pt) | final FLOPs/step "
            "| train FLOPs saved | train time (s) | time ratio | final widths |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r.get("seed") or 0, r.get("controller") != baseline)):
        base = bases.get(r.get("seed"))
        acc = r.get("test_acc")
        d_acc = (acc - base["test_acc"]) * 100 if base and acc is not None and base.get("test_acc") is not None else None
        ratio = r["train_time_s"] / base["train_time_s"] if base and base.get("train_time_s") else None
        widths = "/".join(str(w) for w in (r.get("widths") or {}).values())
        cells = [
            str(r.get("controller")), str(r.get("importance")), str(r.get("seed")),
            f"{r.get('target', float('nan')):.2f}",
            f"{acc * 100:.2f}%" if acc is not None else "-",
            f"{d_acc:+.2f}" if d_acc is not None else "-",
            f"{r.get('flops_fraction', 1.0):.3f}", f"{r.get('train_flops_saved', 0.0):.1%}",
            f"{r.get('train_time_s', float('nan')):.1f}", f"{ratio:.2f}" if ratio is not None else "-", widths,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="summary.json files or directories holding them")
    parser.add_argument("--baseline", default="none", help="controller name of the reference row")
    args = parser.parse_args(argv)
    sys.stdout.write(table(load_summaries(args.paths), args.baseline) + "\n")


if __name__ == "__main__":
    main()
