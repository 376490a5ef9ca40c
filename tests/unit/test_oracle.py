"""experiments/oracle.py: the hindsight GMP oracle (mean within budget, seeds within budget + 2 null stds) and the
per-seed oracle (every seed within the budget itself), and the loop's share of each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import oracle  # noqa: E402


def write(root: Path, group: str, seed: int, loss: float, saved: float, target: float | None = None) -> None:
    folder = root / group / f"{target}_{seed}"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"seed": seed, "test_loss": loss, "train_flops_saved": saved,
                                                     "target": target}))


def test_the_per_seed_oracle_refuses_a_target_where_one_seed_ends_over_the_budget(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = tmp_path / "mlp"
    for seed in range(3):
        write(task, "dense", seed, 1.0, 0.0)
        write(task, "null", seed, 1.0 + (0.002, -0.002, 0.0)[seed], 0.0)  # paired noise: std 0.2% of the loss
        write(task, "gmp_sweep", seed, 1.0 + (0.009, 0.011, 0.007)[seed], 0.6, 0.4)  # mean +0.9%, one seed +1.1%
        write(task, "gmp_sweep", seed, 1.0 + (0.001, 0.003, 0.002)[seed], 0.4, 0.6)  # every seed within 1%
        write(task, "gmp_sweep", seed, 1.0 + (0.02, 0.03, 0.025)[seed], 0.8, 0.2)  # over on the mean
        write(task, "loop", seed, 1.0 + (0.004, 0.002, 0.0)[seed], 0.3)
    oracle.main([str(task), "--loop", "loop", "--points", "none"])
    row = capsys.readouterr().out.strip().splitlines()[-1].split(" | ")
    assert row[6].startswith("gmp_sweep 0.4: 60.0% saved, Δ +0.90% (max +1.10)")  # 1.10 <= 1 + 2 x 0.2
    assert float(row[7]) == pytest.approx(0.5)
    assert row[8].startswith("gmp_sweep 0.6: 40.0% saved, Δ +0.20% (max +0.30)")
    assert float(row[9].rstrip(" |")) == pytest.approx(0.75)
    assert row[5] == "3/3"
