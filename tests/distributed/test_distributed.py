"""DDP and FSDP2 pruning strategies, 2 CPU ranks over gloo, each run a subprocess (``worker.py``).

Every run prunes three times (steps 4, 8, 12). The module-scoped fixtures run each configuration
once (~20 s each); the tests read the per-rank records the worker writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctprune_lightning import CheckpointError, load_pruned
from ctprune_lightning.models import MLPClassifier

WORKER = Path(__file__).with_name("worker.py")
TIMEOUT = 240  # a hang (the failure we guard against) ends the test instead of CI


def run(out: Path, strategy: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(WORKER), "--strategy", strategy, "--out", str(out), *args],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=out.parent)
    if check and proc.returncode != 0:
        raise AssertionError(f"worker {strategy} {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def records(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2) if (out / f"rank{r}.json").exists()]


def close(a: dict, b: dict, rtol: float) -> float:
    """Largest relative difference between two digests (sums and sums of squares of every tensor)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        for x, y in zip(a[key], b[key]):
            worst = max(worst, abs(x - y) / max(abs(y), 1e-2))
    assert worst <= rtol, worst
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    out = {"single": root / "single", "ddp": root / "ddp", "fsdp": root / "fsdp", "fsdp_full": root / "fsdp_full"}
    run(out["single"], "single")
    run(out["ddp"], "ddp", "--save", "1")
    run(out["fsdp"], "fsdp", "--save", "1")
    run(out["fsdp_full"], "fsdp", "--save", "1", "--sharded", "0")
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ranks_agree_after_every_surgery(runs: dict[str, Path], strategy: str) -> None:
    r0, r1 = records(runs[strategy])
    assert r0["world_size"] == r1["world_size"] == 2
    surgeries = [e for e in r0["events"] if e["step"] > 1]
    assert [e["step"] for e in surgeries] == [4, 8, 12]  # at least twice, at the control steps
    assert len(r0["surgery_hashes"]) == 3 and all(len(set(h)) == 1 for h in r0["surgery_hashes"])
    for e0, e1 in zip(r0["events"], r1["events"]):
        assert e0["hash"] == e1["hash"] and e0["widths"] == e1["widths"]
        assert e0["digest"] == e1["digest"]  # every parameter and Adam moment, bit for bit
    assert r0["final"] == r1["final"]
    widths = [e["widths"]["net.1"] for e in r0["events"]]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 64
    losses = r0["losses"]
    assert sum(losses[-6:]) / 6 < 0.6 * sum(losses[:3]) / 3  # the loss keeps falling through the cuts


def test_fsdp_really_shards_the_shrunk_parameters(runs: dict[str, Path]) -> None:
    last = records(runs["fsdp"])[1]["events"][-1]
    assert last["shards"], "no DTensor parameters: FSDP2 was not applied"
    for name, (local, total) in last["shards"].items():
        assert local < total, name  # each rank holds a part
    assert last["shards"]["net.1.weight"][1] == last["widths"]["net.1"] * 32  # re-sharded at the new width


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(runs: dict[str, Path], strategy: str) -> None:
    (single,), (dist0, _) = records(runs["single"]), records(runs[strategy])
    assert dist0["summary"]["widths"] == single["summary"]["widths"] == {"net.1": 32, "net.3": 28}
    assert dist0["summary"]["train_flops_saved"] == pytest.approx(single["summary"]["train_flops_saved"])
    # forward + backward of one rank's half batch, counted without collectives; the job's total equals one process's
    assert 2 * dist0["summary"]["dense_step_flops"] == single["summary"]["dense_step_flops"]
    assert dist0["summary"]["train_flops"] == pytest.approx(single["summary"]["train_flops"])
    assert dist0["summary"]["world_size"] == 2 and single["summary"]["world_size"] == 1
    for e, s in zip(dist0["events"], single["events"]):
        assert e["step"] == s["step"] and e["widths"] == s["widths"]
        close(e["digest"], s["digest"], rtol=1e-3)  # float32, summed in another order over ranks
    close(dist0["final"], single["final"], rtol=1e-3)


@pytest.mark.parametrize("strategy,source", [("ddp", "ddp"), ("fsdp", "fsdp"), ("fsdp", "fsdp_full")])
def test_resume_after_a_surgery_equals_the_uninterrupted_run(runs: dict[str, Path], tmp_path: Path,
                                                            strategy: str, source: str) -> None:
    ckpt = runs[source] / "ckpt" / "step6.ckpt"  # after the cut at step 4, before the one at step 8
    assert ckpt.is_dir() == (source == "fsdp")  # sharded folder vs one full file
    run(tmp_path / "r", strategy, "--ckpt-path", str(ckpt))
    resumed, full = records(tmp_path / "r")[0], records(runs[source])[0]
    assert resumed["events"][0]["widths"]["net.1"] < 64  # rebuilt shrunk before the weights loaded
    assert resumed["summary"]["widths"] == full["summary"]["widths"]
    assert resumed["summary"]["history"] == full["summary"]["history"]
    assert resumed["final"] == full["final"]  # bit for bit


@pytest.mark.parametrize("source", ["ddp", "fsdp", "fsdp_full"])
def test_load_pruned_reads_distributed_checkpoints_on_one_process(runs: dict[str, Path], source: str) -> None:
    model = load_pruned(MLPClassifier, runs[source] / "ckpt" / "step24.ckpt")
    final = records(runs[source])[0]["final"]
    assert (model.net[1].out_features, model.net[3].out_features) == (32, 28)
    digest = {n: [float(p.detach().double().sum()), float(p.detach().double().pow(2).sum())]
              for n, p in model.named_parameters()}
    assert digest == {k: v for k, v in final.items() if ":" not in k}
    assert model(torch.zeros(1, 32)).shape == (1, 10)


def test_a_sharded_folder_without_metadata_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.ckpt").mkdir()
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        load_pruned(MLPClassifier, tmp_path / "bad.ckpt")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_surgery_failing_on_one_rank_ends_every_rank_with_its_error(tmp_path: Path, strategy: str) -> None:
    proc = run(tmp_path / "f", strategy, "--fail-rank", "1", check=False)  # within TIMEOUT: no hang
    assert proc.returncode != 0
    message = "surgery failed (rank 1: RuntimeError: planted failure on rank 1)"
    assert proc.stderr.count(message) >= 2, proc.stderr[-3000:]  # raised on rank 0 and on rank 1
    assert "[rank0]" in proc.stderr and records(tmp_path / "f") == []  # neither rank finished


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_budget_loop_reads_the_same_held_out_damage_on_every_rank(tmp_path: Path, strategy: str) -> None:
    out = tmp_path / strategy
    run(out, strategy, "--budget", "0.3")  # 24 steps: a cut must repay its sizing soon
    r0, r1 = records(out)
    assert r0["held_out"] == r1["held_out"] == 2  # validation batches, kept on every rank
    # each rank probes its own validation samples: one reading (averaged over ranks), one plan
    assert r0["budget_trace"] and r0["budget_trace"] == r1["budget_trace"]
    assert any(u > 0 for _, _, u in r0["budget_trace"])  # it cut
    assert r0["surgery_hashes"] == r1["surgery_hashes"] and len(r0["surgery_hashes"]) >= 1
