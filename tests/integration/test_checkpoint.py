"""Checkpoints, resume and export when the architecture changes during training (issue 4)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ctprune_lightning import ControlPruning, export_pruned, load_pruned
from ctprune_lightning.checkpoint import CheckpointError, read_checkpoint
from ctprune_lightning.models import MLPClassifier
from ctprune_lightning.surgery.arch import ArchSpecError

STEPS_PER_EPOCH = 8


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(10, 32, generator=g) * 3
    y = torch.arange(256) % 10
    x = means[y] + torch.randn(256, 32, generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)  # deterministic order
    return train, DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64)


def make_model() -> MLPClassifier:
    torch.manual_seed(0)
    return MLPClassifier(input_dim=32, hidden=(64, 64), num_classes=10, lr=3e-3)


def make_callback(start_step: int = 0) -> ControlPruning:
    # open-loop ramp over the first 3/4 of training: a cut at every 4th step up to step 24
    return ControlPruning(controller="gmp", target=0.2, every_n_steps=4, importance="taylor",
                          start_step=start_step, controller_kwargs={"start": 0.0, "end": 0.75})


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def trainer(tmp: Path, *callbacks: Callback, **kwargs) -> L.Trainer:
    kwargs.setdefault("max_epochs", 4)
    return L.Trainer(accelerator="cpu", deterministic=True, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp, callbacks=list(callbacks), **kwargs)


def widths(model: MLPClassifier) -> tuple[int, int]:
    return model.net[1].out_features, model.net[3].out_features


@pytest.mark.parametrize(
    ("stop_epoch", "start_step", "surgeries_before_stop"),
    [(0, 12, 0), (1, 0, 4), (2, 0, 5)],
    ids=["before-the-first-surgery", "right-after-a-surgery", "after-the-last-surgery"],
)
def test_resume_equals_an_uninterrupted_run(
    tmp_path: Path, stop_epoch: int, start_step: int, surgeries_before_stop: int
) -> None:
    train, _ = loaders()
    L.seed_everything(0)
    model_a, cb_a = make_model(), make_callback(start_step)
    trainer(tmp_path / "a", cb_a, limit_val_batches=0).fit(model_a, train)
    assert [h["step"] for h in cb_a.history] == list(range(max(4, start_step), 24, 4))  # the last cut is at 20

    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=-1, every_n_epochs=1)
    model_b = make_model()
    trainer(tmp_path / "b", make_callback(start_step), ckpt, StopAfterEpoch(stop_epoch),
            limit_val_batches=0).fit(model_b, train)
    step = (stop_epoch + 1) * STEPS_PER_EPOCH
    stop = tmp_path / "b" / f"epoch={stop_epoch}-step={step}.ckpt"
    stopped = read_checkpoint(stop)
    assert stopped["global_step"] == step
    assert len(stopped["ctprune"]["history"]) == surgeries_before_stop
    if surgeries_before_stop == 4:
        assert stopped["ctprune"]["history"][-1]["step"] == step  # stopped right after a surgery

    L.seed_everything(0)
    model_r, cb_r = make_model(), make_callback(start_step)  # a fresh, dense model: resume must rebuild it
    ckpt_r = ModelCheckpoint(dirpath=tmp_path / "r", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path / "r", cb_r, ckpt_r, limit_val_batches=0).fit(model_r, train, ckpt_path=stop)

    assert widths(model_r) == widths(model_a) != (64, 64)
    for (name, p_a), (_, p_r) in zip(model_a.state_dict().items(), model_r.state_dict().items()):
        torch.testing.assert_close(p_r, p_a, atol=1e-6, rtol=0, msg=name)
    assert cb_r.summary()["train_flops"] == pytest.approx(cb_a.summary()["train_flops"])
    assert cb_r.history == cb_a.history and len(cb_r.trace) == len(cb_a.trace)
    # the checkpoints over time differ, so the comparison above is not vacuous
    end = read_checkpoint(tmp_path / "r" / "epoch=3-step=32.ckpt")
    if surgeries_before_stop < len(cb_a.history):
        assert end["ctprune"]["arch"] != stopped["ctprune"]["arch"]
    assert not torch.equal(end["state_dict"]["net.1.weight"][:4, :4], stopped["state_dict"]["net.1.weight"][:4, :4])


def test_resume_restores_optimizer_moments_scheduler_and_controller(tmp_path: Path) -> None:
    train, _ = loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    model = make_model()
    t = trainer(tmp_path, make_callback(), ckpt, StopAfterEpoch(0), limit_val_batches=0)
    t.fit(model, train)
    saved = read_checkpoint(tmp_path / "epoch=0-step=8.ckpt")
    resumed, cb = make_model(), make_callback()
    t2 = trainer(tmp_path / "x", cb, limit_val_batches=0, max_steps=STEPS_PER_EPOCH + 1)
    probe = {}

    class Peek(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not probe:
                opt = trainer.optimizers[0]
                probe["exp_avg"] = opt.state[pl_module.net[1].weight]["exp_avg"].clone()
                probe["exp_avg_sq"] = opt.state[pl_module.net[1].weight]["exp_avg_sq"].clone()
                probe["lr"] = opt.param_groups[0]["lr"]
                probe["controller"] = cb.controller.state_dict()

    t2.callbacks.append(Peek())
    t2.fit(resumed, train, ckpt_path=tmp_path / "epoch=0-step=8.ckpt")
    saved_state = saved["optimizer_states"][0]["state"][0]
    assert probe["exp_avg"].shape[0] < 64  # saved after surgeries: the sliced moments come back
    for key in ("exp_avg", "exp_avg_sq"):  # exact: a default atol of 1e-5 exceeds Adam's second moments
        assert float(saved_state[key].abs().max()) > 0
        torch.testing.assert_close(probe[key], saved_state[key], rtol=0, atol=0, msg=key)
    assert probe["lr"] == pytest.approx(saved["lr_schedulers"][0]["_last_lr"][0])
    assert probe["controller"] == saved["callbacks"][cb.state_key]["controller"]


def test_test_best_rebuilds_a_wider_checkpoint(tmp_path: Path) -> None:
    train, val = loaders()
    # best = the widest checkpoint (FLOPs ratio is highest before the cuts of the later epochs)
    cb = ControlPruning(controller="gmp", target=0.2, every_n_steps=4, controller_kwargs={"start": 0.3, "end": 0.6})
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="ctprune/flops_ratio", mode="max", save_top_k=1)
    model = make_model()
    t = trainer(tmp_path, cb, ckpt)
    t.fit(model, train, val)
    narrow = widths(model)
    best = read_checkpoint(ckpt.best_model_path)
    best_width = best["ctprune"]["arch"]["net.1"]["out_features"]
    assert best_width > narrow[0]
    results = t.test(model, val, ckpt_path="best", verbose=False)
    assert model.net[1].out_features == best_width  # grown back
    reference = load_pruned(MLPClassifier, ckpt.best_model_path)
    x, y = next(iter(val))
    acc = (reference(x).argmax(1) == y).float().mean().item()
    assert results[0]["test/acc"] == pytest.approx(acc)


def test_load_pruned_and_export_round_trip(tmp_path: Path) -> None:
    train, _ = loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = make_model()
    t = trainer(tmp_path, make_callback(), ckpt, limit_val_batches=0, max_epochs=3)
    t.fit(model, train)
    model.eval()
    x = torch.randn(5, 32)
    expected = model(x)
    loaded = load_pruned(MLPClassifier, tmp_path / "last.ckpt")
    assert widths(loaded) == widths(model) != (64, 64) and not loaded.training
    torch.testing.assert_close(loaded(x), expected)
    path = export_pruned(loaded, tmp_path / "model.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["ctprune"]["version"] == 1 and raw["ctprune"]["arch"]["net.1"]["out_features"] == widths(model)[0]
    torch.testing.assert_close(load_pruned(MLPClassifier, path)(x), expected)


@pytest.fixture
def pruned_ckpt(tmp_path: Path) -> Path:
    train, _ = loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, make_callback(), ckpt, limit_val_batches=0, max_epochs=2).fit(make_model(), train)
    return tmp_path / "last.ckpt"


def _edit(path: Path, out: Path, fn) -> Path:
    checkpoint = torch.load(path, weights_only=True)
    fn(checkpoint)
    torch.save(checkpoint, out)
    return out


def _untouched(model: torch.nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_bad_checkpoints_give_clear_errors_and_load_nothing(pruned_ckpt: Path, tmp_path: Path) -> None:
    data = pruned_ckpt.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt: cannot be read as a checkpoint"):
        load_pruned(MLPClassifier, truncated)
    cases = {
        "version": (lambda c: c["ctprune"].update(version=99), r"spec version 99 is not supported"),
        "module": (lambda c: c["ctprune"]["arch"].update({"net.9": {"out_features": 3}}),
                   r"names module 'net.9', which MLPClassifier does not have"),
        "foreign": (lambda c: c["state_dict"].update({"encoder.weight": torch.zeros(2)}),
                    r"do not fit MLPClassifier \(unexpected keys \['encoder.weight'\]\)"),
    }
    for name, (edit, message) in cases.items():
        bad = _edit(pruned_ckpt, tmp_path / f"{name}.ckpt", edit)
        with pytest.raises(ArchSpecError, match=message):
            load_pruned(MLPClassifier, bad)
        # and through the Trainer: the live model keeps its weights and shapes
        model = make_model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ArchSpecError, match=message):
            trainer(tmp_path, make_callback(), max_epochs=3).fit(model, loaders()[0], ckpt_path=bad)
        _untouched(model, before)
    # a checkpoint of a differently shaped model
    with pytest.raises(ArchSpecError, match="does not have|do not fit"):
        load_pruned(MLPClassifier, pruned_ckpt, hidden=[64])
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt: cannot be read"):
        trainer(tmp_path, make_callback(), max_epochs=3).fit(model, loaders()[0], ckpt_path=truncated)
    _untouched(model, before)


class FrozenMLP(MLPClassifier):
    """The second hidden Linear is frozen in ``__init__``; its inputs (group net.1) and outputs (net.3) are cut."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net[3].requires_grad_(False)


