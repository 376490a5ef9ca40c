"""experiments/gpu_check.sh at its tiny CPU scale: the plumbing the one-shot GPU run relies on (~30 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))
import gpu_check_table  # noqa: E402


def test_gpu_check_tiny_runs_every_variant_eager_and_compiled(tmp_path: Path) -> None:
    env = dict(os.environ, GPU_CHECK_TINY="1", GPU_CHECK_TASKS="mlp", PY=sys.executable,
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "experiments" / "gpu_check.sh"), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (out / "mlp.log").read_text()[-3000:]
    runs = gpu_check_table.load_runs(out / "runs")
    got = {(r["variant"], r["compile"]): r["summary"] for r in runs}
    assert set(got) == {(v, c) for v in ("dense", "budget", "gmp") for c in (False, True)}  # warmup left out
    for (variant, compiled), s in got.items():
        assert s["steps"] == 24 and s["compiled"] is compiled
        assert (s["surgeries"] == 0) == (variant == "dense")
        if compiled:  # every surgery re-specialised the compiled model, and each was recompiled
            assert s["compile_resets"] == s["surgeries"] and s["compile_count"] >= 1
            assert s["compile_recompiles"] >= s["surgeries"] and s["compile_time_s"] > 0
        else:
            assert s["compile_count"] == 0 and s["compile_resets"] == 0
    assert got[("gmp", False)]["flops_fraction"] == pytest.approx(0.5, abs=0.05)
    assert got[("dense", True)]["flops_fraction"] == 1.0
    # the same cuts eager and compiled: the plan does not depend on compilation
    assert got[("gmp", True)]["widths"] == got[("gmp", False)]["widths"]
    table = (out / "table.md").read_text()
    assert table.count("| mlp |") == 6 and "wall/eager" in table
    assert json.loads((out / "runs" / "mlp" / "2_gmp_compileFalse" / "summary.json").read_text())["controller"] == "gmp"


def test_table_needs_a_folder(tmp_path: Path) -> None:
    assert gpu_check_table.main([str(tmp_path / "missing")]) == 2
    assert gpu_check_table.main([str(tmp_path)]) == 1  # no finished runs


def test_an_unknown_scale_is_refused_with_the_choices(tmp_path: Path) -> None:
    env = dict(os.environ, GPU_CHECK_SCALE="huge", PY=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "experiments" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "'huge'" in proc.stderr and "compute or suite" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything is written
