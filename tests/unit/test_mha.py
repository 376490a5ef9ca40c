"""PrunableMultiheadAttention: a drop-in for nn.MultiheadAttention whose heads (and residual width) can be cut."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ctprune_lightning.surgery import (MHA_REASON, PrunableMultiheadAttention, apply_plan_, convert_multihead_attention_,
                                      discover_groups, shrink_mha_heads_)
from ctprune_lightning.surgery.arch import apply_arch_, capture_arch
from ctprune_lightning.surgery.mha import shrink_mha_embed_in_
from ctprune_lightning.surgery.optim import optimizer_params

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second contending thread only slows them

# float32, embed_dim 16: the two implementations order the same sums differently (fused kernels, SDPA vs
# bmm + softmax); each output element is a few dot products of <= 32 terms of O(1) values, so rounding
# differences are ~1e-6 (32 * 2^-24 per product, a few products deep). 1e-5 leaves a 10x margin and is far
# below any real error (a wrong mask or head changes outputs by >= 1e-2).
TOL = {"atol": 1e-5, "rtol": 1e-5}
E, H, D = 16, 4, 4
OPTIONS = [{}, {"kdim": 6, "vdim": 10}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"bias": False}]


def _inputs(batch_first: bool, kw: dict, n: int = 3, tgt: int = 5, src: int = 7) -> tuple[torch.Tensor, ...]:
    def seq(length: int, width: int) -> torch.Tensor:
        return torch.randn(n, length, width) if batch_first else torch.randn(length, n, width)
    return seq(tgt, E), seq(src, kw.get("kdim", E)), seq(src, kw.get("vdim", E))


def _pair(kw: dict, batch_first: bool) -> tuple[nn.MultiheadAttention, PrunableMultiheadAttention]:
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first, **kw).eval()
    if ref.in_proj_bias is not None:
        with torch.no_grad():  # nn.MultiheadAttention starts with zero biases: make them matter
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    return ref, PrunableMultiheadAttention.from_module(ref).eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(kw) or "plain")
def test_drop_in_matches_multihead_attention(batch_first: bool, kw: dict) -> None:
    torch.manual_seed(0)
    ref, new = _pair(kw, batch_first)
    assert list(new.state_dict()) == list(ref.state_dict())
    assert (new.embed_dim, new.num_heads, new.head_dim, new.batch_first) == (E, H, D, batch_first)
    q, k, v = _inputs(batch_first, kw)
    pad = torch.rand(3, 7) < 0.3
    pad[:, 0] = False  # no fully masked row (both give NaN there)
    causal_tgt = nn.Transformer.generate_square_subsequent_mask(7)[:5]
    bool_mask = torch.rand(5, 7) < 0.3
    bool_mask[:, 0] = False
    cases = [{}, {"key_padding_mask": pad}, {"attn_mask": bool_mask}, {"attn_mask": torch.randn(5, 7)},
             {"attn_mask": bool_mask, "key_padding_mask": pad}, {"need_weights": False},
             {"need_weights": False, "attn_mask": bool_mask, "key_padding_mask": pad},
             {"average_attn_weights": False}, {"average_attn_weights": False, "attn_mask": causal_tgt},
             {"need_weights": False, "attn_mask": torch.randn(3 * H, 5, 7)}]
    for case in cases:
        for grad in (True, False):  # without grad, nn.MultiheadAttention may take its fused fast path
            with torch.set_grad_enabled(grad):
                out_ref, w_ref = ref(q, k, v, **case)
                out_new, w_new = new(q, k, v, **case)
            torch.testing.assert_close(out_new, out_ref, **TOL, msg=lambda m: f"{case}: {m}")
            assert (w_new is None) == (w_ref is None), case
            if w_ref is not None:
                torch.testing.assert_close(w_new, w_ref, **TOL)
                src = 7 + int(kw.get("add_bias_kv", False)) + int(kw.get("add_zero_attn", False))
                assert w_new.shape == ((3, 5, src) if case.get("average_attn_weights", True) else (3, H, 5, src))


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_causal_and_unbatched_match(batch_first: bool) -> None:
    torch.manual_seed(1)
    ref, new = _pair({}, batch_first)
    x = torch.randn(2, 6, E) if batch_first else torch.randn(6, 2, E)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    pad = torch.zeros(2, 6)  # float, like the causal mask (torch deprecates mixing mask types)
    pad[1, -2:] = float("-inf")
    for case in [{"attn_mask": causal, "is_causal": True, "need_weights": False},
                 {"attn_mask": causal, "is_causal": True}, {"attn_mask": causal, "is_causal": True,
                                                            "key_padding_mask": pad, "need_weights": False}]:
        torch.testing.assert_close(new(x, x, x, **case)[0], ref(x, x, x, **case)[0], **TOL)
    u = torch.randn(6, E)  # unbatched: (L, E), batch_first ignored
    out_ref, w_ref = ref(u, u, u, key_padding_mask=pad[1])
    out_new, w_new = new(u, u, u, key_padding_mask=pad[1])
    assert out_new.shape == (6, E) and w_new.shape == (6, 6)
    torch.testing.assert_close(out_new, out_ref, **TOL)
    torch.testing.assert_close(w_new, w_ref, **TOL)
    with pytest.raises(RuntimeError, match="is_causal"):
        new(x, x, x, is_causal=True)


@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(kw) or "plain")
def test_state_dicts_load_both_ways(kw: dict) -> None:
    torch.manual_seed(2)
    ref = nn.MultiheadAttention(E, H, batch_first=True, **kw).eval()
    new = PrunableMultiheadAttention(E, H, batch_first=True, **kw).eval()
    assert {k: v.shape for k, v in new.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    q, k, v = _inputs(True, kw)
    new.load_state_dict(ref.state_dict())
    torch.testing.assert_close(new(q, k, v)[0], ref(q, k, v)[0], **TOL)
    other = PrunableMultiheadAttention(E, H, batch_first=True, **kw).eval()
    ref.load_state_dict(other.state_dict())
    torch.testing.assert_close(ref(q, k, v)[0], other(q, k, v)[0], **TOL)


@pytest.mark.parametrize("kw", [{}, {"kdim": 6, "vdim": 10}, {"add_bias_kv": True, "add_zero_attn": True}],
                         ids=["packed", "kdim", "bias_kv+zero_attn"])
def test_head_cut_equals_the_original_without_those_heads(kw: dict) -> None:
    """Removing heads 1 and 3 = the dense original with those heads' output-projection columns zeroed."""
    torch.manual_seed(3)
    ref, new = _pair(kw, True)
    keep = torch.tensor([0, 2])
    dead_cols = torch.cat([torch.arange(4, 8), torch.arange(12, 16)])
    with torch.no_grad():
        ref.out_proj.weight[:, dead_cols] = 0.0  # the reference: heads 1, 3 contribute nothing
    q, k, v = _inputs(True, kw)
    _, w_dense = new(q, k, v, average_attn_weights=False)
    shrink_mha_heads_(new, keep)
    assert (new.num_heads, new.head_dim, new.embed_dim, new.out_proj.in_features) == (2, D, E, 8)
    rows = new.in_proj_weight.shape[0] if new.in_proj_weight is not None else new.q_proj_weight.shape[0]
    assert rows == (24 if "kdim" not in kw else 8) and not new._qkv_same_embed_dim
    out, w = new(q, k, v, average_attn_weights=False)
    torch.testing.assert_close(out, ref(q, k, v)[0], **TOL)
    torch.testing.assert_close(w, w_dense[:, keep], **TOL)  # the kept heads attend exactly as before
    torch.testing.assert_close(new(q, k, v, need_weights=False)[0], out, **TOL)


