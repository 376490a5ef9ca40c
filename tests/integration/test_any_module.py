"""ControlPruning on LightningModules written in other styles than ours (seconds each).

None of these modules has ``compute_loss`` or ``example_input_array``; several have no ``forward``.
Each fit must shrink physically, keep every live parameter in the optimizer, keep the loss finite and
falling, and write a checkpoint that ``load_pruned`` rebuilds to the same weights.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ctprune_lightning import ControlPruning, load_pruned
from ctprune_lightning.probe import CallInputs, batch_size, capture_network_call, step_loss
from ctprune_lightning.surgery.mha import PrunableMultiheadAttention
from ctprune_lightning.surgery.optim import live_parameters_missing

DIM, CLASSES, N = 16, 4, 256


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(CLASSES, DIM, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return centers[y] + torch.randn(N, DIM, generator=g), y


class DictData(Dataset):
    """Batches are dicts, the way tokenised text arrives."""

    def __init__(self) -> None:
        self.x, self.y = blobs()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "mask": torch.ones(DIM), "label": self.y[i]}


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, CLASSES))


class Base(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.losses: list[float] = []

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(DictData(), batch_size=32, shuffle=False)

    def record(self, loss: torch.Tensor) -> torch.Tensor:
        self.losses.append(float(loss))
        self.log("train/loss", loss)
        return loss


class SeveralArgs(Base):
    """``forward(features, mask)``: two positional inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(features * mask)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.record(F.cross_entropy(self(batch["features"], batch["mask"]), batch["label"]))


