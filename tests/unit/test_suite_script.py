"""experiments/suite.sh: every group of a task, the seeds, and the baselines that depend on the lqr runs.

``PY`` is a stand-in for the venv's python that records each ``train.py -m`` call and writes the
summaries and checkpoints a real multirun would, so the script's own logic is what is tested.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FAKE_PY = r'''#!/usr/bin/env python3
import json, os, pathlib, subprocess, sys
args = sys.argv[1:]
if args[:1] == ["-"]:  # the script's own inline python (lqr_steps): run it for real
    sys.exit(subprocess.run([sys.executable, *args]).returncode)
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps(args) + "\n")
kv = dict(a.split("=", 1) for a in args if "=" in a)
sweep = pathlib.Path(kv["hydra.sweep.dir"])
for i, seed in enumerate(kv["seed"].split(",")):
    assert kv["hydra.sweep.subdir"] == "${hydra.job.num}_seed${seed}"  # short: long override lists overflow a name
    run = sweep / f"{i}_seed{seed}"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / "last.ckpt").write_text(seed)
    steps = 1000 if "trainer.max_steps" not in kv else int(kv["trainer.max_steps"])
    flops = 0.3 if kv.get("controller") == "lqr" else 1.0
    (run / "summary.json").write_text(json.dumps({"seed": int(seed), "steps": steps, "train_flops": flops * steps,
                                                  "dense_train_flops": float(steps)}))
'''


def run_suite(tmp_path: Path, task: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    proc = subprocess.run(["bash", str(REPO / "experiments" / "suite.sh"), task, str(tmp_path / "out")],
                          env={**os.environ, "PY": str(fake), "CALLS": str(calls), **env},
                          capture_output=True, text=True, timeout=120)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc, [json.loads(line) for line in lines]


def group_of(call: list[str]) -> str:
    return Path(dict(a.split("=", 1) for a in call if "=" in a)["hydra.sweep.dir"]).name


def test_a_task_runs_every_baseline_with_three_seeds_and_derives_short_and_small_from_lqr(tmp_path: Path) -> None:
    proc, calls = run_suite(tmp_path, "resnet")
    assert proc.returncode == 0, proc.stderr
    groups = [group_of(c) for c in calls]
    assert groups == ["dense", "lqr", "pid", "gmp", "gmp_mild", "gmp_sweep", "linear", "budget", "budget_pid", "null",
                      "lqr_taylor", "lqr_magnitude", "model_pruning", "short", "small", "small", "small", "budget_points",
                      "lqr_round8"]
    for c in calls:
        assert "experiment=resnet_fmnist" in c and "trainer.limit_train_batches=100" in c
    assert all("seed=0,1,2" in c for c in calls[:14])
    assert "pruning.target=0.25,0.35,0.5" in calls[3] and "pruning.target=0.75,0.9" in calls[4]
    assert "pruning.target=0.1,0.2,0.3,0.4,0.6,0.7,0.8" in calls[5]  # with 0.5 and 0.9: the sweep 0.1 .. 0.9
    assert "controller=pid" in calls[8] and "pruning.quality_budget=0.01" in calls[8]
    assert "controller=gmp" in calls[9] and "pruning.target=0.99" in calls[9]
    assert "trainer.max_steps=300" in calls[13]  # lqr's 30% of the training FLOPs of 1000 dense steps
    assert "pruning.budget_metric=error" in calls[17] and "pruning.quality_budget=0.003" in calls[17]
    for seed, c in zip("012", calls[14:17]):  # each seed's small net is that seed's lqr architecture
        assert f"seed={seed}" in c and "controller=none" in c
        ckpt = next(a.split("=", 1)[1] for a in c if a.startswith("architecture_from="))
        assert ckpt[0] == ckpt[-1] == "'"  # quoted for Hydra's override grammar (a path may hold '=' or ',')
        ckpt = ckpt[1:-1]
        assert Path(ckpt).read_text() == seed and "/lqr/" in ckpt
    assert "callbacks.model_pruning.epochs=2" in calls[12]
    assert calls[-1][-1] == "pruning.round_to=8"

    # a second call resumes: every group is done already, nothing runs again
    proc2, calls2 = run_suite(tmp_path, "resnet")
    assert proc2.returncode == 0 and len(calls2) == len(calls) and proc2.stdout.count("done already") == 19


def test_lru_adds_the_hankel_group_and_mlp_masks_over_four_epochs(tmp_path: Path) -> None:
    proc, calls = run_suite(tmp_path / "lru", "lru", SEEDS="0")
    assert proc.returncode == 0, proc.stderr
    assert group_of(calls[-1]) == "hankel" and "controller=hankel" in calls[-1]
    proc, calls = run_suite(tmp_path / "mlp", "mlp", SEEDS="0")
    assert proc.returncode == 0, proc.stderr
    assert group_of(calls[-1]) == "small_native" and "model.hidden=[424,424]" in calls[-1]
    mp = next(c for c in calls if group_of(c) == "model_pruning")
    assert "callbacks.model_pruning.epochs=4" in mp and not any(a.startswith("experiment=") for a in mp)


def test_an_unknown_task_names_the_choices(tmp_path: Path) -> None:
    proc, calls = run_suite(tmp_path, "vit")
    assert proc.returncode == 2 and "unknown task 'vit'" in proc.stderr and "mlp, resnet, gpt, lru" in proc.stderr
    assert calls == []


def test_gpu_scale_moves_every_group_to_the_gpu_trainer(tmp_path: Path) -> None:
    proc, calls = run_suite(tmp_path, "gpt", SEEDS="0", SCALE="gpu")
    assert proc.returncode == 0, proc.stderr
    short = next(c for c in calls if group_of(c) == "short")  # its own step count wins over the scale's
    assert short.index("trainer.max_steps=1500") > short.index("trainer.max_steps=5000")
    assert all("trainer=gpu" in c and "trainer.limit_train_batches=50" not in c for c in calls)