def test_optimizer_holds_the_new_parameters_with_sliced_adam_moments() -> None:
    torch.manual_seed(4)
    attn = PrunableMultiheadAttention(E, H, batch_first=True, add_bias_kv=True)
    opt = torch.optim.Adam(attn.parameters(), lr=1e-2)
    x = torch.randn(2, 5, E)
    for _ in range(2):
        opt.zero_grad()
        attn(x, x, x)[0].pow(2).mean().backward()
        opt.step()
    before = {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
              for n, p in attn.named_parameters()}
    keep = torch.tensor([1, 3])
    sec = torch.cat([torch.arange(4, 8), torch.arange(12, 16)])  # rows of heads 1, 3 in one q/k/v section
    packed = torch.cat([sec, sec + 16, sec + 32])                 # ... in [q | k | v]
    expect = {"in_proj_weight": (0, packed), "in_proj_bias": (0, packed), "bias_k": (2, sec), "bias_v": (2, sec),
              "out_proj.weight": (1, sec), "out_proj.bias": (0, torch.arange(E))}
    shrink_mha_heads_(attn, keep, [opt])
    live = dict(attn.named_parameters())
    assert {id(p) for p in optimizer_params([opt])} == {id(p) for p in live.values()}
    assert set(map(id, opt.state)) <= {id(p) for p in live.values()}
    for name, (dim, idx) in expect.items():
        value, state = before[name]
        assert torch.equal(live[name].detach(), value.index_select(dim, idx)), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[live[name]][key], state[key].index_select(dim, idx)), (name, key)
        assert torch.equal(opt.state[live[name]]["step"], state["step"])
    opt.zero_grad()
    attn(x, x, x)[0].pow(2).mean().backward()
    opt.step()  # trains on with the sliced state
    assert all(torch.isfinite(p).all() for p in attn.parameters())


