"""Every architecture we claim: function-preserving removal, a random prune keeps training whole, FLOPs exact."""

from __future__ import annotations

from typing import Callable

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from arch_helpers import check_after_cut, random_plan, snapshot, zero_consumers_
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ctprune_lightning import ControlPruning
from ctprune_lightning.accounting import count_training_flops
from ctprune_lightning.models import GPTLanguageModel, MLPClassifier, ResNetClassifier
from ctprune_lightning.planning import predict_flops
from ctprune_lightning.surgery import MHA_REASON, apply_plan_, discover_groups
from ctprune_lightning.surgery.optim import optimizer_params


class StyleNet(L.LightningModule):
    """A LightningModule in another style: one nn.Sequential with Flatten, bias-free layers, a frozen layer,
    nn.MultiheadAttention, a bare training_step and an optimizer over the trainable parameters only."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(2), nn.Linear(16, 24, bias=False), nn.ReLU(), nn.Linear(24, 20),
                                  nn.ReLU(), nn.Linear(20, 8, bias=False))
        self.body[3].requires_grad_(False)  # a frozen layer in the middle of a group
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 3))
        self.example_input_array = torch.zeros(2, 5, 4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def mlp() -> L.LightningModule:
    return MLPClassifier(input_dim=20, hidden=(24, 16), num_classes=5, scheduler="none")


def resnet() -> L.LightningModule:
    return ResNetClassifier(depth=8, widths=(8, 12, 16), num_classes=5, image_size=12, scheduler="none")


def gpt() -> L.LightningModule:
    return GPTLanguageModel(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_embd=16, scheduler="none",
                            warmup_steps=0)


def batch_for(name: str, n: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(n, 20, generator=g), torch.randint(0, 5, (n,), generator=g)
    if name == "resnet":
        return torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 5, (n,), generator=g)
    if name == "gpt":
        ids = torch.randint(0, 13, (n, 9), generator=g)
        return ids[:, :-1], ids[:, 1:]
    return torch.randn(n, 5, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def loss_of(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    logits = model(batch[0])
    return F.cross_entropy(logits.flatten(0, -2), batch[1].flatten())


MODELS: dict[str, Callable[[], L.LightningModule]] = {"mlp": mlp, "resnet": resnet, "gpt": gpt, "style": StyleNet}
EXPECTED_GROUPS = {
    "mlp": ["net.1", "net.3"],
    "resnet": ["net.stem.0", "net.layer1.0.conv1", "net.layer2.0.conv1", "net.layer2.0.conv2", "net.layer3.0.conv1",
               "net.layer3.0.conv2"],
    "gpt": ["model.blocks.0.attn", "model.blocks.0.mlp.c_fc", "model.blocks.1.attn", "model.blocks.1.mlp.c_fc"],
    "style": ["body.1", "body.3"],
}


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, name: str, n: int = 2, seed: int = 1) -> None:
    model.train()
    for i in range(n):
        opt.zero_grad()
        loss_of(model, batch_for(name, seed=seed + i)).backward()
        opt.step()


@pytest.mark.parametrize("name", list(MODELS))
def test_groups_found_and_dense_layers_explained(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    groups, skipped = discover_groups(model, model.example_input_array)
    assert [g.name for g in groups] == EXPECTED_GROUPS[name]
    reasons = dict(skipped)
    if name == "style":
        assert reasons["attn"] == MHA_REASON and "MultiheadAttention 'attn'" in reasons["body.5"]
    if name == "gpt":
        assert "prune_embeddings" in reasons["model.tok_emb"]


@pytest.mark.parametrize("name", list(MODELS))
def test_removing_zero_contribution_units_leaves_the_output_unchanged(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    train_steps(model, opt, name)  # non-trivial weights and BatchNorm statistics
    model.eval()
    groups, _ = discover_groups(model, model.example_input_array)
    gen = torch.Generator().manual_seed(1)
    plan = random_plan(model, groups, gen)
    for g in groups:
        zero_consumers_(model, g, [i for i in range(g.width(model)) if i not in set(plan[g.name].tolist())])
    x = batch_for(name, n=4, seed=5)[0]
    with torch.no_grad():
        ref = model(x)
    apply_plan_(model, groups, plan)
    assert [g.width(model) for g in groups] == [len(plan[g.name]) for g in groups]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_random_prune_keeps_every_live_parameter_in_the_optimizer_with_sliced_state(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = model.configure_optimizers()
    train_steps(model, opt, name)
    groups, _ = discover_groups(model, model.example_input_array)
    plan = random_plan(model, groups, torch.Generator().manual_seed(2), low=0.1)
    before = snapshot(model, [opt], groups, plan)
    apply_plan_(model, groups, plan, [opt])
    check_after_cut(model, [opt], before)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, opt, name, n=1, seed=9)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and not p.requires_grad, f"frozen {n} moved"
        elif p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(p.detach(), trainable[n]), f"{n} did not learn after the cut"
    if name == "style":
        assert len(frozen) == 2 and all(not p.requires_grad for p in model.body[3].parameters())


@pytest.mark.parametrize("name", ["resnet", "gpt"])
def test_predicted_flops_equal_measured_flops_after_surgery(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    batch = batch_for(name, n=3)
    groups, _ = discover_groups(model, model.example_input_array)
    total, per_module = count_training_flops(model, batch, loss_of)
    widths = {g.name: g.width(model) for g in groups}
    plan = random_plan(model, groups, torch.Generator().manual_seed(4), low=0.1)
    predicted = predict_flops(widths, {k: len(v) for k, v in plan.items()}, per_module, total, groups)
    apply_plan_(model, groups, plan)
    measured, after = count_training_flops(model, batch, loss_of)
    assert predicted == measured < total
    if name == "gpt":  # the attention module's own cost (SDPA) scales with its heads
        attn = "model.blocks.0.attn"
        own = lambda pm: pm[attn] - pm[f"{attn}.c_attn"] - pm[f"{attn}.c_proj"]  # noqa: E731
        assert own(per_module) > 0
        assert own(after) * 4 == own(per_module) * len(plan[attn])


def test_flop_counts_per_module_survive_identity_modules_and_branches() -> None:
    """torch's ModuleTracker charges later backward ops to nn.Identity / shared inputs; ours does not."""
    torch.manual_seed(0)
    model = ResNetClassifier(depth=8, widths=(4, 4, 8), num_classes=3, image_size=8)  # identity shortcuts
    x = torch.randn(2, 1, 8, 8)
    total, per_module = count_training_flops(model, (x, torch.tensor([0, 1])), loss_of)
    assert isinstance(model.net.layer1[0].shortcut, nn.Identity)
    fwd = 2 * 2 * 8 * 8 * 4 * 4 * 9  # layer1.0.conv1: 4 -> 4 channels, 3x3, 8x8 maps, batch 2
    assert per_module["net.layer1.0.conv1"] == 3 * fwd  # forward, grad input, grad weight
    assert per_module["net.layer1.0"] == 6 * fwd  # conv1 + conv2; nothing charged to the identity shortcut
    assert per_module.get("net.layer1.0.shortcut", 0) == 0 and per_module["net"] == total


