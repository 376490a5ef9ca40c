"""Aggregate run summaries into side-by-side tables and plots, relative to the dense baseline.

    python experiments/report.py multirun/2026-11-28/12-00-00            # one sweep: a row per run
    python experiments/report.py --groups experiments/results/mlp_cpu --plots experiments/results/mlp_cpu
    python experiments/report.py --groups SUITE_DIR --baseline dense --wandb   # also log the plots to W&B

A *group* is a folder directly under the given root (one Hydra multirun per baseline or controller,
as ``experiments/suite.sh`` lays them out); runs in a group that differ by target are split by it.
The baseline group (``--baseline``, default ``dense``; in the per-run table, ``controller == none``)
gives each seed's reference accuracy and wall-clock: every run's Δ accuracy and wall-clock ratio is
taken against the baseline run of its own seed, so ratios come from runs made side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
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


# ------------------------------------------------------------------------------------------ groups
def group_runs(root: Path) -> dict[str, list[dict[str, Any]]]:
    """``{label: runs}``: a label per folder under ``root``, split by target when a folder holds several."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in load_summaries([str(root)]):
        rel = Path(run["_path"]).relative_to(root)
        name = rel.parts[0] if len(rel.parts) > 1 else "runs"
        groups.setdefault(name, []).append(run)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, runs in groups.items():
        targets = sorted({r.get("target") for r in runs}, key=lambda t: (t is None, t))
        for t in targets:
            label = name if len(targets) == 1 else f"{name} {t:g}"
            out[label] = [r for r in runs if r.get("target") == t]
    return out


def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(mean: float, std: float, fmt: str) -> str:
    return "-" if math.isnan(mean) else f"{format(mean, fmt)} ± {format(std, fmt.lstrip('+'))}"


def group_stats(groups: dict[str, list[dict[str, Any]]], baseline: str) -> list[dict[str, Any]]:
    """Per group: means and stds over seeds of quality, FLOPs saved and the per-seed ratios to the baseline."""
    bases = {r.get("seed"): r for r in groups.get(baseline, [])}
    out = []
    for label, runs in groups.items():
        paired = [(r, bases.get(r.get("seed"))) for r in runs]
        d_acc = [(r["test_acc"] - b["test_acc"]) * 100 for r, b in paired
                 if b and r.get("test_acc") is not None and b.get("test_acc") is not None]
        d_loss = [(r["test_loss"] / b["test_loss"] - 1) * 100 for r, b in paired
                  if b and r.get("test_loss") is not None and b.get("test_loss")]
        # the fit's wall-clock (every run has it, with or without a ControlPruning callback)
        time_ratio = [r["fit_time_s"] / b["fit_time_s"] for r, b in paired if b and r.get("fit_time_s") and b.get("fit_time_s")]
        flops_ratio = [(r.get("train_flops") or b["train_flops"]) / b["train_flops"] for r, b in paired
                       if b and b.get("train_flops")]  # no ledger (masks, no ControlPruning): dense FLOPs
        out.append({
            "label": label, "n": len(runs),
            "acc": _stats([100 * r["test_acc"] for r in runs if r.get("test_acc") is not None]),
            "loss": _stats([r.get("test_loss") for r in runs]),
            "d_acc": _stats(d_acc),
            "d_loss": _stats(d_loss),  # relative test-loss excess over the same seed's baseline, in %
            "flops": _stats(flops_ratio),  # training FLOPs / the dense run's (0.3 = 70% saved)
            "time": _stats(time_ratio),
            "final": _stats([r.get("flops_fraction") for r in runs]),
            "widths": "/".join(str(w) for w in (runs[0].get("widths") or {}).values()),
            "runs": runs,
        })
    return sorted(out, key=lambda g: (g["label"] != baseline, -(g["flops"][0] if not math.isnan(g["flops"][0]) else 1)))


#: the evidence suite's minimum bar: training FLOPs saved, wall-clock speed-up, quality given up
BAR = {"flops": 0.4, "time": 0.5, "d_acc": -0.5, "d_loss": 2.0}