def test_refusals_name_the_bad_value() -> None:
    with pytest.raises(TypeError, match="convert_multihead_attention_"):
        shrink_mha_heads_(nn.MultiheadAttention(E, H), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        shrink_mha_heads_(PrunableMultiheadAttention(E, H), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="kdim=6"):
        shrink_mha_embed_in_(PrunableMultiheadAttention(E, H, kdim=6), torch.arange(8))
    assert "convert_multihead_attention_" in MHA_REASON and "embed_dim" in MHA_REASON


class Seq2Seq(nn.Module):
    """Linear in -> TransformerEncoderLayer -> TransformerDecoderLayer (self + cross attention) -> Linear out."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, E)
        self.enc = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoderLayer(E, H, 24, dropout=0.0, batch_first=True)
        self.out = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.dec(h, self.enc(h)))


def test_transformer_layers_convert_discover_cut_and_train() -> None:
    torch.manual_seed(5)
    model = Seq2Seq()
    x, y = torch.randn(16, 6, 5), torch.randn(16, 6, 3)
    ref = copy.deepcopy(model).eval()
    groups, skipped = discover_groups(model, x[:2])
    assert dict(skipped)["enc.self_attn"] == MHA_REASON  # unconverted: left dense, saying how to convert
    assert convert_multihead_attention_(model) == ["enc.self_attn", "dec.self_attn", "dec.multihead_attn"]
    assert isinstance(model.enc.self_attn, PrunableMultiheadAttention)
    model.eval()
    with torch.no_grad():  # eval, no grad: the layers' fused fast path, reading the drop-in's tensors
        torch.testing.assert_close(model(x), ref(x), **TOL)
    torch.testing.assert_close(model(x), ref(x), **TOL)  # with grad: the slow path through our forward
    groups, skipped = discover_groups(model, x[:2])
    units = {g.name: (g.unit, g.width(model)) for g in groups}
    assert units == {"inp": ("channel", E), "enc.self_attn": ("head", H), "enc.linear1": ("channel", 32),
                     "dec.self_attn": ("head", H), "dec.multihead_attn": ("head", H), "dec.linear1": ("channel", 24)}
    residual = {(s.module, s.kind) for s in groups[0].slices}
    assert {("enc.self_attn", "attention_in"), ("dec.multihead_attn", "attention_out"),
            ("enc.norm1", "norm"), ("out", "linear_in")} <= residual
    assert dict(skipped) == {"out": "output layer (its features leave the model)"}

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)  # built after the conversion
    model.train()
    losses = []
    for step in range(30):
        if step == 10:
            plan = {"enc.self_attn": torch.tensor([0, 3]), "dec.self_attn": torch.tensor([1, 2]),
                    "dec.multihead_attn": torch.tensor([0, 1, 2]), "enc.linear1": torch.arange(0, 32, 2),
                    "dec.linear1": torch.arange(12), "inp": torch.arange(12)}
            apply_plan_(model, groups, plan, [opt])
            assert {id(p) for p in optimizer_params([opt])} == {id(p) for p in model.parameters()}
            assert (model.enc.self_attn.num_heads, model.dec.multihead_attn.num_heads) == (2, 3)
            assert model.enc.self_attn.in_proj_weight.shape == (3 * 2 * D, 12) and model.enc.linear1.out_features == 16
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    final = sum(losses[-3:]) / 3
    assert final < 0.8 * losses[0] and final < losses[10], losses  # falling, and recovering after the cut
    model.eval()
    with torch.no_grad():  # after the cut the fast path is refused (_qkv_same_embed_dim) and ours runs
        torch.testing.assert_close(model(x), model.train()(x), **TOL)

    fresh = Seq2Seq()  # a checkpoint of the cut model rebuilds a fresh, converted one
    convert_multihead_attention_(fresh)
    apply_arch_(fresh, capture_arch(model))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), **TOL)


def test_encoder_stack_with_padding_mask_after_a_cut() -> None:
    """nn.TransformerEncoder's NestedTensor path is switched off, so a cut layer still sees its inputs."""
    torch.manual_seed(6)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=True).eval()
    x, pad = torch.randn(2, 5, E), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        dense = enc(x, src_key_padding_mask=pad)
    convert_multihead_attention_(enc)
    assert enc.use_nested_tensor is False
    real = ~pad  # the NestedTensor path writes zeros at padded positions; the values there mean nothing
    with torch.no_grad():
        torch.testing.assert_close(enc(x, src_key_padding_mask=pad)[real], dense[real], **TOL)
        shrink_mha_heads_(enc.layers[0].self_attn, torch.tensor([0, 1, 2]))
        out = enc(x, src_key_padding_mask=pad)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out[real], dense[real], **TOL)  # a head is gone: the output did change


def test_separate_key_value_widths_keep_the_residual_dense_but_heads_prunable() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.kv, self.out = nn.Linear(5, 8), nn.Linear(5, 6), nn.Linear(8, 2)
            self.attn = PrunableMultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, m = self.q(x), self.kv(x)
            return self.out(h + self.attn(h, m, m, need_weights=False)[0])

    torch.manual_seed(7)
    model, x = Net(), torch.randn(2, 3, 5)
    groups, skipped = discover_groups(model, x)
    assert [(g.name, g.unit, g.width(model)) for g in groups] == [("attn", "head", 2)]
    assert "kdim=6 / vdim=6 differ from embed_dim=8" in dict(skipped)["q"]
    apply_plan_(model, groups, {"attn": torch.tensor([1])})
    assert model.attn.q_proj_weight.shape == (4, 8) and model.attn.k_proj_weight.shape == (4, 6)
    assert model(x).shape == (2, 3, 2)
