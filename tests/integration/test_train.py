"""Tier 2: `train.py` end to end as a subprocess (fast debug config), and bad configs failing loudly."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180


def run_train(*overrides: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def lqr_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    run_dir = tmp_path_factory.mktemp("lqr_run")
    return run_train("debug=fast", "controller=lqr", run_dir=run_dir), run_dir


def test_fast_lqr_run_succeeds(lqr_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, run_dir = lqr_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ctprune summary" in proc.stdout
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_fast_lqr_run_writes_a_pruned_summary(lqr_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, run_dir = lqr_run
    path = run_dir / "summary.json"
    assert path.exists(), proc.stderr[-3000:]
    summary = json.loads(path.read_text())
    assert summary["controller"] == "lqr" and summary["importance"] == "trajectory"
    assert summary["seed"] == 0 and summary["target"] == pytest.approx(0.25)
    # 10 balanced synthetic classes (chance: 10%, loss ln 10); this run reaches ~54% (seed 0): it learned
    assert 0.3 < summary["test_acc"] <= 1.0 and 0.0 < summary["test_loss"] < math.log(10)
    widths, dense = summary["widths"], summary["dense_widths"]
    assert widths and set(widths) == set(dense)
    assert all(widths[g] <= dense[g] for g in widths) and sum(widths.values()) < sum(dense.values())
    assert summary["params"] < summary["dense_params"]
    assert summary["flops_fraction"] < 1.0
    assert summary["train_flops_saved"] > 0.0
    assert summary["train_flops"] < summary["dense_train_flops"]
    assert summary["steps"] > 0 and summary["fit_time_s"] > 0.0
    assert summary["trace"] and {"step", "compute", "damage", "action"} <= set(summary["trace"][0])


def test_fast_lqr_run_logs_summary_to_csv(lqr_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, run_dir = lqr_run
    metrics = run_dir / "csv" / "metrics.csv"
    assert metrics.exists()
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    assert "summary/train_flops_saved" in rows[0] and "test/acc" in rows[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    tested = [r for r in rows if r["test/acc"]]
    assert len(tested) == 1  # the summary's test numbers are the logged ones
    assert float(tested[0]["test/acc"]) == pytest.approx(summary["test_acc"], rel=1e-6)
    assert float(tested[0]["test/loss"]) == pytest.approx(summary["test_loss"], rel=1e-6)
    saved = [float(r["summary/train_flops_saved"]) for r in rows if r["summary/train_flops_saved"]]
    assert saved == [pytest.approx(summary["train_flops_saved"], rel=1e-6)]


@pytest.mark.parametrize(
    ("override", "expected"),
    [("pruning.target=1.5", "1.5"), ("controller=foo", "foo"), ("model.hidden=[]", "has nothing prunable")],
    ids=["target-out-of-range", "unknown-controller", "nothing-prunable"],
)
def test_bad_config_exits_non_zero(tmp_path: Path, override: str, expected: str) -> None:
    proc = run_train("debug=fast", override, run_dir=tmp_path)
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout
    if override.startswith("controller="):
        assert "Available options" in proc.stderr and "lqr" in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_summary_without_pruning_callback_and_plain_json(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    import train
    from ctprune_lightning.summary import format_summary, write_summary

    cfg = OmegaConf.create({"seed": 3, "importance": {"name": "taylor"}})
    summary = train.build_summary(cfg, None, {"test/acc": torch.tensor(0.5)}, 1.25, 10, (100, 100))
    assert summary["controller"].startswith("none") and summary["widths"] is None
    assert summary["seed"] == 3 and summary["steps"] == 10 and summary["fit_time_s"] == 1.25
    summary["extra"] = {"a": np.float32(0.25), "b": (1, 2), "nan": float("nan")}
    path = write_summary(summary, tmp_path / "sub" / "summary.json")
    data = json.loads(path.read_text())
    assert data["test_acc"] == 0.5 and data["extra"] == {"a": 0.25, "b": [1, 2], "nan": None}
    text = format_summary(data)
    assert "test acc" in text and "50.00%" in text and "n/a" in text


def test_format_summary_trace_keeps_every_cut() -> None:
    from ctprune_lightning.summary import format_summary

    trace = [{"step": 10 * i, "compute": 1.0, "damage": 0.0, "action": 0.1 if i in (3, 7) else 0.0}
             for i in range(100)]
    text = format_summary({"trace": trace}, max_trace_rows=8)
    rows = [ln.split() for ln in text.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    steps = [int(r[0]) for r in rows]
    assert {30, 70, 0, 990} <= set(steps) and len(steps) <= 8
    assert "of 100 intervals shown" in text


def test_train_py_resumes_from_a_pruned_checkpoint(
    lqr_run: tuple[subprocess.CompletedProcess[str], Path], tmp_path: Path
) -> None:
    proc, run_dir = lqr_run
    first = json.loads((run_dir / "summary.json").read_text())
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists(), proc.stderr[-2000:]
    resumed = run_train("debug=fast", "controller=lqr", "trainer.max_epochs=3", f"ckpt_path={last}", run_dir=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == first["steps"] * 3 // 2  # continued from the checkpoint's step
    # the resumed run starts from the shrunk widths, and its history continues the first run's
    assert all(summary["widths"][k] <= first["widths"][k] for k in first["widths"])
    assert summary["trace"][: len(first["trace"])] == first["trace"]
    assert summary["train_flops"] > first["train_flops"]


def test_architecture_from_trains_the_pruned_net_from_fresh_weights(
    lqr_run: tuple[subprocess.CompletedProcess[str], Path], tmp_path: Path
) -> None:
    import torch

    _, run_dir = lqr_run
    first = json.loads((run_dir / "summary.json").read_text())
    last = run_dir / "checkpoints" / "last.ckpt"
    scratch = run_train("debug=fast", "controller=none", f"architecture_from={last}", run_dir=tmp_path / "s")
    assert scratch.returncode == 0, scratch.stderr[-3000:]
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["widths"] == summary["dense_widths"] == first["widths"] != first["dense_widths"]
    assert summary["params"] == first["params"] and summary["surgeries"] == 0
    # fresh weights: nothing of the pruned run's trained weights was carried over (first steps differ)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    fresh = torch.load(tmp_path / "s" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert ckpt.keys() == fresh.keys() and all(ckpt[k].shape == fresh[k].shape for k in ckpt)
    assert not torch.allclose(ckpt["net.1.weight"], fresh["net.1.weight"])

    from ctprune_lightning.checkpoint import CheckpointError, shrink_to_checkpoint_
    from ctprune_lightning.models import MLPClassifier

    hparams = torch.load(last, map_location="cpu", weights_only=True)["hyper_parameters"]
    model = MLPClassifier(**hparams)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    shrink_to_checkpoint_(model, last)
    for k, v in model.state_dict().items():  # the model's own init, restricted to the pruned shapes
        assert v.shape == ckpt[k].shape and torch.equal(v, init[k][tuple(slice(0, n) for n in v.shape)])
    narrow = MLPClassifier(**(hparams | {"hidden": [4, 4]}))
    before = {k: v.clone() for k, v in narrow.state_dict().items()}
    with pytest.raises(CheckpointError, match="wider than the fresh model"):
        shrink_to_checkpoint_(narrow, last)
    after = narrow.state_dict()  # refused before anything changed
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    missing = run_train("debug=fast", "controller=none", f"architecture_from={tmp_path}/nope.ckpt", run_dir=tmp_path / "m")
    assert missing.returncode != 0 and "nope.ckpt" in missing.stderr and "no such checkpoint" in missing.stderr