def meets_bar(g: dict[str, Any]) -> str:
    """``yes`` when the group's means clear the bar (≥60% FLOPs saved, ≥2x wall-clock, ≤0.5 pt accuracy
    lost, or ≤2% test loss when there is no accuracy), else what misses it."""
    misses = []
    if not g["flops"][0] <= BAR["flops"]:
        misses.append("FLOPs")
    if not g["time"][0] <= BAR["time"]:
        misses.append("wall")
    if not math.isnan(g["d_acc"][0]):
        if not g["d_acc"][0] >= BAR["d_acc"]:
            misses.append("acc")
    elif not g["d_loss"][0] <= BAR["d_loss"]:
        misses.append("loss")
    return "yes" if not misses else "no: " + ", ".join(misses)


def group_table(stats: list[dict[str, Any]]) -> str:
    head = ("| run | seeds | test acc (%) | Δ acc vs dense (pt) | Δ test loss vs dense (%) | train FLOPs / dense "
            "| wall-clock / dense | wall-clock ÷ FLOPs | final FLOPs/step | bar | widths (seed 0) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for g in stats:
        follow = g["time"][0] / g["flops"][0] if g["flops"][0] else math.nan
        lines.append("| " + " | ".join([
            g["label"], str(g["n"]), _pm(*g["acc"], ".2f"), _pm(*g["d_acc"], "+.2f"), _pm(*g["d_loss"], "+.2f"),
            _pm(*g["flops"], ".3f"), _pm(*g["time"], ".2f"), "-" if math.isnan(follow) else f"{follow:.2f}",
            _pm(*g["final"], ".3f"), meets_bar(g), g["widths"]]) + " |")
    return "\n".join(lines)


def sensor_noise(run: dict[str, Any]) -> float:
    """The quality-budget sensor's noise in one run: the std of the change of the predicted final damage
    between consecutive control intervals with no cut in either (NaN without a budget or quiet pairs)."""
    rows = [r for r in run.get("trace") or [] if r.get("final_damage") is not None and r.get("budget")]
    first_cut = next((i for i, r in enumerate(rows) if r["action"] > 0), len(rows))
    steps = [b["final_damage"] - a["final_damage"] for a, b in zip(rows[first_cut + 1:], rows[first_cut + 2:])
             if a["action"] == 0 and b["action"] == 0]
    return statistics.pstdev(steps) if len(steps) >= 2 else math.nan


def budget_table(stats: list[dict[str, Any]]) -> str:
    """The quality-budget groups: the budget, what the sensor predicted at the end, and its noise."""
    head = ("| run | budget | Δ test loss (%) | Δ acc (pt) | FLOPs saved | predicted final damage (% or pt) "
            "| sensor noise / budget | cuts |")
    lines = []
    for g in stats:
        runs = [r for r in g["runs"] if (r.get("trace") or [{}])[-1].get("budget")]
        if not runs:
            continue
        budget = runs[0]["trace"][-1]["budget"]
        points = runs[0]["trace"][-1].get("budget_metric") == "error"  # absolute error rate: accuracy points
        noise = _stats([n / budget for n in map(sensor_noise, runs) if not math.isnan(n)])
        lines.append("| " + " | ".join([
            g["label"], f"{100 * budget:g} pt of error" if points else f"{100 * budget:g}% of loss",
            _pm(*g["d_loss"], "+.2f"), _pm(*g["d_acc"], "+.2f"),
            _pm(1 - g["flops"][0], g["flops"][1], ".3f"),
            _pm(*_stats([100 * r["trace"][-1]["final_damage"] for r in runs]), ".2f"), _pm(*noise, ".2f"),
            _pm(*_stats([sum(x["action"] > 0 for x in r["trace"]) for r in runs]), ".1f")]) + " |")
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1), *lines]) if lines else ""


# ------------------------------------------------------------------------------------------ plots
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")


def _style(i: int) -> tuple[Any, str]:
    """A distinct (colour, marker) per group, for up to 20 x 8 groups."""
    import matplotlib

    return matplotlib.colormaps["tab20"](i % 20), MARKERS[i % len(MARKERS)]


