"""Growth: every registered handler adds units without changing the model's outputs, the new units train,
and the optimizer state stays aligned through shrink -> grow -> shrink."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

from ctprune_lightning.models.gpt import GPT
from ctprune_lightning.models.lru import LRUClassifier
from ctprune_lightning.surgery import apply_plan_, convert_multihead_attention_, discover_groups
from ctprune_lightning.surgery.balanced import LRU_STATE_AXES
from ctprune_lightning.surgery.handlers import REGISTRY, GrowInit
from ctprune_lightning.surgery.optim import live_parameters_missing

Case = tuple[nn.Module, Any, Callable[[nn.Module], Tensor], str, dict]


class RNNNet(nn.Module):
    def __init__(self, kind: type[nn.RNNBase], layers: int = 2) -> None:
        super().__init__()
        self.inp, self.rnn, self.head = nn.Linear(5, 12), kind(12, 10, num_layers=layers, batch_first=True), nn.Linear(10, 3)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.rnn(self.inp(x))
        return self.head(y[:, -1])


class SepConv(nn.Module):
    """A depthwise-separable block: conv -> BN -> depthwise conv -> BN -> pointwise conv -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.dw, self.bn2 = nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12)
        self.pw, self.fc = nn.Conv2d(12, 8, 1), nn.Linear(8 * 16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc(torch.relu(self.pw(x)).flatten(1))


def _plain(model: nn.Module, x: Any) -> Callable[[nn.Module], Tensor]:
    return lambda m: m(x)


def case_linear() -> Case:
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(32, 6)
    return model, x, _plain(model, x), "0", {}


def case_conv_norm_flatten() -> Case:  # conv_out + BatchNorm + conv_in, and a Linear fed by a flattened map (block)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 6, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 4))
    x = torch.randn(16, 3, 4, 4)
    return model, x, _plain(model, x), "0", {}


def case_flatten_block() -> Case:
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 6, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 4))
    x = torch.randn(16, 3, 4, 4)
    return model, x, _plain(model, x), "3", {}


def case_depthwise() -> Case:
    model = SepConv()
    x = torch.randn(16, 3, 4, 4)
    return model, x, _plain(model, x), "c1", {}


class GroupedConv(nn.Module):
    """conv -> BN -> grouped conv (groups=4) -> BN -> conv -> flatten -> linear: both sides of a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.gc, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.pw, self.fc = nn.Conv2d(16, 6, 1), nn.Linear(6 * 16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.bn2(self.gc(x)))
        return self.fc(torch.relu(self.pw(x)).flatten(1))


def case_grouped_in() -> Case:  # tiled producer + BatchNorm, the grouped conv's input (one column per unit)
    model = GroupedConv()
    x = torch.randn(16, 3, 4, 4)
    return model, x, _plain(model, x), "c1", {}


def case_grouped_out() -> Case:  # the grouped conv's outputs (one filter per group per unit), tiled BN + consumer
    model = GroupedConv()
    x = torch.randn(16, 3, 4, 4)
    return model, x, _plain(model, x), "gc", {}


class EmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.emb(x).mean(1))


def case_embedding() -> Case:
    model = EmbedNet()
    x = torch.randint(0, 20, (32, 5))
    return model, x, _plain(model, x), "emb", {"prune_embeddings": True}


def case_heads() -> Case:
    model = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=4, n_embd=16)
    x = torch.randint(0, 11, (8, 8))
    name = next(n for n, m in model.named_modules() if n.endswith("attn"))
    return model, x, _plain(model, x), name, {}


def case_gpt_mlp() -> Case:
    model = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=4, n_embd=16)
    x = torch.randint(0, 11, (8, 8))
    name = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == 64)
    return model, x, _plain(model, x), name, {}


def case_mha() -> Case:
    model = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    convert_multihead_attention_(model)
    x = torch.randn(8, 6, 16)
    return model, x, _plain(model, x), "self_attn", {}


def case_lru() -> Case:
    model = LRUClassifier(input_dim=12, d_model=8, d_state=12, num_blocks=1, dropout=0.0)
    x = torch.randn(8, 12, 1)
    return model, x, _plain(model, x), "blocks.0.lru", {}


def case_gru() -> Case:
    model = RNNNet(nn.GRU)
    x = torch.randn(16, 7, 5)
    return model, x, _plain(model, x), "rnn", {}


def case_lstm() -> Case:
    model = RNNNet(nn.LSTM)
    x = torch.randn(16, 7, 5)
    return model, x, _plain(model, x), "rnn", {}


def case_rnn_input() -> Case:
    model = RNNNet(nn.GRU, layers=1)
    x = torch.randn(16, 7, 5)
    return model, x, _plain(model, x), "inp", {}


def _decoder() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1))


def case_instance_norm() -> Case:  # per-channel statistics: new channels are normalised on their own
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    x = torch.randn(16, 3, 6, 6)
    return model, x, _plain(model, x), "0", {}


def case_group_norm() -> Case:  # whole GroupNorm groups (blocked units): producer, GroupNorm, consumer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 5, 1))
    x = torch.randn(16, 3, 4, 4)
    return model, x, _plain(model, x), "0", {}


def case_transposed_out() -> Case:  # the transposed convolution's output channels (weight dim 1, bias)
    model = _decoder()
    x = torch.randn(16, 3, 8, 8)
    return model, x, _plain(model, x), "2", {}


def case_transposed_in() -> Case:  # its input channels (weight dim 0), fed by a convolution
    model = _decoder()
    x = torch.randn(16, 3, 8, 8)
    return model, x, _plain(model, x), "0", {}


def _hf(family: str) -> Case:
    transformers = pytest.importorskip("transformers")
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=4, n_inner=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model, name = transformers.GPT2LMHeadModel(cfg), "transformer.h.0.attn"
    else:
        cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model, name = transformers.LlamaForCausalLM(cfg), "model.layers.0.self_attn"
    ids = torch.randint(0, 50, (4, 8))
    return model, {"input_ids": ids}, lambda m: m(input_ids=ids).logits, name, {}


def case_hf_gpt2() -> Case:
    return _hf("gpt2")


def case_hf_llama() -> Case:
    return _hf("llama")


def case_hf_conv1d() -> Case:
    model, x, fwd, _, kw = _hf("gpt2")
    return model, x, fwd, "transformer.h.0.mlp.c_fc", kw


def case_hf_moe() -> Case:
    """Mixtral's fused experts; eager experts (any width: growth by 3 units)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=16, bos_token_id=0,
                                     eos_token_id=0, pad_token_id=0)
    model = transformers.MixtralForCausalLM(cfg)
    model.config._experts_implementation = "eager"
    ids = torch.randint(0, 50, (4, 8))
    return model, {"input_ids": ids}, lambda m: m(input_ids=ids).logits, "model.layers.0.mlp.experts", {}


