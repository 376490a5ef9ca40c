"""experiments/bench_wallclock.py: interleaved train.py runs, paired ratios, one table per task."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import bench_wallclock  # noqa: E402


def test_a_task_table_pairs_every_variant_with_dense(capsys: pytest.CaptureFixture[str]) -> None:
    bench_wallclock.main(["--tasks", "mlp", "--variants", "dense,gmp", "--repeats", "2", "--extra", "debug=fast",
                          "trainer.max_epochs=1"])
    out = capsys.readouterr()
    rows = {line.split("|")[1].strip(): line for line in out.out.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"variant", "dense", "gmp"}
    assert re.search(r"\| dense \| [\d.]+ \| [\d.]+ \| 1\.000 \(1\.00, 1\.00\) \| 1\.000 \| 1\.00 \|", rows["dense"])
    flops = float(rows["gmp"].split("|")[5])
    assert 0.2 < flops < 0.9  # gmp to 0.25 saves training FLOPs; dense does not
    assert out.err.count("repeat") == 4  # 2 repeats x 2 variants, interleaved


def test_bad_variants_are_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_wallclock.main(["--variants", "lqr,bogus"])
    err = capsys.readouterr().err
    assert "must include dense" in err and "'bogus'" in err and "'gmp'" in err


def test_small_trains_the_lqr_runs_architecture_and_splits_the_ratio_at_its_floor(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``small`` runs right after ``lqr`` on its checkpoint's widths: its FLOPs are the lqr run's final FLOPs per step,
    below the lqr run's average (which spent its first steps wider); the floor columns are filled from it."""
    bench_wallclock.main(["--tasks", "mlp", "--variants", "dense,lqr,small", "--repeats", "1", "--extra", "debug=fast",
                          "trainer.max_epochs=1"])
    out = capsys.readouterr()
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.out.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"variant", "dense", "lqr", "small"}
    lqr_flops, small_flops = float(rows["lqr"][5]), float(rows["small"][5])
    assert small_flops < lqr_flops < 1.0
    assert float(rows["small"][11]) == pytest.approx(1.0, abs=0.011)  # small is its own floor
    assert float(rows["dense"][11]) == pytest.approx(1.0, abs=0.011)
    assert float(rows["lqr"][10]) > 0 and float(rows["lqr"][11]) > 0
    order = [line.split()[3] for line in out.err.splitlines() if "repeat" in line]
    assert order == ["dense", "lqr", "small"]


def test_small_without_lqr_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_wallclock.main(["--variants", "dense,small"])
    assert "needs lqr" in capsys.readouterr().err


def test_the_floor_is_affine_in_flops_through_small_and_dense() -> None:
    assert bench_wallclock.floor_ratio(0.25, 0.4, 0.25) == pytest.approx(0.4)
    assert bench_wallclock.floor_ratio(1.0, 0.4, 0.25) == pytest.approx(1.0)
    assert bench_wallclock.floor_ratio(0.625, 0.4, 0.25) == pytest.approx(0.7)
