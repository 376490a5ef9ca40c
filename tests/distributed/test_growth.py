"""Growth under DDP and FSDP2 (2 CPU ranks): a group grown at step 10, between the cuts at 8 and 12.

After the growth every rank holds the same architecture, parameters and Adam moments (bit for bit); a run
resumed from a checkpoint written after the growth ends where the uninterrupted run ends; ``load_pruned``
rebuilds the grown-then-cut model on one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed import records, run

from ctprune_lightning import load_pruned
from ctprune_lightning.models import MLPClassifier


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grow")
    out = {"ddp": root / "ddp", "fsdp": root / "fsdp"}
    for strategy, path in out.items():
        run(path, strategy, "--save", "1", "--grow", "8")
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ranks_agree_after_a_growth(grown: dict[str, Path], strategy: str) -> None:
    r0, r1 = records(grown[strategy])
    steps = [e["step"] for e in r0["events"] if e["step"] > 1]
    assert steps == [4, 8, 10, 12], steps  # three cuts and the growth
    width = {e["step"]: e["widths"]["net.1"] for e in r0["events"]}
    assert width[10] == width[8] + 8 and r0["events"][-1]["widths"]["net.1"] < width[10]
    assert len(r0["surgery_hashes"]) == 4 and all(len(set(h)) == 1 for h in r0["surgery_hashes"])
    for e0, e1 in zip(r0["events"], r1["events"]):
        assert e0["hash"] == e1["hash"] and e0["widths"] == e1["widths"]
        assert e0["digest"] == e1["digest"]  # every parameter and Adam moment, bit for bit
    grow_event = next(e for e in r0["events"] if e["step"] == 10)
    moments = [k for k in grow_event["digest"] if k.startswith("net.1.weight:exp_avg")]
    assert moments, "no Adam moments were carried through the growth"
    if strategy == "fsdp":
        local, total = grow_event["shards"]["net.1.weight"]
        assert local < total == width[10] * 32  # re-sharded at the grown width
    assert r0["final"] == r1["final"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_after_a_growth_equals_the_uninterrupted_run(grown: dict[str, Path], tmp_path: Path,
                                                           strategy: str) -> None:
    ckpt = grown[strategy] / "ckpt" / "step12.ckpt"  # written after the growth at step 10
    run(tmp_path / "r", strategy, "--ckpt-path", str(ckpt), "--grow", "8")  # step 10 is behind it: no growth
    resumed, full = records(tmp_path / "r")[0], records(grown[strategy])[0]
    assert resumed["summary"]["widths"] == full["summary"]["widths"]
    assert resumed["final"] == full["final"]  # bit for bit


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_load_pruned_of_a_grown_checkpoint(grown: dict[str, Path], strategy: str) -> None:
    final = records(grown[strategy])[0]["final"]
    model = load_pruned(MLPClassifier, grown[strategy] / "ckpt" / "step24.ckpt")
    digest = {n: [float(p.detach().double().sum()), float(p.detach().double().pow(2).sum())]
              for n, p in model.named_parameters()}
    assert digest == {k: v for k, v in final.items() if ":" not in k}
    grown_model = load_pruned(MLPClassifier, grown[strategy] / "ckpt" / "step12.ckpt")
    widths = {e["step"]: e["widths"]["net.1"] for e in records(grown[strategy])[0]["events"]}
    assert grown_model.net[1].out_features == widths[12]
