"""Does wall-clock follow the training FLOPs? Dense and pruned ``train.py`` runs side by side, repeated.

    .venv/bin/python experiments/bench_wallclock.py                          # 4 tasks x dense/lqr/gmp, 3 repeats
    .venv/bin/python experiments/bench_wallclock.py --tasks mlp,gpt --repeats 5 --threads 2

Every run is ``train.py`` at the evidence suite's CPU scale (``experiments/suite.sh overrides TASK``),
seed 0, no test, CSV logger. A run's time is its fit wall-clock (``fit_time_s`` of its summary.json:
the whole ``Trainer.fit``, validation and checkpoints included), its cost the training FLOPs the
ledger counted. Within a task the variants run interleaved, round-robin, the order rotated each
repeat, so every repeat's ratio compares runs made minutes apart; the table gives the min and median
fit time, the median of the per-repeat ratios to dense, and wall-clock ÷ FLOPs (1.0: wall-clock follows
the FLOPs exactly). Run it alone on the machine: the evidence suite runs two tasks at once, whose
wall-clock ratios this benchmark is there to check.

The variant ``small`` is the floor no pruning method can beat on this harness: the architecture the same
repeat's ``lqr`` run ended with, trained dense from scratch (``architecture_from``; it runs right after that
``lqr`` run). It pays Lightning's step, the data, validation and the small kernels at the small widths from the
first step, and nothing of ours. With it the table splits each pruned variant's wall ÷ FLOPs in two: *floor*,
the wall-clock ratio plain training would take at the variant's FLOPs (time taken as affine in FLOPs between
``small`` and dense, the two measured points), and *ours*, the variant's wall-clock over that floor (the
callback, the surgery, the steps spent wider than at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "dense": ["controller=none"],
    "lqr": ["controller=lqr"],
    "gmp": ["controller=gmp", "pruning.target=0.25"],
    "pid": ["controller=pid"],
    "budget": ["controller=lqr", "pruning.quality_budget=0.01", "pruning.target=0.1"],
    # the controller's compute is the measured cost model's modelled time, widths aligned for the device
    "lqr_time": ["controller=lqr", "pruning.cost=time", "pruning.round_to=auto"],
    "small": ["controller=none"],  # + architecture_from the same repeat's lqr checkpoint (see run_order)
}


def run_order(variants: list[str], rep: int) -> list[str]:
    """The variants of repeat ``rep``, rotated by ``rep``; ``small`` right after ``lqr``, whose architecture it trains.

    >>> run_order(["dense", "lqr", "small"], 1)
    ['lqr', 'small', 'dense']
    >>> run_order(["dense", "lqr", "small"], 2)
    ['dense', 'lqr', 'small']
    """
    order = variants[rep % len(variants):] + variants[:rep % len(variants)]
    if "small" in order:
        order.remove("small")
        order.insert(order.index("lqr") + 1, "small")
    return order


def floor_ratio(flops: float, small_wall: float, small_flops: float) -> float:
    """Plain training's wall-clock ratio to dense at a FLOPs ratio ``flops``: affine in FLOPs through ``small``
    (``small_flops``, ``small_wall``) and dense (1, 1).

    >>> floor_ratio(1.0, 0.4, 0.25), floor_ratio(0.25, 0.4, 0.25), round(floor_ratio(0.5, 0.4, 0.25), 3)
    (1.0, 0.4, 0.6)
    """
    if small_flops >= 1.0:
        return 1.0
    return small_wall + (1.0 - small_wall) * (flops - small_flops) / (1.0 - small_flops)


def task_overrides(task: str) -> list[str]:
    out = subprocess.run(["bash", str(REPO / "experiments" / "suite.sh"), "overrides", task], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(out.stderr.strip())
    return [line for line in out.stdout.splitlines() if line]


def run_once(task_args: list[str], variant: str, out: Path, threads: int, more: Sequence[str] = ()) -> dict:
    """One ``train.py`` run of ``variant`` on a task; its summary."""
    cmd = [sys.executable, str(REPO / "train.py"), *task_args, *VARIANTS[variant], *more, "seed=0", "run_test=false",
           "logger=csv", f"hydra.run.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench_wallclock: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def bench_task(task: str, variants: list[str], repeats: int, threads: int, tmp: Path, extra: list[str]) -> str:
    """The markdown table of one task."""
    args = task_overrides(task) + extra
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(repeats):
        for v in run_order(variants, rep):
            ckpt = tmp / f"{task}_lqr_{rep}" / "checkpoints" / "last.ckpt"
            more = [f"architecture_from='{ckpt}'"] if v == "small" else []
            s = run_once(args, v, tmp / f"{task}_{v}_{rep}", threads, more)
            runs[v].append(s)
            print(f"  {task} repeat {rep} {v:<6} fit {s['fit_time_s']:.1f} s", file=sys.stderr, flush=True)
    dense = runs["dense"]
    lines = [f"### {task} ({repeats} repeats, {threads} thread(s); overrides: `{' '.join(args) or '(none)'}`)", "",
             ("| variant | fit s min | fit s median | wall-clock / dense (median of paired; all) | train FLOPs / dense "
              "| wall-clock ÷ FLOPs | modelled time saved | ours % of train | of which sensing % "
              "| floor ÷ FLOPs | wall ÷ floor |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    small = None
    if "small" in runs:
        small = (statistics.median(s["fit_time_s"] / d["fit_time_s"] for s, d in zip(runs["small"], dense)),
                 statistics.median(s["train_flops"] / d["train_flops"] for s, d in zip(runs["small"], dense)))
    for v in variants:
        times = [s["fit_time_s"] for s in runs[v]]
        ratios = [s["fit_time_s"] / d["fit_time_s"] for s, d in zip(runs[v], dense)]
        flops = statistics.median(s["train_flops"] / d["train_flops"] for s, d in zip(runs[v], dense))
        ratio = statistics.median(ratios)
        modelled = [s["train_time_saved"] for s in runs[v] if s.get("train_time_saved") is not None]
        ours = [100 * s["control_overhead"] for s in runs[v] if s.get("control_overhead") is not None]
        sensing = [100 * sum((s.get("control_time_parts") or {}).get(k, 0.0) for k in ("probe", "trial", "flops"))
                   / s["train_time_s"] for s in runs[v] if s.get("train_time_s")]
        lines.append(f"| {v} | {min(times):.1f} | {statistics.median(times):.1f} | {ratio:.3f} "
                     f"({', '.join(f'{r:.2f}' for r in ratios)}) | {flops:.3f} | {ratio / flops:.2f} | "
                     f"{f'{statistics.median(modelled):.3f}' if modelled else '-'} | "
                     f"{f'{statistics.median(ours):.1f}' if ours else '-'} | "
                     f"{f'{statistics.median(sensing):.1f}' if sensing else '-'} | "
                     + (f"{floor_ratio(flops, *small) / flops:.2f} | {ratio / floor_ratio(flops, *small):.2f} |"
                        if small else "- | - |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="mlp,resnet,gpt,lru", help="comma list of mlp, resnet, gpt, lru")
    p.add_argument("--variants", default="dense,lqr,gmp", help=f"comma list of {', '.join(VARIANTS)} (dense first)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (the suite's: 1)")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run, e.g. trainer=gpu")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "dense" not in variants:
        p.error(f"--variants must include dense and name only {list(VARIANTS)}; got {variants}")
    if "small" in variants and "lqr" not in variants:
        p.error(f"--variants: small trains the architecture lqr ends with, so it needs lqr too; got {variants}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        for task in (t for t in args.tasks.split(",") if t):
            print(bench_task(task, variants, args.repeats, args.threads, Path(tmp), args.extra) + "\n", flush=True)


if __name__ == "__main__":
    main()
