"""Surgery beyond MLPs: Conv2d + BatchNorm, residual coupling, flatten, attention heads, ties, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from arch_helpers import check_after_cut, random_plan, snapshot, zero_consumers_
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ctprune_lightning.models.gpt import GPT, CausalSelfAttention
from ctprune_lightning.models.resnet import BasicBlock, ResNet
from ctprune_lightning.surgery import (MHA_REASON, HeadLayout, PrunableGroup, apply_plan_, discover_groups,
                                       find_head_layout, shrink_attention_heads_, shrink_conv_in_channels_,
                                       shrink_conv_out_channels_, shrink_linear_in_features_,
                                       shrink_linear_out_features_, shrink_norm_)

PROPERTY = settings(max_examples=25, deadline=None)


def keep_sets(n: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True).map(sorted)


# ----------------------------------------------------------------------------------- property tests
@PROPERTY
@given(st.data(), st.integers(1, 9), st.integers(1, 9))
def test_linear_keeps_exactly_the_selected_features(data: st.DataObject, n_in: int, n_out: int) -> None:
    torch.manual_seed(n_in * 10 + n_out)
    layer = nn.Linear(n_in, n_out)
    x = torch.randn(4, n_in)
    keep_out = torch.tensor(data.draw(keep_sets(n_out)))
    keep_in = torch.tensor(data.draw(keep_sets(n_in)))
    opt = torch.optim.Adam(layer.parameters())
    layer(x).pow(2).sum().backward()
    opt.step()
    m1, v1 = opt.state[layer.weight]["exp_avg"].clone(), opt.state[layer.weight]["exp_avg_sq"].clone()
    ref = layer(x).detach()
    masked = F.linear(x[:, keep_in], layer.weight[:, keep_in], layer.bias).detach()  # dense, dropped inputs ignored
    shrink_linear_out_features_(layer, keep_out, [opt])
    torch.testing.assert_close(layer(x), ref[:, keep_out])
    shrink_linear_in_features_(layer, keep_in, [opt])
    assert layer.weight.shape == (len(keep_out), len(keep_in)) and layer.in_features == len(keep_in)
    torch.testing.assert_close(layer(x[:, keep_in]), masked[:, keep_out])
    # slicing is exact; Adam's second moments (~1e-3 g²) can be below assert_close's default atol of 1e-5
    torch.testing.assert_close(opt.state[layer.weight]["exp_avg"], m1[keep_out][:, keep_in], rtol=0, atol=0)
    torch.testing.assert_close(opt.state[layer.weight]["exp_avg_sq"], v1[keep_out][:, keep_in], rtol=0, atol=0)


@PROPERTY
@given(st.data(), st.integers(1, 6), st.integers(1, 6), st.booleans())
def test_conv2d_batchnorm_keep_exactly_the_selected_channels(data: st.DataObject, c_in: int, c_out: int,
                                                             bias: bool) -> None:
    torch.manual_seed(c_in * 10 + c_out)
    conv, bn = nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias), nn.BatchNorm2d(c_out)
    bn.train()(conv(torch.randn(8, c_in, 5, 5)))  # non-trivial running statistics
    bn.eval()
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    x = torch.randn(2, c_in, 5, 5)
    keep_out, keep_in = torch.tensor(data.draw(keep_sets(c_out))), torch.tensor(data.draw(keep_sets(c_in)))
    dropped = [i for i in range(c_in) if i not in set(keep_in.tolist())]
    with torch.no_grad():
        ref = bn(conv(x))
        x_zero = x.clone()
        x_zero[:, dropped] = 0  # a dropped input channel that carries nothing
        ref_in = bn(conv(x_zero))
    shrink_conv_out_channels_(conv, keep_out)
    shrink_norm_(bn, keep_out)
    assert conv.out_channels == bn.num_features == len(keep_out) and bn.running_mean.shape == (len(keep_out),)
    with torch.no_grad():
        torch.testing.assert_close(bn(conv(x)), ref[:, keep_out])
    shrink_conv_in_channels_(conv, keep_in)
    assert conv.weight.shape[:2] == (len(keep_out), len(keep_in))
    with torch.no_grad():
        torch.testing.assert_close(bn(conv(x[:, keep_in])), ref_in[:, keep_out])


@PROPERTY
@given(st.data(), st.integers(1, 4), st.integers(1, 4))
def test_attention_heads_keep_exactly_the_selected_heads(data: st.DataObject, n_head: int, head_dim: int) -> None:
    torch.manual_seed(n_head * 10 + head_dim)
    attn = CausalSelfAttention(n_embd=6, n_head=n_head, head_dim=head_dim).eval()
    x = torch.randn(2, 5, 6)
    keep = torch.tensor(data.draw(keep_sets(n_head)))
    dead = [h for h in range(n_head) if h not in set(keep.tolist())]
    opt = torch.optim.AdamW(attn.parameters())
    attn(x).sum().backward()
    opt.step()
    moment = opt.state[attn.c_attn.weight]["exp_avg"].clone()
    second = opt.state[attn.c_attn.weight]["exp_avg_sq"].clone()
    with torch.no_grad():  # reference: the dense module with the dropped heads' output columns zeroed
        for h in dead:
            attn.c_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
        ref = attn(x)
    shrink_attention_heads_(attn, keep, [opt])
    assert attn.n_head == len(keep) and attn.c_attn.out_features == 3 * len(keep) * head_dim
    assert attn.c_proj.in_features == len(keep) * head_dim
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref, atol=1e-6, rtol=1e-5)
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) + s * n_head * head_dim
                      for s in range(3) for h in keep.tolist()]).sort().values
    torch.testing.assert_close(opt.state[attn.c_attn.weight]["exp_avg"], moment[rows], rtol=0, atol=0)
    torch.testing.assert_close(opt.state[attn.c_attn.weight]["exp_avg_sq"], second[rows], rtol=0, atol=0)


# -------------------------------------------------------------------------------------- discovery
def test_residual_additions_couple_every_conv_of_a_stage() -> None:
    model = ResNet(depth=14, widths=(8, 16, 32))  # 2 blocks per stage
    groups, skipped = discover_groups(model, torch.zeros(2, 1, 28, 28))
    by_name = {g.name: g for g in groups}
    stage2 = {(s.module, s.kind) for s in by_name["layer2.0.conv2"].slices}
    assert stage2 == {
        ("layer2.0.conv2", "conv_out"), ("layer2.0.bn2", "norm"), ("layer2.0.shortcut.0", "conv_out"),
        ("layer2.0.shortcut.1", "norm"), ("layer2.1.conv2", "conv_out"), ("layer2.1.bn2", "norm"),
        ("layer2.1.conv1", "conv_in"), ("layer3.0.conv1", "conv_in"), ("layer3.0.shortcut.0", "conv_in")}
    assert {(s.module, s.kind) for s in by_name["stem.0"].slices} >= {("layer1.1.conv2", "conv_out"),
                                                                       ("layer2.0.shortcut.0", "conv_in")}
    assert ("fc", "linear_in") in {(s.module, s.kind) for s in by_name["layer3.0.conv2"].slices}
    assert len(groups) == 3 + 6 and dict(skipped) == {"fc": "output layer (its features leave the model)"}
    assert by_name["layer2.0.conv2"].width(model) == 16 and by_name["layer1.1.conv1"].width(model) == 8


def test_zero_channels_of_a_residual_stage_can_be_removed_without_changing_the_output() -> None:
    torch.manual_seed(0)
    model = ResNet(depth=14, widths=(8, 16, 32))
    model.train()(torch.randn(16, 1, 28, 28))  # BatchNorm running statistics
    model.eval()
    groups, _ = discover_groups(model, torch.zeros(2, 1, 28, 28))
    dead = {"stem.0": [1, 5], "layer2.0.conv2": [0, 3, 15], "layer3.0.conv2": [7], "layer2.1.conv1": [2, 9]}
    for g in groups:
        zero_consumers_(model, g, dead.get(g.name, []))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    plan = {g.name: torch.tensor([i for i in range(g.width(model)) if i not in dead[g.name]]) for g in groups
            if g.name in dead}
    apply_plan_(model, groups, plan)
    assert model.layer2[1].conv1.in_channels == 13 and model.layer3[0].shortcut[0].in_channels == 13
    assert model.fc.in_features == 31 and model.layer2[1].conv1.out_channels == 14
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)


def test_flattened_conv_maps_cut_whole_blocks_of_linear_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(),
                          nn.Linear(5, 3)).eval()
    groups, _ = discover_groups(model, torch.zeros(2, 1, 6, 6))
    g = groups[0]
    assert g.name == "0" and [(s.module, s.kind, s.block) for s in g.slices] == [("0", "conv_out", 1),
                                                                               ("3", "linear_in", 16)]
    zero_consumers_(model, g, [1, 2])
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        ref = model(x)
    apply_plan_(model, groups, {"0": torch.tensor([0, 3])})
    assert model[3].in_features == 32
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)


def test_depthwise_convolutions_are_cut_and_grouped_ones_cut_uniformly_per_group() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1),
                          nn.Conv2d(4, 4, 1, groups=2), nn.Flatten(), nn.Linear(64, 3))
    groups, skipped = discover_groups(model, torch.zeros(2, 1, 8, 8))
    by = {g.name: [(s.module, s.kind, s.block) for s in g.slices] for g in groups}
    assert by == {"0": [("0", "conv_out", 1), ("2", "depthwise", 1), ("3", "conv_in", 1)],  # depthwise carries them
                  "3": [("3", "tiled2:conv_out", 1), ("4", "gconv_in", 1)],  # '4' (groups=2): one unit per group
                  "4": [("4", "gconv_out", 1), ("6", "tiled2:linear_in", 16)]}, by
    assert {g.name: g.width(model) for g in groups} == {"0": 8, "3": 2, "4": 2}
    assert not any("grouped" in why for _, why in skipped), skipped
    x = torch.randn(2, 1, 8, 8)
    apply_plan_(model, groups, {"0": torch.tensor([1, 4, 6]), "3": torch.tensor([1]), "4": torch.tensor([0])})
    assert (model[2].groups, model[2].in_channels, model[2].out_channels) == (3, 3, 3)
    assert (model[3].out_channels, model[4].in_channels, model[4].out_channels, model[4].groups) == (2, 2, 2, 2)
    assert model[6].in_features == 32 and model(x).shape == (2, 3)


def test_gpt_groups_heads_and_mlp_but_never_the_vocabulary() -> None:
    model = GPT(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_embd=16)
    groups, skipped = discover_groups(model, torch.zeros(2, 8, dtype=torch.long), min_width=8, round_to=8)
    assert [(g.name, g.unit, g.width(model)) for g in groups] == [
        ("blocks.0.attn", "head", 4), ("blocks.0.mlp.c_fc", "channel", 64),
        ("blocks.1.attn", "head", 4), ("blocks.1.mlp.c_fc", "channel", 64)]
    assert [(s.module, s.kind, s.parts) for s in groups[0].slices] == [("blocks.0.attn", "heads", ("c_attn", "c_proj"))]
    assert (groups[0].min_width, groups[0].round_to) == (1, 1)  # heads: their own limit, never rounded
    assert (groups[1].min_width, groups[1].round_to) == (None, 8)
    reasons = dict(skipped)
    assert set(reasons) == {"tok_emb", "lm_head"}
    assert "never cut unless prune_embeddings=True" in reasons["tok_emb"]
    assert reasons["lm_head"] == "output layer (its features leave the model)"
    assert find_head_layout(nn.MultiheadAttention(8, 2)) is None


def test_multihead_attention_is_left_dense_because_heads_fix_embed_dim() -> None:
    """Evidence for the decision: a head cut that keeps embed_dim breaks F.multi_head_attention_forward."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    rows = torch.cat([torch.arange(4) + s * 8 for s in range(3)])  # head 0 of q, k and v
    mha.in_proj_weight = nn.Parameter(mha.in_proj_weight[rows].detach())
    mha.in_proj_bias = nn.Parameter(mha.in_proj_bias[rows].detach())
    mha.out_proj.weight = nn.Parameter(mha.out_proj.weight[:, :4].detach())
    mha.num_heads, mha.head_dim = 1, 4
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="unflatten"):
        mha(x, x, x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.out = nn.Linear(5, 8), nn.Linear(8, 2)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.out(h + self.attn(h, h, h, need_weights=False)[0])

    groups, skipped = discover_groups(Net(), torch.zeros(2, 3, 5))
    reasons = dict(skipped)
    assert groups == [] and reasons["attn"] == MHA_REASON
    assert "coupled to nn.MultiheadAttention 'attn'" in reasons["inp"]
    with pytest.raises(TypeError, match="not a head-structured attention module.*embed_dim"):
        shrink_attention_heads_(Net().attn, torch.tensor([0]))


def test_tied_weights_cut_alike_stay_one_parameter() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    assert model.lm_head.weight is model.tok_emb.weight
    groups, skipped = discover_groups(model, torch.zeros(2, 8, dtype=torch.long), prune_embeddings=True)
    resid = next(g for g in groups if g.name == "tok_emb")
    kinds = {(s.module, s.kind) for s in resid.slices}
    assert {("tok_emb", "embedding_dim"), ("lm_head", "linear_in"), ("pos_emb", "embedding_dim"),
            ("blocks.0.attn", "attention_in"), ("blocks.0.attn", "attention_out"), ("ln_f", "norm")} <= kinds
    opt = torch.optim.AdamW(model.parameters())
    idx = torch.randint(0, 11, (2, 8))
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()
    plan = {"tok_emb": torch.tensor([0, 2, 3, 7]), "blocks.0.attn": torch.tensor([1])}
    before = snapshot(model, [opt], groups, plan)
    apply_plan_(model, groups, plan, [opt])
    assert model.lm_head.weight is model.tok_emb.weight and model.tok_emb.weight.shape == (11, 4)
    assert model.blocks[0].attn.c_attn.weight.shape == (12, 4) and model.blocks[0].attn.n_head == 1
    check_after_cut(model, [opt], before)
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()


def test_tied_weights_cut_differently_are_refused_with_a_clear_message() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    groups, skipped = discover_groups(Tied(), torch.zeros(2, 6))
    reasons = dict(skipped)
    assert groups == []
    assert reasons["a"] == ("tied weights: ['a.weight', 'b.weight'] are one Parameter, but this group cuts it "
                            "along dims [0, 1]; left dense")
    assert "cuts only ['b.weight'] and not ['a.weight']" in reasons["b"]


def test_frozen_and_bias_free_layers_are_cut_and_stay_frozen() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12, bias=False), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    model[2].requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    groups, _ = discover_groups(model, torch.zeros(2, 10))
    assert [g.name for g in groups] == ["0", "2"]
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    plan = {"0": torch.tensor([1, 4, 5, 11]), "2": torch.tensor([0, 6])}
    before = snapshot(model, [opt], groups, plan)
    apply_plan_(model, groups, plan, [opt])
    check_after_cut(model, [opt], before)
    assert model[0].bias is None and model[0].weight.shape == (4, 10)
    assert not model[2].weight.requires_grad and not model[2].bias.requires_grad
    assert all(p is not model[2].weight for p in opt.param_groups[0]["params"])
    frozen = model[2].weight.detach().clone()
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    assert torch.equal(model[2].weight, frozen) and model[2].weight.grad is None


