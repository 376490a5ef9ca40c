"""Architecture specs rebuild shrunk models of every kind (heads, conv channels, SSM states)."""

from __future__ import annotations

import pytest
import torch

from ctprune_lightning.checkpoint import export_pruned, load_pruned
from ctprune_lightning.models import GPTLanguageModel, ResNetClassifier
from ctprune_lightning.surgery import apply_plan_, discover_groups
from ctprune_lightning.surgery.arch import ArchSpecError, apply_arch_, capture_arch


def _prune_half(model: torch.nn.Module) -> None:
    groups, _ = discover_groups(model, model.example_input_array)
    apply_plan_(model, groups, {g.name: torch.arange(0, g.width(model), 2) for g in groups})


@pytest.mark.parametrize(
    "build",
    [lambda: GPTLanguageModel(vocab_size=20, block_size=16, n_layer=2, n_head=4, n_embd=32),
     lambda: ResNetClassifier(depth=8, num_classes=10)],
    ids=["gpt-heads-and-mlp", "resnet-residual-channels"],
)
def test_spec_rebuilds_a_shrunk_model_and_its_outputs(build, tmp_path) -> None:
    torch.manual_seed(0)
    pruned = build().eval()
    _prune_half(pruned)
    spec = capture_arch(pruned)
    fresh = build().eval()
    apply_arch_(fresh, spec)
    fresh.load_state_dict(pruned.state_dict())
    x = pruned.example_input_array
    torch.testing.assert_close(fresh(x), pruned(x))
    if isinstance(pruned, GPTLanguageModel):  # the head count follows the rebuilt projections
        attn = fresh.get_submodule(next(n for n, m in fresh.named_modules() if hasattr(m, "n_head") and n))
        assert attn.n_head == 2
    path = export_pruned(pruned, tmp_path / "model.pt")
    torch.testing.assert_close(load_pruned(type(pruned), path)(x), pruned(x))


def test_a_bad_size_attribute_is_refused_before_anything_changes() -> None:
    model = ResNetClassifier(depth=8, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = capture_arch(model)
    name = next(iter(spec))
    spec[name]["shapes"]["nonexistent"] = [3]
    with pytest.raises(ArchSpecError, match="has no tensor 'nonexistent'"):
        apply_arch_(model, spec)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
