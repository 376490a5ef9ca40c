"""The side-by-side table of ``experiments/gpu_check.sh``: every task's runs against its dense run.

    python experiments/gpu_check_table.py OUT/runs          # markdown table on stdout

Reads ``OUT/runs/<task>/<job>/summary.json`` and the job's ``.hydra/overrides.yaml`` (``check=`` and
``compile=``). Ratios are to the dense run of the same task *and the same compile setting*; ``wall/eager``
is to the eager dense run (what compiling buys). The ``warmup`` jobs are left out. Plain Python only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

VARIANTS = ("dense", "budget", "gmp")
TASK_ORDER = ("mlp", "resnet", "gpt")
COLUMNS = ("task", "variant", "compile", "steps", "surgeries", "FLOPs/step", "train FLOPs", "modelled time/step",
           "wall (train)", "wall (fit)", "ours % of train", "wall/eager", "compiles (after cuts)", "compile s",
           "peak MiB", "test acc", "test loss")


def _overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            item = line.strip().removeprefix("- ").strip("'\"")
            if "=" in item:
                key, value = item.split("=", 1)
                out[key.lstrip("+~")] = value
    return out


def load_runs(root: Path) -> list[dict[str, Any]]:
    """One record per finished job: task, variant, compile flag and its summary."""
    runs = []
    for path in sorted(root.glob("*/*/summary.json")):
        job = path.parent
        over = _overrides(job)
        variant = over.get("check", "?")
        if variant == "warmup":
            continue
        runs.append({"task": job.parent.name, "variant": variant,
                     "compile": over.get("compile", "false").lower() == "true",
                     "summary": json.loads(path.read_text())})
    return runs


def _ratio(a: Any, b: Any) -> float | None:
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return a / b if ok and b else None


def _f(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows, tasks in order of appearance, variants dense/budget/gmp, eager before compiled."""
    dense = {(r["task"], r["compile"]): r["summary"] for r in runs if r["variant"] == "dense"}
    order = {v: i for i, v in enumerate(VARIANTS)}
    tasks = sorted(dict.fromkeys(r["task"] for r in runs), key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else 99, t))
    runs = sorted(runs, key=lambda r: (tasks.index(r["task"]), r["compile"], order.get(r["variant"], 99)))
    out = []
    for r in runs:
        s, ref, eager = r["summary"], dense.get((r["task"], r["compile"])), dense.get((r["task"], False))
        ref, eager = ref or {}, eager or {}
        out.append([
            r["task"], r["variant"], _f(r["compile"]), _f(s.get("steps"), "d"), _f(s.get("surgeries"), "d"),
            _f(s.get("flops_fraction")), _f(_ratio(s.get("train_flops"), s.get("dense_train_flops"))),
            _f(s.get("time_fraction")),
            _f(_ratio(s.get("train_time_s"), ref.get("train_time_s"))),
            _f(_ratio(s.get("fit_time_s"), ref.get("fit_time_s"))),
            _f(None if s.get("control_overhead") is None else 100 * s["control_overhead"], ".1f"),
            _f(_ratio(s.get("train_time_s"), eager.get("train_time_s"))),
            f"{_f(s.get('compile_count'), 'd')} ({_f(s.get('compile_recompiles'), 'd')})" if r["compile"] else "-",
            _f(s.get("compile_time_s"), ".1f") if r["compile"] else "-",
            _f(s.get("peak_memory_mb"), ".0f"), _f(s.get("test_acc"), ".4f"), _f(s.get("test_loss"), ".4f"),
        ])
    return out


def markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python experiments/gpu_check_table.py OUT/runs", file=sys.stderr)
        return 2
    root = Path(argv[0])
    if not root.is_dir():
        print(f"gpu_check_table: no such folder {root}", file=sys.stderr)
        return 2
    runs = load_runs(root)
    print(markdown(rows(runs)) if runs else f"gpu_check_table: no finished runs under {root}")
    print("\nRatios: to the dense run of the same task and compile setting; wall/eager: to the eager dense run. "
          "train FLOPs: cumulative, vs the dense schedule. modelled time/step: the cost model's, vs dense. ours: the "
          "callback's own wall-clock (probe, trials, planning, surgery, importance) in the train time. "
          "compiles: Dynamo compilations (those after surgeries).")
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