def test_options_ignore_limit_and_round() -> None:
    model = ResNet(depth=8, widths=(16, 32, 64))
    x = torch.zeros(2, 1, 28, 28)
    groups, skipped = discover_groups(model, x, ignored_layers=[nn.BatchNorm2d])
    assert groups == [] and "coupled to ignored layer 'stem.1'" in dict(skipped)["stem.0"]
    deeper = ResNet(depth=14, widths=(16, 32, 64))
    groups, skipped = discover_groups(deeper, x, ignored_layers=["layer3"], round_to=8,
                                      group_limits={"layer2.0.conv1": 4, "layer2": 12, nn.Conv2d: 6})
    limits = {g.name: (g.min_width, g.round_to) for g in groups}
    assert limits == {"stem.0": (6, 8), "layer1.0.conv1": (6, 8), "layer1.1.conv1": (6, 8),
                      "layer2.0.conv1": (4, 8), "layer2.1.conv1": (12, 8)}
    reasons = dict(skipped)
    assert reasons["layer3.0.conv1"] == reasons["layer3.0.conv2"] == "ignored"
    assert reasons["layer2.0.conv2"].startswith("coupled to ignored layer 'layer3.")  # stage 2 feeds stage 3
    groups, skipped = discover_groups(model, x, min_width=16, group_limits={"layer3": 64})
    assert [g.name for g in groups] == ["layer2.0.conv1", "layer2.0.conv2"]
    assert dict(skipped)["stem.0"] == "too small (width 16 <= min_width 16)"
    assert dict(skipped)["layer3.0.conv1"] == "too small (width 64 <= limit 64)"
    gpt = GPT(vocab_size=5, block_size=4, n_layer=1, n_head=2, n_embd=8)
    groups, skipped = discover_groups(gpt, torch.zeros(1, 4, dtype=torch.long), group_limits={CausalSelfAttention: 2})
    assert dict(skipped)["blocks.0.attn"] == "too small (2 heads <= limit 2)"
    with pytest.raises(ValueError, match="`group_limits` key 'nope' names no module"):
        discover_groups(model, x, group_limits={"nope": 3})
    with pytest.raises(ValueError, match=r"`group_limits\['stem.0'\]` must be an integer >= 1.*0"):
        discover_groups(model, x, group_limits={"stem.0": 0})
    with pytest.raises(ValueError, match="`round_to` must be None or an integer >= 1, got 0"):
        discover_groups(model, x, round_to=0)