CASES = {n[5:]: f for n, f in dict(globals()).items() if n.startswith("case_")}
#: which case covers which built-in handler (every registered one must be covered)
COVERS = {"LinearHandler": "linear", "ConvHandler": "depthwise", "NormHandler": "conv_norm_flatten",
          "EmbeddingHandler": "embedding", "AttentionHandler": "heads", "MultiheadAttentionHandler": "mha",
          "HuggingFaceHandler": "hf_gpt2", "LRUHandler": "lru", "RNNHandler": "gru",
          "MoEExpertsHandler": "hf_moe", "TiledHandler": "grouped_out", "TransposedConvHandler": "transposed_out",
          "BlockedHandler": "group_norm"}


def test_every_builtin_handler_has_a_growth_case() -> None:
    builtin = {type(h).__name__ for h in REGISTRY if type(h).__module__.startswith("ctprune_lightning.")}
    assert builtin == set(COVERS) and all(COVERS[h] in CASES for h in builtin)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _new_index_grads(group: Any, model: nn.Module, old: int) -> dict[str, float]:
    """|grad| summed over the new units' entries of every parameter slice of the group."""
    out: dict[str, float] = {}
    slices = group.unit_slices(model)
    if not slices:  # SSM states own no slice: the state-sized parameters
        lru = model.get_submodule(group.name)
        slices = [(f"{group.name}.{n}", getattr(lru, n), a, None) for n, a in LRU_STATE_AXES.items()]
    for name, p, dim, units in slices:
        if p.grad is None:
            continue
        idx = torch.arange(old, p.shape[dim]) if units is None else (units >= old).nonzero().flatten()
        out[f"{name}/{dim}"] = out.get(f"{name}/{dim}", 0.0) + float(p.grad.index_select(dim, idx).abs().sum())
    return out


