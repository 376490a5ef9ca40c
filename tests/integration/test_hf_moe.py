"""Mixture-of-experts FFNs (issue 17): transformers' fused experts (``MixtralExperts``, ``Qwen2MoeExperts``).

One group per MoE layer (a fused 3-D tensor holds one width for all experts): unit ``i`` is intermediate
index ``i`` of every expert (gate and up rows, down-projection column). Checked on tiny Mixtral and
Qwen2-MoE models: the groups are found and the router is reported dense with its reason; a cut equals the
dense model with the same units zeroed; the optimizer state follows; growth keeps the outputs; a short
GMP fit shrinks them (every live parameter in the optimizer, ``load_pruned`` round trip: the catalogue's
own checks).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import hf_catalogue as catalogue  # noqa: E402

from ctprune_lightning.accounting import count_training_flops  # noqa: E402
from ctprune_lightning.surgery.groups import apply_plan_, discover_groups  # noqa: E402
from ctprune_lightning.surgery.handlers.moe import MOE_FFN  # noqa: E402

FAMILIES = ("mixtral", "qwen2_moe")


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = catalogue.FAMILIES[family].build().eval()
    with torch.no_grad():  # init leaves the fused experts near zero: make every unit matter
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0.0, 0.5)
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**catalogue._inputs("causal"), use_cache=False).logits


def _experts(model: torch.nn.Module) -> tuple[list, dict[str, str]]:
    groups, skipped = discover_groups(model, catalogue._inputs("causal"), min_width=4)
    return [g for g in groups if g.slices[0].kind == MOE_FFN], dict(skipped)


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_are_groups_and_the_router_says_why_it_stays(family: str) -> None:
    model = _model(family)
    experts, skipped = _experts(model)
    names = [f"model.layers.{i}.mlp.experts" for i in range(catalogue.LAYERS)]
    assert [g.name for g in experts] == names
    inner = model.model.layers[0].mlp.experts.down_proj.shape[-1]
    assert all(g.width(model) == inner for g in experts)
    assert all(g.round_to == 4 for g in experts)  # grouped_mm: 16-byte strides, fp32
    for i in range(catalogue.LAYERS):
        assert "router" in skipped[f"model.layers.{i}.mlp.gate"]
        assert f"model.layers.{i}.mlp.experts" not in skipped
        assert "normalises a width that is not cut" in skipped[f"model.layers.{i}.input_layernorm"]
    assert not any("unsupported layer type" in r for r in skipped.values()), skipped


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cut_equals_the_dense_model_with_the_same_units_zeroed(family: str) -> None:
    model = _model(family)
    experts, _ = _experts(model)
    g = experts[0]
    mod = model.get_submodule(g.name)
    width = g.width(model)
    keep = torch.randperm(width, generator=torch.Generator().manual_seed(1))[: width // 2].sort().values
    dropped = torch.tensor(sorted(set(range(width)) - set(keep.tolist())))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(**catalogue._inputs("causal"), labels=catalogue._inputs("causal")["input_ids"]).loss.backward()
    opt.step()
    old_gu, old_state = mod.gate_up_proj.detach().clone(), opt.state[mod.gate_up_proj]["exp_avg"].clone()
    old_down_state = opt.state[mod.down_proj]["exp_avg"].clone()

    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.get_submodule(g.name).down_proj[:, :, dropped] = 0.0
    dense = _logits(model)
    apply_plan_(model, experts, {g.name: keep}, [opt])
    cut = _logits(model)

    assert mod.down_proj.shape[-1] == mod.gate_up_proj.shape[1] // 2 == mod.intermediate_dim == len(keep)
    torch.testing.assert_close(cut, _logits(reference), atol=1e-5, rtol=0)
    assert (cut - dense).abs().max() > 1e-3  # the cut units were live: the comparison means something
    rows = torch.cat([keep, keep + width])  # gate rows, then up rows
    assert torch.equal(mod.gate_up_proj.detach(), old_gu[:, rows])
    assert torch.equal(opt.state[mod.gate_up_proj]["exp_avg"], old_state[:, rows])
    assert torch.equal(opt.state[mod.down_proj]["exp_avg"], old_down_state[:, :, keep])
    held = {id(p) for grp in opt.param_groups for p in grp["params"]}
    assert id(mod.gate_up_proj) in held and id(mod.down_proj) in held


@pytest.mark.parametrize("family", FAMILIES)
def test_growth_keeps_the_outputs_and_the_old_units_state(family: str) -> None:
    model = _model(family)
    experts, _ = _experts(model)
    g = experts[-1]
    mod = model.get_submodule(g.name)
    width = g.width(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(**catalogue._inputs("causal"), labels=catalogue._inputs("causal")["input_ids"]).loss.backward()
    opt.step()
    old_gu, old_state = mod.gate_up_proj.detach().clone(), opt.state[mod.gate_up_proj]["exp_avg"].clone()
    before = _logits(model)

    with pytest.raises(ValueError, match="multiple of 4"):  # grouped_mm needs 16-byte strides: nothing changes
        apply_plan_(model, experts, {}, [opt], grow={g.name: 3})
    assert g.width(model) == width and mod.gate_up_proj.shape[1] == 2 * width
    apply_plan_(model, experts, {}, [opt], grow={g.name: 8})

    assert g.width(model) == mod.intermediate_dim == width + 8
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=0)
    old_rows = torch.cat([torch.arange(width), torch.arange(width) + width + 8])
    new_rows = torch.cat([torch.arange(width, width + 8), torch.arange(2 * width + 8, 2 * width + 16)])
    assert torch.equal(mod.gate_up_proj.detach()[:, old_rows], old_gu)
    assert mod.gate_up_proj.detach()[:, new_rows].abs().sum() > 0  # new units are live (incoming weights drawn)
    assert torch.equal(mod.down_proj.detach()[:, :, width:], torch.zeros_like(mod.down_proj[:, :, width:]))
    assert torch.equal(opt.state[mod.gate_up_proj]["exp_avg"][:, old_rows], old_state)
    assert opt.state[mod.gate_up_proj]["exp_avg"][:, new_rows].abs().sum() == 0
    model.train()
    model(**catalogue._inputs("causal"), labels=catalogue._inputs("causal")["input_ids"]).loss.backward()
    opt.step()  # the grown tensors train (optimizer slots swapped)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_experts_flops_are_counted_and_scale_with_their_width(family: str) -> None:
    """transformers' experts run ``aten._grouped_mm``, which torch's FLOP counter ignores: uncounted, the
    experts would look free and the planner would cut them to the floor for nothing."""
    model = _model(family)
    batch = {**catalogue._inputs("causal"), "labels": catalogue._inputs("causal")["input_ids"]}
    experts, _ = _experts(model)
    mod = model.get_submodule(experts[0].name)
    rows = batch["input_ids"].numel() * model.config.num_experts_per_tok  # (token, chosen expert) pairs
    hidden, inner = mod.hidden_dim, mod.intermediate_dim
    forward = 2 * rows * (2 * inner * hidden + inner * hidden)  # gate_up then down, per pair
    _, per = count_training_flops(model, batch, lambda m, b: m(**b).loss)
    assert per[experts[0].name] == 3 * forward  # forward + input and weight gradients
    apply_plan_(model, experts, {experts[0].name: torch.arange(inner // 2)})
    _, per = count_training_flops(model, batch, lambda m, b: m(**b).loss)
    assert per[experts[0].name] == 3 * forward // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_a_gmp_fit_shrinks_the_experts_and_everything_still_works(family: str, tmp_path: Path) -> None:
    """The catalogue's run: GMP to 50 %; every live parameter in the optimizer, load_pruned gives equal
    outputs, generate (KV cache) equals a cache-free loop."""
    row = catalogue.run_family(family, tmp_path)
    assert row["error"] is None, row.get("traceback")
    assert row["problems"] == [], row["problems"]
    for i in range(catalogue.LAYERS):
        name = f"lm.model.layers.{i}.mlp.experts"
        assert name in row["shrunk"], row["shrunk"]
        dense, final = row["shrunk"][name]
        assert final < dense and final % 4 == 0
        assert final > 4  # counted FLOPs: cut in proportion, not to the floor (min_width 4)
    assert not any("Experts" in r for r in row["dense"].values()), row["dense"]
