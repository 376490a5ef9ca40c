"""experiments/report.py: per-seed pairing with the baseline, mean ± std, plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import report  # noqa: E402


def summary(seed: int, acc: float, flops: float, time_s: float, target: float = 1.0, controller: str = "none") -> dict:
    trace = [{"step": s, "compute": 1 - 0.1 * s, "action": 0.1, "damage": 0.0, "widths": {"a": 10 - s}}
             for s in range(3)]
    return {"seed": seed, "test_acc": acc, "train_flops": flops, "fit_time_s": time_s, "target": target,
            "controller": controller, "flops_fraction": flops / 100, "widths": {"a": 8}, "trace": trace,
            "surgeries": 0 if controller == "none" else 2}


def write(root: Path, group: str, i: int, s: dict) -> None:
    (root / group / str(i)).mkdir(parents=True)
    (root / group / str(i) / "summary.json").write_text(json.dumps(s))


def test_groups_pair_each_seed_with_its_baseline_and_plot(tmp_path: Path) -> None:
    for seed, (acc, t) in enumerate([(0.90, 10.0), (0.92, 20.0)]):
        write(tmp_path, "dense", seed, summary(seed, acc, 100.0, t))
        write(tmp_path, "gmp", seed, summary(seed, acc - 0.01, 30.0, t / 2, target=0.25, controller="gmp"))
        write(tmp_path, "gmp", seed + 10, summary(seed, acc - 0.03, 20.0, t / 4, target=0.1, controller="gmp"))
    groups = report.group_runs(tmp_path)
    assert sorted(groups) == ["dense", "gmp 0.1", "gmp 0.25"]  # a folder with two targets splits
    stats = {g["label"]: g for g in report.group_stats(groups, "dense")}
    assert stats["gmp 0.25"]["d_acc"] == pytest.approx((-1.0, 0.0))  # per seed: -1 pt both times
    assert stats["gmp 0.25"]["time"] == pytest.approx((0.5, 0.0))  # 5/10 and 10/20, not 7.5/15 pooled
    assert stats["gmp 0.1"]["flops"] == pytest.approx((0.2, 0.0))
    assert stats["dense"]["acc"] == pytest.approx((91.0, 1.4142135, ), rel=1e-6)
    md = report.group_table(list(stats.values()))
    assert "| gmp 0.25 | 2 | 90.00 ± 1.41 | -1.00 ± 0.00 | - | 0.300 ± 0.000 | 0.50 ± 0.00 | 1.67 |" in md
    assert "| gmp 0.1 | 2 |" in md and "| no: acc |" in md.split("gmp 0.1")[1].split("\n")[0]
    assert "| no: acc |" in md.split("| gmp 0.25")[1].split("\n")[0]
    assert "| no: FLOPs, wall |" in md.split("| dense")[1].split("\n")[0]
    files = report.plot_pareto(list(stats.values()), tmp_path, "dense") + [report.plot_traces(list(stats.values()), tmp_path)]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000


def test_missing_baseline_group_names_the_groups(tmp_path: Path) -> None:
    write(tmp_path, "gmp", 0, summary(0, 0.9, 30.0, 5.0, controller="gmp"))
    with pytest.raises(SystemExit, match="no baseline group 'dense'.*gmp"):
        report.main(["--groups", str(tmp_path)])


def test_language_model_groups_report_the_relative_test_loss_and_the_bar(tmp_path: Path) -> None:
    for seed, loss in enumerate([2.0, 2.2]):
        write(tmp_path, "dense", seed, summary(seed, None, 100.0, 10.0) | {"test_loss": loss})
        write(tmp_path, "lqr", seed, summary(seed, None, 30.0, 4.0, target=0.3, controller="lqr")
              | {"test_loss": loss * 1.01})
        write(tmp_path, "gmp", seed, summary(seed, None, 30.0, 4.0, target=0.3, controller="gmp")
              | {"test_loss": loss * 1.05})
    stats = {g["label"]: g for g in report.group_stats(report.group_runs(tmp_path), "dense")}
    assert stats["lqr"]["d_loss"] == pytest.approx((1.0, 0.0))
    assert report.meets_bar(stats["lqr"]) == "yes" and report.meets_bar(stats["gmp"]) == "no: loss"
    files = report.plot_pareto(list(stats.values()), tmp_path, "dense")
    assert all(f.stat().st_size > 5000 for f in files)


def test_budget_groups_get_the_sensor_table_and_plain_groups_do_not() -> None:
    def run(seed: int, finals: list[float], actions: list[float]) -> dict:
        s = summary(seed, 0.9, 60, 8.0, target=0.1, controller="lqr") | {"test_loss": 0.3}
        s["trace"] = [{"step": 10 * k, "compute": 1.0, "action": u, "damage": 0.0, "final_damage": f, "final_std": 0.0,
                       "budget": 0.01, "widths": {"a": 8}} for k, (f, u) in enumerate(zip(finals, actions))]
        return s

    # seed 0: after its cut, quiet readings 0.004, 0.006, 0.004 (changes +0.002, -0.002: std 0.002 = 0.2 budgets);
    # the reading before any cut and the pair around the cut do not count
    runs = [run(0, [0.0, 0.003, 0.004, 0.006, 0.004], [0.0, 0.1, 0.0, 0.0, 0.0]),
            run(1, [0.0, 0.001, 0.001, 0.001, 0.001], [0.0, 0.1, 0.0, 0.0, 0.0])]
    assert report.sensor_noise(runs[0]) == pytest.approx(0.002)
    assert report.sensor_noise(runs[1]) == 0.0
    dense = [summary(s, 0.9, 100, 10.0) | {"test_loss": 0.3} for s in (0, 1)]
    stats = report.group_stats({"dense": dense, "budget": runs}, "dense")
    (row,) = report.budget_table(stats).splitlines()[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["budget", "1% of loss"] and cells[4] == "0.400 ± 0.000"  # 40% of the FLOPs saved
    assert cells[5].startswith("0.25") and cells[6].startswith("0.10") and cells[7].startswith("1.0")
    assert report.budget_table(report.group_stats({"dense": dense}, "dense")) == ""
    for r in runs:  # a budget in accuracy points: the absolute error rate
        for row in r["trace"]:
            row |= {"budget": 0.003, "budget_metric": "error"}
    (row,) = report.budget_table(report.group_stats({"dense": dense, "budget": runs}, "dense")).splitlines()[2:]
    assert row.split("|")[2].strip() == "0.3 pt of error"