def _train_step(model: nn.Module, fwd: Callable[[nn.Module], Tensor], opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    out = fwd(model)
    (out.float() ** 2).mean().backward()


@pytest.mark.parametrize("case", sorted(CASES))
def test_growth_preserves_outputs_trains_new_units_and_keeps_optimizer_state_aligned(case: str) -> None:
    torch.manual_seed(0)
    model, example, fwd, name, kw = CASES[case]()
    groups, skipped = discover_groups(model, example, **kw)
    by_name = {g.name: g for g in groups}
    assert name in by_name, (name, sorted(by_name), skipped)
    group = by_name[name]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # Adam moments exist before any surgery
        _train_step(model, fwd, opt)
        opt.step()
    width = group.width(model)
    keep = torch.arange(0, width, 2)
    apply_plan_(model, groups, {name: keep}, [opt])
    old = group.width(model)
    assert old == keep.numel()

    model.eval()
    with torch.no_grad():
        before = fwd(model).clone()
    state_before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_plan_(model, groups, {}, [opt], grow={name: 3})
    assert group.width(model) == old + 3
    with torch.no_grad():
        after = fwd(model)
    assert _rel(after, before) <= 1e-6, f"{case}: outputs moved by {_rel(after, before):.2e} after growth"
    assert live_parameters_missing(model, [opt]) == []
    for n, p in model.named_parameters():  # old entries kept exactly, their moments too; new slots' moments zero
        ref = params_before[n]
        for k, v in opt.state[p].items():
            old_v = state_before[n][k]
            if not (isinstance(v, Tensor) and v.dim() > 0):
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(old_v)), (n, k)  # Adam's step kept
                continue
            assert v.shape == p.shape, (n, k)
            if p.shape == ref.shape:
                assert torch.equal(p.detach(), ref) and torch.equal(v, old_v), (n, k)
            else:  # grown: the old values are all there and the rest is zero
                assert int((v != 0).sum()) == int((old_v != 0).sum()), (n, k)
                assert float(v.double().abs().sum()) == pytest.approx(float(old_v.double().abs().sum()), rel=1e-6)
    model.train()
    seen: dict[str, float] = {}
    for _ in range(2):  # the new units get gradients within two steps
        _train_step(model, fwd, opt)
        for k, v in _new_index_grads(group, model, old).items():
            seen[k] = max(seen.get(k, 0.0), v)
        opt.step()
    assert seen and any(v > 0 for v in seen.values()), f"{case}: no gradient reached the new units {seen}"
    dead = sorted(k for k, v in seen.items() if v == 0 and "bias_k" not in k)
    assert not dead, f"{case}: new units without gradient in {dead}"

    # shrink back to the original units: their parameters and moments are exactly the pre-growth ones
    if group.unit != "state":  # SSM truncation is a change of basis with re-initialised moments (balanced.py)
        grown_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
        slices = group.unit_slices(model)
        expected = {}
        for uname, p, dim, units in slices:
            idx = torch.arange(old) if units is None else (units < old).nonzero().flatten()
            expected[uname, dim] = (p.detach().index_select(dim, idx),
                                    {k: v.index_select(dim, idx) for k, v in grown_state[id(p)].items()
                                     if isinstance(v, Tensor) and v.dim() > 0})
        apply_plan_(model, groups, {name: torch.arange(old)}, [opt])
        for uname, p, dim, units in group.unit_slices(model):
            if (uname, dim) not in expected or p.shape[dim] != expected[uname, dim][0].shape[dim]:
                continue
            data, moments = expected[uname, dim]
            if data.shape == p.shape:
                assert torch.equal(p.detach(), data), uname
                for k, v in moments.items():
                    assert torch.equal(opt.state[p][k], v), (uname, k)
    else:
        apply_plan_(model, groups, {name: torch.arange(old)}, [opt])
    assert group.width(model) == old and live_parameters_missing(model, [opt]) == []
    for p in model.parameters():
        for v in opt.state[p].values():
            assert not (isinstance(v, Tensor) and v.dim() > 0) or v.shape == p.shape


def test_growth_refuses_a_layernorm_group_and_bad_requests_changing_nothing() -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    groups, _ = discover_groups(model, torch.randn(4, 6))
    shapes = [tuple(p.shape) for p in model.parameters()]
    with pytest.raises(ValueError, match="LayerNorm"):
        apply_plan_(model, groups, {}, grow={"0": 2})
    with pytest.raises(ValueError, match="integers >= 1"):
        apply_plan_(model, groups, {}, grow={"0": 0})
    with pytest.raises(KeyError, match="unknown groups"):
        apply_plan_(model, groups, {}, grow={"nope": 1})
    assert [tuple(p.shape) for p in model.parameters()] == shapes
    with pytest.raises(ValueError, match="choose one of"):
        GrowInit(mode="xavier")


def test_growth_draws_are_deterministic_and_match_mode_follows_the_weights() -> None:
    def grown(mode: str | None) -> nn.Module:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        with torch.no_grad():
            model[0].weight.mul_(10)
        groups, _ = discover_groups(model, torch.randn(4, 6))
        torch.manual_seed(123 if mode is None else 7)  # the global RNG must not matter
        apply_plan_(model, groups, {}, grow={"0": 50}, init=None if mode is None else GrowInit(mode))
        return model

    a, b = grown(None), grown(None)
    assert torch.equal(a[0].weight, b[0].weight)
    new_default = grown("default")[0].weight[16:]
    assert float(new_default.abs().max()) <= 1 / 6 ** 0.5 + 1e-6  # U(±1/sqrt(fan_in)) like nn.Linear
    assert torch.equal(a[2].weight[:, 16:], torch.zeros(3, 50))  # outgoing weights zero
    matched = grown("match")[0].weight
    assert float(matched[16:].std()) == pytest.approx(float(matched[:16].std()), rel=0.25)