def test_unsupported_couplings_are_refused_and_named() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.gn, self.b = nn.Linear(4, 8), nn.PReLU(8), nn.Linear(8, 8)  # (GroupNorm: cut since 12-07)
            self.scale = nn.Parameter(torch.ones(8))
            self.c = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.gn(self.a(x))) * self.scale)

    groups, skipped = discover_groups(Odd(), torch.zeros(2, 4))
    reasons = dict(skipped)
    assert groups == []
    assert reasons["a"] == "coupled to PReLU 'gn', which cannot be shrunk yet"
    assert reasons["b"] == "coupled to a bare nn.Parameter 'scale' outside any supported layer (cannot be cut)"


def test_a_module_that_breaks_after_a_cut_is_refused_by_the_trial_cut() -> None:
    class Stale(CausalSelfAttention):
        """Reads a cached width in forward, so removing a head breaks its reshape."""

        def __init__(self) -> None:
            super().__init__(n_embd=8, n_head=2)
            self.inner = 8

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, T, _ = x.shape
            q, k, v = self.c_attn(x).split(self.inner, dim=2)
            q, k, v = (t.reshape(B, T, 2, self.inner // 2).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, self.inner)
            return self.c_proj(y)

    model = nn.Sequential(nn.Linear(3, 8), Stale(), nn.Linear(8, 2))
    groups, skipped = discover_groups(model, torch.zeros(2, 4, 3))
    assert "1" not in {g.name for g in groups}
    assert dict(skipped)["1"].startswith("a trial cut failed (ValueError: not enough values to unpack")
    groups, _ = discover_groups(model, torch.zeros(2, 4, 3), validate=False)
    assert "1" in {g.name for g in groups}


def test_block_with_identity_shortcut_couples_input_and_output() -> None:
    block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), BasicBlock(4, 4), nn.Flatten(),
                          nn.Linear(4 * 25, 2))
    groups, _ = discover_groups(block, torch.zeros(2, 1, 5, 5))
    stem = next(g for g in groups if g.name == "0")
    assert {("2.conv1", "conv_in"), ("2.conv2", "conv_out"), ("2.bn2", "norm"), ("4", "linear_in")} <= {
        (s.module, s.kind) for s in stem.slices}
    model = nn.Sequential(block)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 1, 5, 5)).sum().backward()
    opt.step()
    groups, _ = discover_groups(model, torch.zeros(2, 1, 5, 5))
    plan = random_plan(model, groups, torch.Generator().manual_seed(3))
    before = snapshot(model, [opt], groups, plan)
    apply_plan_(model, groups, plan, [opt])
    check_after_cut(model, [opt], before)
    model(torch.randn(3, 1, 5, 5)).sum().backward()
    opt.step()