def plot_pareto(stats: list[dict[str, Any]], out: Path, baseline: str) -> list[Path]:
    """Quality vs training FLOPs and vs wall-clock (each seed a dot, the mean ± std a bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, xlabel, name in (("flops", "training FLOPs / dense run's", "pareto_flops.png"),
                              ("time", "training wall-clock / the same seed's dense run's",
                               "pareto_wallclock.png")):
        fig, ax = plt.subplots(figsize=(9.5, 5))
        quality = "acc" if any(not math.isnan(g["acc"][0]) for g in stats) else "loss"
        for i, g in enumerate(stats):
            color, marker = _style(i)
            mean_x, std_x = g[key]
            mean_y, std_y = g[quality]
            if math.isnan(mean_x):
                continue
            ax.errorbar(mean_x, mean_y, xerr=std_x, yerr=std_y, fmt=marker, color=color, capsize=3, label=g["label"],
                        markersize=7 if g["label"] != baseline else 10)
            ax.annotate(g["label"], (mean_x, mean_y), textcoords="offset points", xytext=(5, 4), fontsize=7,
                        color=color)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)" if quality == "acc" else "test loss (nats/token)")
        ax.set_xlim(0, 1.08)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: never over a point
        ax.set_title(f"mean ± std over seeds; {'up' if quality == 'acc' else 'down'} and left is better")
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def plot_traces(stats: list[dict[str, Any]], out: Path) -> Path | None:
    """Compute fraction, action, damage and widths over steps, seed 0 of each pruning group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(g["label"], min(g["runs"], key=lambda r: r.get("seed") or 0)) for g in stats
            if not g["label"].startswith("gmp_sweep")]  # the sweep's fixed ramps: in the Pareto plots, not here
    runs = [(label, r) for label, r in runs if r.get("trace") and r.get("surgeries")]
    if not runs:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for i, (label, r) in enumerate(runs):
        steps = [row["step"] for row in r["trace"]]
        color, _ = _style(i)
        axes[0, 0].plot(steps, [row["compute"] for row in r["trace"]], color=color, label=label)
        axes[0, 1].plot(steps, [row["action"] for row in r["trace"]], color=color)
        axes[1, 0].plot(steps, [row["damage"] for row in r["trace"]], color=color)
        widths = [row["widths"] for row in r["trace"]]
        for j, name in enumerate(widths[0]):
            axes[1, 1].plot(steps, [w[name] for w in widths], color=color, linestyle=("-", "--", ":", "-.")[j % 4])
    for ax, title in zip(axes.flat, ("compute fraction (FLOPs/step ÷ dense)", "controller action u (cut)",
                                     "damage reading", "group widths (line style: group)")):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    path = out / "traces.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_to_wandb(files: list[Path], markdown: str, project: str = "ctprune") -> None:
    """Log the plots and the table to a W&B run (offline without an API key)."""
    import os

    import wandb

    os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
    run = wandb.init(project=project, job_type="report", group="report")
    try:
        wandb.log({f.stem: wandb.Image(str(f)) for f in files} | {"table": wandb.Html(f"<pre>{markdown}</pre>")})
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="summary.json files or directories holding them (a row per run)")
    parser.add_argument("--groups", type=Path, help="a suite folder: one group per sub-folder, mean ± std over seeds")
    parser.add_argument("--baseline", default=None, help="baseline controller (per run) or group (--groups)")
    parser.add_argument("--plots", type=Path, help="write pareto_flops.png, pareto_wallclock.png, traces.png here")
    parser.add_argument("--wandb", action="store_true", help="also log the plots and table to W&B")
    args = parser.parse_args(argv)
    if args.groups is None:
        if not args.paths:
            parser.error("give summary paths or --groups")
        sys.stdout.write(table(load_summaries(args.paths), args.baseline or "none") + "\n")
        return
    baseline = args.baseline or "dense"
    groups = group_runs(args.groups)
    if baseline not in groups:
        raise SystemExit(f"report: no baseline group {baseline!r} under {args.groups}; groups: {sorted(groups)}")
    stats = group_stats(groups, baseline)
    markdown = group_table(stats)
    budgets = budget_table(stats)
    markdown += f"\n\nQuality budget:\n\n{budgets}" if budgets else ""
    sys.stdout.write(markdown + "\n")
    if args.plots is not None:
        args.plots.mkdir(parents=True, exist_ok=True)
        files = plot_pareto(stats, args.plots, baseline)
        trace = plot_traces(stats, args.plots)
        files += [trace] if trace else []
        if args.wandb:
            log_to_wandb(files, markdown)


if __name__ == "__main__":
    main()
