"""Paired short-horizon forks: how far each cut depth has recovered after k steps, against the same k steps dense.

    python experiments/fork_curve.py mlp OUT.json [--at 0.05] [--steps 80] [--seed 0]

Trains the task's CPU-scale run dense and, at progress ``--at``, snapshots the model and its optimizer and keeps
the next ``--steps`` training batches. Once the main run has trained on them, forks of the snapshot — one dense,
one cut by the loop's own planner and importance to each compute fraction of the ladder — are trained on the same
batches with the same optimizer state (the cut moves it, as a real cut does), and the held-out probe of each
fork is read every 20 steps. The log-ratio of a cut fork's probe to the dense fork's is a paired measurement of
the damage that survives a short recovery (issue 16: does it predict the GMP sweep's final damage?).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import train as T  # noqa: E402
from jump_curve import compose_task  # noqa: E402
from ctprune_lightning.controllers import Observation  # noqa: E402
from ctprune_lightning.surgery.groups import apply_plan_  # noqa: E402

LADDER = (1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)


def layout(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's parameter groups with each parameter as its index in ``model.parameters()``."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
            for g in opt.param_groups]


def clone(model: torch.nn.Module, groups: list[dict], opt_cls: type, opt_state: dict):
    """A deep copy of ``model`` (without its trainer) and an optimizer ``opt_cls`` laid out as ``groups`` on it."""
    trainer = model.__dict__.pop("_trainer", None)
    try:
        m = copy.deepcopy(model)
    finally:
        if trainer is not None:
            model.__dict__["_trainer"] = trainer
    params = list(m.parameters())
    o = opt_cls([{**g, "params": [params[i] for i in g["params"]]} for g in groups])
    o.load_state_dict(copy.deepcopy(opt_state))
    return m, o


class ForkCurve(L.Callback):
    def __init__(self, at: float, steps: int) -> None:
        self.at, self.steps, self.rows = at, steps, []
        self.snap = None
        self.batches: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        p = trainer.global_step / trainer.estimated_stepping_batches
        if self.snap is None and p >= self.at:
            cb = T.find_pruning_callback(trainer.callbacks)
            loop = cb.loop
            opt = trainer.optimizers[0]
            groups = layout(pl_module, opt)
            m, _ = clone(pl_module, groups, type(opt), opt.state_dict())
            widths = loop.widths(pl_module)
            obs = Observation(step=trainer.global_step, progress=p, compute=loop.compute(pl_module), damage=0.0)
            keeps = {f: loop._keep(pl_module, widths, loop._plan_widths(pl_module, obs, 1.0 - f)) for f in LADDER}
            self.snap = (m, (groups, type(opt)), copy.deepcopy(opt.state_dict()), keeps, trainer.global_step, p)
        if self.snap is not None and len(self.batches) < self.steps:
            self.batches.append(copy.deepcopy(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.snap is None or len(self.batches) < self.steps:
            return
        loop = T.find_pruning_callback(trainer.callbacks).loop
        snap_model, opt, opt_state, keeps, step0, p0 = self.snap
        curves = {}
        for f, keep in keeps.items():
            m, o = clone(snap_model, *opt, opt_state)
            if keep:
                apply_plan_(m, loop.groups, {n: torch.as_tensor(i, dtype=torch.long) for n, i in keep.items()}, [o])
            m.train()
            reads = [loop.probe_loss(m)]
            for i, b in enumerate(self.batches, 1):
                o.zero_grad(set_to_none=True)
                loop.loss_fn(m, b).backward()
                o.step()
                if i % 20 == 0:
                    reads.append(loop.probe_loss(m))
            curves[f] = reads
            print(f"f={f}: " + " ".join(f"{r:.4f}" for r in reads), flush=True)
        dense = curves[1.0]
        gaps = {f: [math.log(r / d) for r, d in zip(c, dense)] for f, c in curves.items()}
        self.rows.append({"progress": p0, "step": step0, "steps": self.steps, "probe": curves, "gaps": gaps})
        trainer.should_stop = True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task")
    ap.add_argument("out")
    ap.add_argument("--at", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = compose_task(a.task, a.seed)
    L.seed_everything(cfg.seed, workers=True)
    dm = T.instantiate_datamodule(cfg)
    model = T.instantiate_model(cfg, dm)
    fc = ForkCurve(a.at, a.steps)
    trainer = T.instantiate(cfg.trainer, callbacks=T.instantiate_callbacks(cfg) + [fc], logger=False)
    trainer.fit(model, datamodule=dm)
    Path(a.out).write_text(json.dumps({"task": a.task, "seed": a.seed, "rows": fc.rows}, indent=1))


if __name__ == "__main__":
    main()
