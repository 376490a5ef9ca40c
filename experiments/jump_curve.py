"""How a trial cut's immediate jump grows with its depth, early in training, per task (issue 16 analysis).

    python experiments/jump_curve.py mlp OUT.json [--at 0.05 0.1 0.15] [--seed 0]

Trains the task's CPU-scale run dense (a budget controller whose warm-up never ends, so the held-out probe
is read as in the budget loop) and, at each progress point of ``--at``, reads the held-out probe with the
model cut by trial (nothing committed) to each compute fraction of a ladder, with each jump's standard
error (from the spread of its per-batch changes). The ladder's jumps, set
against the GMP sweep's final quality at the same fractions, show whether an early trial predicts how far
a task can be cut.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train as T  # noqa: E402
from ctprune_lightning.controllers import Observation  # noqa: E402
from ctprune_lightning.loop_planning import keep_key  # noqa: E402

LADDER = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


class JumpCurve(L.Callback):
    def __init__(self, at: list[float]) -> None:
        self.at, self.rows = sorted(at), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        total = trainer.estimated_stepping_batches
        p = trainer.global_step / total
        if not self.at or p < self.at[0]:
            return
        self.at.pop(0)
        cb = T.find_pruning_callback(trainer.callbacks)
        loop = cb.loop
        widths = loop.widths(pl_module)
        before = loop.probe_loss(pl_module)
        loop._before, loop._before_batches = (before, before), list(loop.store.last_batches)
        obs = Observation(step=trainer.global_step, progress=p, compute=loop.compute(pl_module), damage=0.0)
        row = {"progress": p, "step": trainer.global_step, "probe": before, "jumps": {}, "errors": {}}
        for f in LADDER:
            keep = loop._keep(pl_module, widths, loop._plan_widths(pl_module, obs, 1.0 - f))
            row["jumps"][f] = loop.trial_jump(pl_module, keep) if keep else 0.0
            row["errors"][f] = loop.trial_reads[keep_key(keep)][1] if keep else None  # the per-batch spread's
        self.rows.append(row)
        print(f"p={p:.3f} probe={before:.4f} " + " ".join(f"{f}:{j:+.4f}±{row['errors'][f] or 0:.4f}"
                                                           for f, j in row["jumps"].items()), flush=True)
        if not self.at:
            trainer.should_stop = True


def compose_task(task: str, seed: int, probe_batches: int = 2):
    """The task's suite config (CPU scale) with a budget controller that never leaves its warm-up."""
    over = subprocess.run([str(ROOT / "experiments/suite.sh"), "overrides", task], capture_output=True,
                          text=True, check=True).stdout.split()
    over += [f"seed={seed}", "controller=lqr", "pruning.quality_budget=0.01", "pruning.target=0.05",
             "controller.warmup=0.99", "logger=csv", f"pruning.probe_batches={probe_batches}",
             "~callbacks.model_checkpoint", f"paths.output_dir=/tmp/jc/{task}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=over)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task")
    ap.add_argument("out")
    ap.add_argument("--at", type=float, nargs="+", default=[0.05, 0.1, 0.15])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-batches", type=int, default=2)
    a = ap.parse_args()
    cfg = compose_task(a.task, a.seed, a.probe_batches)
    L.seed_everything(cfg.seed, workers=True)
    dm = T.instantiate_datamodule(cfg)
    model = T.instantiate_model(cfg, dm)
    jc = JumpCurve(a.at)
    trainer = T.instantiate(cfg.trainer, callbacks=T.instantiate_callbacks(cfg) + [jc], logger=False)
    trainer.fit(model, datamodule=dm)
    Path(a.out).write_text(json.dumps({"task": a.task, "seed": a.seed, "rows": jc.rows}, indent=1))


if __name__ == "__main__":
    main()