def run_fit(model: L.LightningModule, data: TensorDataset, val: bool = True) -> tuple[L.Trainer, ControlPruning]:
    cb = ControlPruning(controller="gmp", target=0.5, every_n_steps=2, importance="taylor", min_width=2,
                        controller_kwargs={"start": 0.0, "end": 0.6})
    trainer = L.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb], limit_val_batches=1 if val else 0,
                        val_check_interval=4 if val else None, num_sanity_val_steps=0)
    loader = DataLoader(data, batch_size=8, shuffle=True)
    trainer.fit(model, loader, DataLoader(data, batch_size=8) if val else None)
    return trainer, cb


@pytest.mark.parametrize("name", ["resnet", "gpt", "style"])
def test_control_pruning_shrinks_each_architecture_inside_a_fit(name: str) -> None:
    L.seed_everything(0)
    model = MODELS[name]()
    x, y = batch_for(name, n=32)
    trainer, cb = run_fit(model, TensorDataset(x, y), val=name != "style")
    s = cb.summary()
    assert s["surgeries"] >= 1 and s["flops_fraction"] < 0.9
    assert any(s["widths"][k] < s["dense_widths"][k] for k in s["widths"])
    live = list(model.parameters())
    in_opt = optimizer_params(trainer.optimizers)
    assert all(any(p is q for q in in_opt) for p in live if p.requires_grad)
    assert all(any(p is q for q in live) for p in in_opt)
    keys = set(trainer.callback_metrics)
    assert "train/loss" in keys
    if name == "resnet":
        assert {"val/loss", "val/acc"} <= keys
    if name == "gpt":
        assert {"val/loss", "val/bpc"} <= keys
        torch.testing.assert_close(trainer.callback_metrics["val/bpc"],
                                   trainer.callback_metrics["val/loss"] / torch.log(torch.tensor(2.0)))
        assert model.generate(torch.zeros(1, 1, dtype=torch.long), 5).shape == (1, 6)


def test_model_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="depth=9 must be 6n \\+ 2"):
        ResNetClassifier(depth=9)
    with pytest.raises(ValueError, match="optimizer='rmsprop' is not supported"):
        ResNetClassifier(optimizer="rmsprop")
    with pytest.raises(ValueError, match="n_embd=30 must be divisible by n_head=4"):
        GPTLanguageModel(n_embd=30)
    with pytest.raises(ValueError, match="sequence length 9 exceeds block_size 8"):
        gpt()(torch.zeros(1, 9, dtype=torch.long))
    model = resnet()
    assert model(torch.zeros(2, 144)).shape == (2, 5)  # flat 12*12 images are reshaped


@pytest.mark.parametrize("name", list(MODELS))
def test_a_pruned_model_is_rebuilt_from_its_recorded_shapes(name: str) -> None:
    """The checkpoint path: capture the shapes, rebuild a fresh model to them, load the weights (heads too)."""
    from ctprune_lightning.surgery.arch import apply_arch_, capture_arch

    torch.manual_seed(0)
    model = MODELS[name]()
    train_steps(model, torch.optim.AdamW(p for p in model.parameters() if p.requires_grad), name)
    model.eval()  # trained: BatchNorm running statistics are not the 0/1 defaults a lost buffer would still match
    groups, _ = discover_groups(model, model.example_input_array)
    apply_plan_(model, groups, random_plan(model, groups, torch.Generator().manual_seed(6), low=0.1))
    fresh = MODELS[name]().eval()
    apply_arch_(fresh, capture_arch(model))
    fresh.load_state_dict(model.state_dict())
    # replaced tensors keep requires_grad (StyleNet's frozen body.3 is cut on both sides and stays frozen)
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == \
        {n: p.requires_grad for n, p in MODELS[name]().named_parameters()}
    if name == "style":
        assert fresh.body[3].weight.shape != (20, 24) and not fresh.body[3].weight.requires_grad
    x = batch_for(name, n=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert [g.width(fresh) for g in groups] == [g.width(model) for g in groups]