class SeparateQKV(nn.Module):
    """HF-style attention: q/k/v/o projections and a `num_heads` attribute read in forward."""

    def __init__(self, dim: int = 8, num_heads: int = 4, kv_heads: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        if kv_heads is not None:
            self.num_key_value_heads = kv_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y)


def cut_heads_1_and_3_preserves_the_output(model: nn.Module, groups: list[PrunableGroup],
                                           heads: PrunableGroup) -> torch.Tensor:
    """Zero what heads 0 and 2 of ``model[1]`` feed, cut them: the output is unchanged. The input used."""
    zero_consumers_(model, heads, [0, 2])
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        ref = model(x)
    apply_plan_(model, groups, {"1": torch.tensor([1, 3])})
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)
    return x


def test_separate_qkv_projections_prune_heads_and_grouped_query_attention_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), SeparateQKV(), nn.Linear(8, 2)).eval()
    groups, skipped = discover_groups(model, torch.zeros(2, 5, 3))
    heads = next(g for g in groups if g.name == "1")
    assert heads.slices[0].parts == ("q_proj", "k_proj", "v_proj", "o_proj") and heads.width(model) == 4
    widths = {g.name: [(s.module, s.kind) for s in g.slices] for g in groups}
    assert widths == {"0": [("0", "linear_out"), ("1", "attention_in")], "1": [("1", "heads")],
                      "1.o_proj": [("1", "attention_out"), ("2", "linear_in")]}
    x = cut_heads_1_and_3_preserves_the_output(model, groups, heads)
    assert model[1].num_heads == 2 and model[1].k_proj.out_features == 4 and model[1].o_proj.in_features == 4
    zero_consumers_(model, groups[0], [5])  # a unit going into the attention's q/k/v
    zero_consumers_(model, groups[2], [2])  # a unit coming out of its output projection
    with torch.no_grad():
        ref = model(x)
    all_but = lambda i: torch.tensor([j for j in range(8) if j != i])  # noqa: E731
    apply_plan_(model, groups, {"0": all_but(5), "1.o_proj": all_but(2)})
    assert model[1].q_proj.in_features == 7 and model[1].o_proj.out_features == 7 and model[2].in_features == 7
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)
    gqa = nn.Sequential(nn.Linear(3, 8), SeparateQKV(kv_heads=2), nn.Linear(8, 2))
    _, skipped = discover_groups(gqa, torch.zeros(2, 5, 3))
    assert dict(skipped)["1"] == ("attention heads: grouped-query attention (num_key_value_heads=2 != "
                                  "num_heads=4) is not supported")


class TimmAttention(nn.Module):
    """timm's layout: one fused ``qkv`` Linear ([q | k | v], head-major), ``proj`` out, ``num_heads`` read in
    forward."""

    def __init__(self, dim: int = 8, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj(y)


def test_timm_fused_qkv_attention_prunes_heads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), TimmAttention(), nn.Linear(8, 2)).eval()
    assert find_head_layout(model[1]) == HeadLayout(("qkv",), "proj", "num_heads")
    groups, _ = discover_groups(model, torch.zeros(2, 5, 3))
    heads = next(g for g in groups if g.name == "1")  # before: "partially coupled" (a split of qkv), left dense
    assert heads.slices[0].parts == ("qkv", "proj") and heads.width(model) == 4
    cut_heads_1_and_3_preserves_the_output(model, groups, heads)
    assert model[1].num_heads == 2 and model[1].qkv.out_features == 12 and model[1].proj.in_features == 4
