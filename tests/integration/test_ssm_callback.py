"""SSM layers inside ControlPruning: CompreSSM events and LQR both cut by balanced truncation (issue 5)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ctprune_lightning import ControlPruning, load_pruned
from ctprune_lightning.controllers import HankelController, Observation, build_controller
from ctprune_lightning.data.sequential import SequentialDigitsDataModule
from ctprune_lightning.models.lru import LRUClassifier
from ctprune_lightning.surgery.optim import optimizer_params


pytestmark = pytest.mark.usefixtures("one_thread")


def fit(callback: ControlPruning, tmp_path: Path, epochs: int = 4, **kwargs):
    L.seed_everything(0)
    model = LRUClassifier(input_dim=64, d_model=32, d_state=32, num_blocks=1, dropout=0.0)
    dm = SequentialDigitsDataModule(batch_size=64)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback], **kwargs)
    trainer.fit(model, datamodule=dm)
    return trainer, model


def test_compressm_events_cut_by_tolerance_with_the_spectrum_recorded(tmp_path: Path) -> None:
    ctl = HankelController(tau=0.1, events=4, horizon=0.5)
    cb = ControlPruning(controller=ctl, every_n_steps=50, min_width=2)
    trainer, model = fit(cb, tmp_path)
    total = trainer.global_step  # 21 steps per epoch x 4
    steps = [h["step"] for h in cb.history]
    # four events at the first optimizer step at or past progress 0.125, 0.25, 0.375, 0.5
    assert steps == [next(s for s in range(1, total + 1) if s / total >= 0.5 * k / 4) for k in range(1, 5)]
    dims = [h["widths"]["blocks.0.lru"] for h in cb.history]
    assert dims == sorted(dims, reverse=True) and dims[-1] < 32 == cb.dense_widths["blocks.0.lru"]
    assert model.blocks[0].lru.state_dim == dims[-1] == model.blocks[0].lru.nu_log.numel()
    for event in cb.history:  # the rank is the tolerance rule's: keep (1 - tau) of the Hankel energy
        hsv = torch.tensor(event["hankel_spectra"]["blocks.0.lru"])
        r = event["widths"]["blocks.0.lru"]
        assert hsv[:r].sum() >= 0.9 * hsv.sum() > hsv[: r - 1].sum()
    live, in_opt = list(model.parameters()), optimizer_params(trainer.optimizers)
    assert len(in_opt) == len(live) and all(any(p is q for q in in_opt) for p in live)
    assert cb.summary()["train_flops_saved"] > 0.2


def test_lqr_drives_the_state_dimension_to_the_compute_setpoint(tmp_path: Path) -> None:
    cb = ControlPruning(controller="lqr", target=0.5, every_n_steps=3, min_width=2)
    _, model = fit(cb, tmp_path, epochs=2)
    s = cb.summary()
    assert 0.5 <= s["flops_fraction"] < 0.6
    assert s["widths"]["blocks.0.lru"] < 32 and model.blocks[0].lru.state_dim == s["widths"]["blocks.0.lru"]
    assert all(len(h["hankel_spectra"]["blocks.0.lru"]) > h["widths"]["blocks.0.lru"] for h in cb.history)


def test_a_reduced_lru_checkpoint_loads_for_inference(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cb = ControlPruning(controller=HankelController(mode="fraction", fraction=0.25, events=2, horizon=0.5),
                        every_n_steps=50, min_width=2)
    _, model = fit_with(cb, ckpt, tmp_path)
    loaded = load_pruned(LRUClassifier, tmp_path / "last.ckpt")
    assert loaded.blocks[0].lru.state_dim == model.blocks[0].lru.state_dim == 18  # 32 -> 24 -> 18
    x = torch.randn(3, 64, 1)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def fit_with(cb: ControlPruning, ckpt: ModelCheckpoint, tmp_path: Path):
    L.seed_everything(0)
    model = LRUClassifier(input_dim=64, d_model=32, d_state=32, num_blocks=1, dropout=0.0)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[cb, ckpt],
                        limit_val_batches=0)
    trainer.fit(model, datamodule=SequentialDigitsDataModule(batch_size=64))
    return trainer, model


def test_hankel_controller_events_and_state() -> None:
    ctl = build_controller("hankel", target=0.5, tau=0.05)
    assert ctl.step(Observation(step=1, progress=0.5, compute=1.0, damage=0.0)) == 0.0  # never cuts by compute
    fired = [p for p in (0.01, 0.025, 0.03, 0.05, 0.2) if ctl.rank_event(Observation(0, p, 1.0, 0.0))]
    assert fired == [0.025, 0.05, 0.2]  # 0.2 passes the last two points at once: one event
    assert ctl.done == 4 and not ctl.due(1.0)
    clone = HankelController()
    clone.load_state_dict(ctl.state_dict())
    assert clone.done == 4
    with pytest.raises(ValueError, match="mode='energy' is not supported; choose one of"):
        HankelController(mode="energy")
    with pytest.raises(ValueError, match="`tau` must be in"):
        HankelController(tau=1.5)


def test_snapshot_restore_grows_back_weights_and_optimizer_state() -> None:
    from ctprune_lightning.rollback import Snapshot
    from ctprune_lightning.surgery import apply_plan_, discover_groups

    torch.manual_seed(0)
    model = LRUClassifier(input_dim=64, d_model=16, d_state=24, num_blocks=1, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 64, 1), torch.randint(0, 10, (8,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    snap = Snapshot.take(model, [opt])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {n: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for n, p in model.named_parameters()}
    groups, _ = discover_groups(model, model.example_input_array)
    apply_plan_(model, groups, {"blocks.0.lru": torch.arange(10)}, [opt])
    step()
    assert model.blocks[0].lru.state_dim == 10
    snap.restore_(model, [opt])
    assert model.blocks[0].lru.state_dim == 24
    for k, v in weights.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # exact, every moment: after one AdamW step exp_avg_sq = 1e-3 g², below any default absolute tolerance
    assert float(moments["blocks.0.lru.B_re"]["exp_avg_sq"].abs().max()) > 0
    for n, p in model.named_parameters():
        for k, v in moments[n].items():
            torch.testing.assert_close(opt.state[p][k], v, rtol=0, atol=0, msg=f"{n}.{k}")
    live, in_opt = list(model.parameters()), optimizer_params([opt])
    assert len(in_opt) == len(live) and all(any(p is q for q in in_opt) for p in live)
    before = model.blocks[0].lru.B_re.detach().clone()
    step()
    assert not torch.equal(before, model.blocks[0].lru.B_re)


def test_rollback_mode_undoes_an_event_that_hurt_validation_and_stops(tmp_path: Path) -> None:
    # rollback_tol=-1: only an accuracy gain of over 100 points would pass, so the first checked event is undone
    ctl = HankelController(mode="fraction", fraction=0.25, events=4, horizon=0.5, rollback=True, rollback_tol=-1.0)
    cb = ControlPruning(controller=ctl, every_n_steps=100, min_width=2)
    trainer, model = fit(cb, tmp_path)
    rollbacks = [h for h in cb.history if "rollback_to_step" in h]
    assert len(rollbacks) == 1 and ctl.stopped and not ctl.due(1.0)
    first, undone = cb.history[0], cb.history[1]  # the first event ran before any validation: unchecked
    assert first["widths"]["blocks.0.lru"] == 24 and undone["widths"]["blocks.0.lru"] == 18
    assert rollbacks[0]["rollback_to_step"] == undone["step"] and rollbacks[0]["widths"]["blocks.0.lru"] == 24
    assert len(cb.history) == 3 and model.blocks[0].lru.state_dim == 24
    live, in_opt = list(model.parameters()), optimizer_params(trainer.optimizers)
    assert len(in_opt) == len(live) and all(any(p is q for q in in_opt) for p in live)


def test_compressm_events_respect_a_group_limit_on_the_state_dimension(tmp_path: Path) -> None:
    """τ = 0.5 would cut far below 20 states; the group's own limit (group_limits) holds the rank at 20."""
    free = ControlPruning(controller=HankelController(tau=0.5, events=2, horizon=0.5), every_n_steps=50, min_width=2)
    fit(free, tmp_path / "free", epochs=2)
    assert free.history[-1]["widths"]["blocks.0.lru"] < 20  # the limit below binds, so the test can fail
    cb = ControlPruning(controller=HankelController(tau=0.5, events=2, horizon=0.5), every_n_steps=50, min_width=2,
                        group_limits={"blocks.0.lru": 20})
    _, model = fit(cb, tmp_path / "limited", epochs=2)
    assert [h["widths"]["blocks.0.lru"] for h in cb.history] == [20]
    assert model.blocks[0].lru.state_dim == 20
