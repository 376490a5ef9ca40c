"""One process: a checkpoint written after a growth resumes exactly and loads with ``load_pruned``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_checkpoint import StopAfterEpoch, loaders, make_callback, make_model, trainer, widths

from ctprune_lightning import ControlPruning, load_pruned
from ctprune_lightning.checkpoint import read_checkpoint
from ctprune_lightning.loop import Plan
from ctprune_lightning.models import MLPClassifier

GROW_STEP, UNITS = 10, 12


class Grow(Callback):
    """Grow ``net.1`` at one step through the control loop's actuator (what a controller's Plan.grow does)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == GROW_STEP:
            cb = next(c for c in trainer.callbacks if isinstance(c, ControlPruning))
            plan = Plan(step=GROW_STEP, widths=cb.loop.widths(pl_module), grow={"net.1": UNITS})
            cb._actuate(trainer, lambda model, optimizers: cb.loop.apply_(model, plan, optimizers))
            self.width = pl_module.net[1].out_features


def test_resume_after_a_growth_equals_the_uninterrupted_run_and_load_pruned_reads_it(tmp_path: Path) -> None:
    train, _ = loaders()
    L.seed_everything(0)
    model_a, grow_a = make_model(), Grow()
    trainer(tmp_path / "a", make_callback(), grow_a, limit_val_batches=0).fit(model_a, train)

    L.seed_everything(0)
    model_b, grow_b = make_model(), Grow()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path / "b", make_callback(), grow_b, ckpt, StopAfterEpoch(1), limit_val_batches=0).fit(model_b, train)
    stop = tmp_path / "b" / "epoch=1-step=16.ckpt"
    assert grow_a.width == grow_b.width > 0
    arch = read_checkpoint(stop)["ctprune"]["arch"]
    assert arch["net.1"]["out_features"] == model_b.net[1].out_features  # the grown (then cut) width

    rebuilt = load_pruned(MLPClassifier, stop)
    state = read_checkpoint(stop)["state_dict"]
    assert widths(rebuilt) == widths(model_b)
    for name, p in rebuilt.state_dict().items():
        assert torch.equal(p, state[name]), name

    L.seed_everything(0)
    model_r = make_model()  # dense: resuming must rebuild the grown-then-cut widths before the weights load
    trainer(tmp_path / "r", make_callback(), Grow(), limit_val_batches=0).fit(model_r, train, ckpt_path=stop)
    assert widths(model_r) == widths(model_a)
    for (name, p_a), (_, p_r) in zip(model_a.state_dict().items(), model_r.state_dict().items()):
        torch.testing.assert_close(p_r, p_a, atol=1e-6, rtol=0, msg=name)
