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