def make_frozen_model() -> FrozenMLP:
    torch.manual_seed(0)
    return FrozenMLP(input_dim=32, hidden=(64, 64), num_classes=10, lr=3e-3)


def test_resume_and_load_pruned_keep_a_frozen_layer_frozen(tmp_path: Path) -> None:
    """Rebuilding to the checkpoint's (smaller) shapes must keep requires_grad=False, so the layer never trains."""
    train, _ = loaders()
    frozen_init = make_frozen_model().net[3].weight.detach().clone()
    L.seed_everything(0)
    model_a = make_frozen_model()
    trainer(tmp_path / "a", make_callback(), limit_val_batches=0).fit(model_a, train)
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path / "b", make_callback(), ckpt, StopAfterEpoch(1), limit_val_batches=0).fit(make_frozen_model(), train)
    stop = tmp_path / "b" / "epoch=1-step=16.ckpt"
    stopped = read_checkpoint(stop)["ctprune"]["arch"]
    assert stopped["net.3"]["out_features"] < 64 and stopped["net.3"]["in_features"] < 64  # both sides were cut

    L.seed_everything(0)
    model_r = make_frozen_model()  # dense: the resume must rebuild net.3 to smaller tensors
    trainer(tmp_path / "r", make_callback(), limit_val_batches=0).fit(model_r, train, ckpt_path=stop)
    for model in (model_a, model_r):
        assert [p.requires_grad for p in model.net[3].parameters()] == [False, False]
        assert [p.requires_grad for p in model.net[1].parameters()] == [True, True]
        # frozen = never updated: the surviving entries are exactly the initial ones
        assert set(model.net[3].weight.flatten().tolist()) <= set(frozen_init.flatten().tolist())
    torch.testing.assert_close(model_r.net[3].weight, model_a.net[3].weight, rtol=0, atol=0)
    torch.testing.assert_close(model_r.net[1].weight, model_a.net[1].weight, atol=1e-6, rtol=0)

    loaded = load_pruned(FrozenMLP, stop)
    assert loaded.net[3].weight.shape == (stopped["net.3"]["out_features"], stopped["net.3"]["in_features"])
    assert not loaded.net[3].weight.requires_grad and not loaded.net[3].bias.requires_grad
    assert loaded.net[1].weight.requires_grad


def test_a_weights_only_checkpoint_records_the_architecture_too(tmp_path: Path) -> None:
    train, val = loaders()
    model = make_model()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_weights_only=True)
    trainer(tmp_path, make_callback(), ckpt, max_epochs=2).fit(model, train)
    assert widths(model) != (64, 64)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in saved and saved["ctprune"]["arch"]  # Lightning skipped our on_save_checkpoint
    rebuilt = load_pruned(MLPClassifier, tmp_path / "last.ckpt")  # raised "wrong shapes" before
    assert widths(rebuilt) == widths(model)
    x = next(iter(val))[0]
    torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)