class KeywordOnly(Base):
    """``forward(*, features)`` called with a keyword, and a dict returned by training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, *, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self(features=batch["features"])
        return {"loss": self.record(F.cross_entropy(logits, batch["label"]) + 0.01 * logits.pow(2).mean())}


class NoForward(Base):
    """No forward at all: training_step calls a child network and a loss only it knows (label smoothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = mlp()
        self.temperature = nn.Parameter(torch.ones(()), requires_grad=False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.backbone(batch["features"]) / self.temperature
        return self.record(F.cross_entropy(logits, batch["label"], label_smoothing=0.1))


class Transformer(Base):
    """``nn.TransformerEncoder`` with ``nn.MultiheadAttention`` (4 heads) over 4 tokens of 16 features."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=DIM, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(tokens).mean(dim=1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        tokens = batch["features"].unsqueeze(1).expand(-1, 4, -1) * torch.linspace(0.5, 1.5, 4)[None, :, None]
        return self.record(F.cross_entropy(self(tokens), batch["label"]))


def fit(module: Base, tmp_path: Path, epochs: int = 3, **kwargs: Any) -> tuple[L.Trainer, ControlPruning]:
    L.seed_everything(0)
    cb = ControlPruning(**({"controller": "gmp", "target": 0.4, "every_n_steps": 4, "importance": "magnitude",
                            "min_width": 4, "controller_kwargs": {"start": 0.0, "end": 0.5}} | kwargs))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb, ckpt])
    trainer.fit(module)
    return trainer, cb


def check_fit(module: Base, trainer: L.Trainer, cb: ControlPruning, tmp_path: Path) -> None:
    s = cb.summary()
    assert s["surgeries"] >= 2 and s["train_flops_saved"] > 0.2
    assert all(s["widths"][g] < s["dense_widths"][g] for g in s["widths"]), s["widths"]
    assert live_parameters_missing(module, trainer.optimizers) == []
    held = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert len(held) == len(list(module.parameters()))  # and no dead Parameter
    losses = torch.tensor(module.losses)
    assert torch.isfinite(losses).all() and losses[-8:].mean() < 0.7 * losses[:4].mean()
    rebuilt = load_pruned(type(module), tmp_path / "last.ckpt")
    for (name, a), (_, b) in zip(module.state_dict().items(), rebuilt.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a.cpu(), b), name


@pytest.mark.parametrize("cls", [SeveralArgs, KeywordOnly, NoForward], ids=lambda c: c.__name__)
def test_modules_with_any_forward_and_dict_batches_shrink(cls: type[Base], tmp_path: Path) -> None:
    module = cls()
    trainer, cb = fit(module, tmp_path)
    net = module.backbone if isinstance(module, NoForward) else module.net
    assert {g.name for g in cb.groups} == ({"backbone.0", "backbone.2"} if cls is NoForward else {"net.0", "net.2"})
    assert net[0].out_features == net[2].in_features == cb.summary()["widths"][cb.groups[0].name] < 64
    check_fit(module, trainer, cb, tmp_path)


def test_transformer_encoder_heads_and_ffn_shrink(tmp_path: Path) -> None:
    module = Transformer()
    trainer, cb = fit(module, tmp_path, target=0.5, round_to=1)
    attn = [m for m in module.modules() if isinstance(m, PrunableMultiheadAttention)]
    assert len(attn) == 2 and not any(isinstance(m, nn.MultiheadAttention) for m in module.modules())
    units = {g.name: g.unit for g in cb.groups}
    assert units["encoder.layers.0.self_attn"] == "head" and "encoder.layers.0.linear1" in units
    widths = cb.summary()["widths"]
    for i, (layer, a) in enumerate(zip(module.encoder.layers, attn)):
        assert a.num_heads == widths[f"encoder.layers.{i}.self_attn"] < 4  # heads physically gone
        assert a.in_proj_weight.shape == (3 * a.num_heads * a.head_dim, DIM) and a.out_proj.in_features == a.num_heads * 4
        assert layer.linear1.out_features == layer.linear2.in_features == widths[f"encoder.layers.{i}.linear1"] < 64
    check_fit(module, trainer, cb, tmp_path)


def test_probe_loss_is_the_modules_own_and_leaves_its_metrics_and_logs_alone() -> None:
    import torchmetrics

    class WithMetric(NoForward):
        def __init__(self) -> None:
            super().__init__()
            self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=CLASSES)

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            self.acc(self.backbone(batch["features"]), batch["label"])
            return super().training_step(batch, batch_idx)

    module = WithMetric()
    batch = next(iter(module.train_dataloader()))
    module.acc.update(torch.randn(8, CLASSES), torch.zeros(8, dtype=torch.long))
    before = (module.acc.tp.clone(), module.acc._update_count)
    loss = step_loss(module, batch)
    logits = module.backbone(batch["features"])
    assert torch.allclose(loss, F.cross_entropy(logits, batch["label"], label_smoothing=0.1))
    assert torch.equal(module.acc.tp, before[0]) and module.acc._update_count == before[1]
    assert "log" not in module.__dict__ and len(module.losses) == 1  # its own bookkeeping ran once, logging restored


def test_network_call_is_recorded_with_its_keyword_inputs() -> None:
    module = KeywordOnly()
    batch = next(iter(module.train_dataloader()))
    call = capture_network_call(module, lambda: step_loss(module, batch))
    assert isinstance(call, CallInputs) and call.path == "" and list(call.kwargs) == ["features"]
    assert torch.equal(call(module), module(features=batch["features"]))
    assert batch_size(batch) == 32 and batch_size({"input_ids": torch.zeros(5, 3)}) == 5


def test_manual_optimization_without_compute_loss_is_refused_with_the_reason() -> None:
    module = NoForward()
    module.automatic_optimization = False
    with pytest.raises(TypeError, match="manual optimization.*compute_loss"):
        step_loss(module, next(iter(module.train_dataloader())))


def test_a_target_that_disagrees_with_the_controller_instance_is_refused() -> None:
    from ctprune_lightning import build_controller

    with pytest.raises(ValueError, match="target=0.5 disagrees.*0.3"):
        ControlPruning(controller=build_controller("lqr", 0.3), target=0.5)
    assert ControlPruning(controller=build_controller("lqr", 0.3), target=0.3).target == 0.3
    assert ControlPruning(controller=build_controller("lqr", 0.25)).target == 0.25


class WithOptimizer(SeveralArgs):
    """Adafactor (factored second moments) or LBFGS (flat history over all parameters, a closure per step)."""

    def __init__(self, optimizer: str = "adafactor") -> None:
        super().__init__()
        self.optimizer = optimizer

    def configure_optimizers(self) -> Any:
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=3, history_size=5)
        return torch.optim.Adafactor(self.parameters(), lr=3e-2)


@pytest.mark.parametrize("optimizer", ["adafactor", "lbfgs"])
def test_optimizers_whose_state_is_not_per_element_train_through_cuts_and_resume(optimizer: str,
                                                                                 tmp_path: Path) -> None:
    module = WithOptimizer(optimizer)
    with pytest.warns(UserWarning, match="restarts") if optimizer == "lbfgs" else contextlib.nullcontext():
        trainer, cb = fit(module, tmp_path)  # a size mismatch in the optimizer's step after the first cut, before
    check_fit(module, trainer, cb, tmp_path)
    widths = cb.summary()["widths"]
    resumed = WithOptimizer(optimizer)  # dense: the checkpoint's architecture and optimizer state are restored
    cb = ControlPruning(controller="gmp", target=0.4, every_n_steps=4, importance="magnitude", min_width=4,
                        controller_kwargs={"start": 0.0, "end": 0.5})
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[cb])
    trainer.fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    losses = torch.tensor(resumed.losses)  # one more epoch, from the trained weights (not a fresh start)
    assert trainer.current_epoch == 4 and torch.isfinite(losses).all() and losses.mean() < 0.7 * module.losses[0]
    assert cb.summary()["widths"] == widths


@pytest.mark.parametrize("averaging", ["ema", "swa"])
def test_lightnings_weight_averaging_follows_the_cuts_and_resumes(averaging: str, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging

    def run(epochs: int, ckpt: Path | None = None) -> tuple[Base, Any, ControlPruning]:
        L.seed_everything(0)
        module = SeveralArgs()
        avg = (EMAWeightAveraging(decay=0.9) if averaging == "ema"
               else StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=0.5))
        cb = ControlPruning(controller="lqr", target=0.4, every_n_steps=4, min_width=4)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path,
                            callbacks=[cb, avg, ModelCheckpoint(dirpath=tmp_path, save_last=True)])
        trainer.fit(module, ckpt_path=ckpt)  # a size mismatch in the average's update after the first cut, before
        return module, avg, cb

    module, avg, cb = run(4)
    assert cb.summary()["surgeries"] >= 3 and cb.summary()["train_flops_saved"] > 0.2
    copy = avg._average_model.module if averaging == "ema" else avg._average_model
    shapes = {n: t.shape for n, t in module.state_dict().items()}
    assert {n: t.shape for n, t in copy.state_dict().items() if n in shapes} == shapes
    rebuilt = load_pruned(SeveralArgs, tmp_path / "last.ckpt")  # the checkpoint holds the average, pruned
    assert rebuilt.net[0].weight.shape == module.net[0].weight.shape
    resumed, avg, cb = run(6, tmp_path / "last.ckpt")  # the dense copy built at setup is rebuilt at the restore
    copy = avg._average_model.module if averaging == "ema" else avg._average_model
    shapes = {n: t.shape for n, t in resumed.state_dict().items()}
    assert {n: t.shape for n, t in copy.state_dict().items() if n in shapes} == shapes
    assert resumed.net[0].out_features < 64 and torch.isfinite(torch.tensor(resumed.losses)).all()


def test_a_callback_that_pruned_one_model_refuses_another_before_touching_it(tmp_path: Path) -> None:
    trainer, cb = fit(SeveralArgs(), tmp_path, epochs=2)
    assert cb.summary()["train_flops_saved"] > 0
    other = SeveralArgs()
    dense = {n: p.detach().clone() for n, p in other.state_dict().items()}
    with pytest.raises(ValueError, match="already pruned another model .SeveralArgs.*new ControlPruning"):
        L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[cb]).fit(other)  # before: no cut at all, silently
    assert all(torch.equal(p, dense[n]) for n, p in other.state_dict().items())


class LazyTransformer(Transformer):
    """The layers are built in ``configure_model`` (Lightning calls it after every callback's ``setup``)."""

    def __init__(self) -> None:
        Base.__init__(self)
        self.encoder: nn.Module | None = None
        self.example_input_array = torch.zeros(2, 4, DIM)

    def configure_model(self) -> None:
        if self.encoder is None:  # idempotent, as Lightning asks
            layer = nn.TransformerEncoderLayer(d_model=DIM, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.head = nn.Linear(DIM, CLASSES)


def test_layers_built_in_configure_model_are_converted_and_cut(tmp_path: Path) -> None:
    module = LazyTransformer()  # before: the set-up discovery traced a model without layers and raised
    trainer, cb = fit(module, tmp_path, controller="lqr", target=0.4, controller_kwargs={}, epochs=4)
    assert sum(isinstance(m, PrunableMultiheadAttention) for m in module.modules()) == 2
    s = cb.summary()
    assert s["train_flops_saved"] > 0.1 and any(s["widths"][g] < s["dense_widths"][g] for g in s["widths"])
    assert live_parameters_missing(module, trainer.optimizers) == []


def test_a_wrapping_strategy_is_refused_even_in_one_process() -> None:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    from ctprune_lightning import PruningDDPStrategy
    from ctprune_lightning.strategy import require_pruning_strategy

    for strategy in (DDPStrategy(), DDPStrategy(find_unused_parameters=True), ModelParallelStrategy()):
        # one process still wraps the model: DDP's reducer waited for the old Parameters' gradients and raised
        # "parameters that were not used in producing the loss" after the first cut
        with pytest.raises(RuntimeError, match="cannot shrink a model under .*world_size=1.*ctprune_"):
            require_pruning_strategy(strategy, 1)
    require_pruning_strategy(SingleDeviceStrategy("cpu"), 1)
    require_pruning_strategy(DDPStrategy(), 1, cuts=False)  # the dense baseline (controller "none") never cuts
    require_pruning_strategy(PruningDDPStrategy(), 1)
    require_pruning_strategy(PruningDDPStrategy(), 4)
    with pytest.raises(RuntimeError, match="world_size=2"):
        require_pruning_strategy(SingleDeviceStrategy("cpu"), 2)


def test_a_tuner_that_checkpoints_before_training_and_restores_leaves_one_clean_run(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import LearningRateFinder

    class Tunable(SeveralArgs):
        def __init__(self) -> None:
            super().__init__()
            self.lr = 3e-3

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=self.lr)

    module = Tunable()
    cb = ControlPruning(controller="lqr", target=0.4, every_n_steps=4, min_width=4)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[LearningRateFinder(num_training_steps=20), cb])
    trainer.fit(module)  # the finder saved a checkpoint (our state_dict) before anything was attached: raised
    s = cb.summary()
    assert module.lr != 3e-3 and s["steps"] == trainer.global_step == 3 * N // 32  # the search is not charged
    assert s["train_flops_saved"] > 0.2 and all(s["widths"][g] < s["dense_widths"][g] for g in s["widths"])


class TwoOptimizers(SeveralArgs):
    """Manual optimization, two optimizers over disjoint parameters (AdamW for the first layer, SGD for the rest)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def compute_loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self(batch["features"], batch["mask"]), batch["label"])

    def configure_optimizers(self) -> Any:
        first = [p for n, p in self.named_parameters() if n.startswith("net.0")]
        rest = [p for n, p in self.named_parameters() if not n.startswith("net.0")]
        return torch.optim.AdamW(first, lr=3e-3), torch.optim.SGD(rest, lr=0.05, momentum=0.9)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
        return self.record(loss.detach())


class Plateau(SeveralArgs):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
                                                   "monitor": "train/loss"}}


class Streamed(SeveralArgs):
    """An IterableDataset (no length): the schedule comes from max_steps."""

    def train_dataloader(self) -> DataLoader:
        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self) -> Any:
                return iter(DictData())

        return DataLoader(Stream(), batch_size=32)


@pytest.mark.parametrize("case", ["two_optimizers", "plateau", "streamed", "float64", "bf16_true"])
def test_training_setups_beyond_one_adamw_in_fp32_shrink_and_keep_learning(case: str, tmp_path: Path) -> None:
    module = {"two_optimizers": TwoOptimizers, "plateau": Plateau, "streamed": Streamed}.get(case, SeveralArgs)()
    extra = {"float64": {"precision": "64-true"}, "bf16_true": {"precision": "bf16-true"},
             "streamed": {"max_steps": 30, "max_epochs": -1}}.get(case, {})
    L.seed_everything(0)
    cb = ControlPruning(controller="lqr", target=0.4, every_n_steps=4, min_width=4)
    trainer = L.Trainer(**({"max_epochs": 4, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                            "enable_model_summary": False, "default_root_dir": tmp_path, "callbacks": [cb]} | extra))
    trainer.fit(module)
    s = cb.summary()
    assert s["train_flops_saved"] > 0.2 and all(s["widths"][g] < s["dense_widths"][g] for g in s["widths"])
    assert live_parameters_missing(module, trainer.optimizers) == []
    losses = torch.tensor(module.losses, dtype=torch.float32)
    assert torch.isfinite(losses).all() and losses[-4:].mean() < 0.5 * losses[:4].mean()


class LazyWithSetup(LazyTransformer):
    """``configure_model`` reads what the module's own ``setup`` set: the callback must not call it before."""

    def setup(self, stage: str) -> None:
        self.ffn_width = 64

    def configure_model(self) -> None:
        if self.encoder is None:
            layer = nn.TransformerEncoderLayer(d_model=DIM, nhead=4, dim_feedforward=self.ffn_width, dropout=0.0,
                                               batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.head = nn.Linear(DIM, CLASSES)


def test_configure_model_that_needs_the_modules_setup_is_left_to_lightning(tmp_path: Path) -> None:
    module = LazyWithSetup()
    trainer, cb = fit(module, tmp_path, controller="lqr", target=0.5, controller_kwargs={}, epochs=4)
    s = cb.summary()  # discovered on the first batch: the FFN widths are cut; the attention is left dense (built
    assert s["train_flops_saved"] > 0.1  # after the conversion could run), with the reason
    assert any("linear1" in g and s["widths"][g] < s["dense_widths"][g] for g in s["widths"])
    assert any("MultiheadAttention" in r for r in s["left_dense"].values())


def test_lightnings_mask_pruning_is_refused_beside_a_cutting_controller_and_allowed_beside_none() -> None:
    from lightning.pytorch.callbacks import ModelPruning

    def run(controller: str) -> tuple[SeveralArgs, ControlPruning]:
        L.seed_everything(0)
        module, cb = SeveralArgs(), ControlPruning(controller=controller, every_n_steps=4, min_width=4)
        L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                  enable_model_summary=False, callbacks=[cb, ModelPruning("l1_unstructured", amount=0.3)]).fit(module)
        return module, cb

    with pytest.raises(ValueError, match="cannot cut a model that ModelPruning .* also prunes"):
        run("lqr")  # before: a size mismatch of weight_orig * weight_mask after the first cut
    module, cb = run("none")  # only measuring: both run
    assert cb.summary()["train_flops_saved"] == 0.0 and module.net[0].weight.shape == (64, DIM)
