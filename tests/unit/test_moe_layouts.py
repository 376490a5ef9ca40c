"""The fused-experts handler on every layout transformers' ``use_experts_implementation`` flags describe
(concatenated or interleaved gate/up, transposed, gate-less, biased), without ``transformers``: a cut equals
the dense module with the same units zeroed, growth keeps the output, importance maps rows to units."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from ctprune_lightning.importance import MagnitudeImportance
from ctprune_lightning.surgery.groups import PrunableGroup, apply_plan_
from ctprune_lightning.surgery.handlers.moe import MOE_FFN, experts_layout
from ctprune_lightning.surgery.slices import Slice

E, H, I = 3, 6, 8


class Experts(nn.Module):
    """A fused experts module; every expert is applied to every token (routing is not the point here)."""

    def __init__(self, transposed: bool, concatenated: bool, has_gate: bool, has_bias: bool) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, I
        self.is_transposed, self.is_concatenated, self.has_gate, self.has_bias = (transposed, concatenated,
                                                                                  has_gate, has_bias)
        self.inp, s = ("gate_up_proj", 2) if has_gate else ("up_proj", 1)
        setattr(self, self.inp, nn.Parameter(torch.randn((E, H, s * I) if transposed else (E, s * I, H))))
        self.down_proj = nn.Parameter(torch.randn((E, I, H) if transposed else (E, H, I)))
        if has_bias:
            setattr(self, f"{self.inp}_bias", nn.Parameter(torch.randn(E, s * I)))
            self.down_proj_bias = nn.Parameter(torch.randn(E, H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self, self.inp)
        h = torch.einsum("nh,eho->eno" if self.is_transposed else "nh,eoh->eno", x, w)
        if self.has_bias:
            h = h + getattr(self, f"{self.inp}_bias")[:, None, :]
        if self.has_gate:
            g, u = h.chunk(2, dim=-1) if self.is_concatenated else (h[..., 0::2], h[..., 1::2])
            a = nn.functional.silu(g) * u
        else:
            a = nn.functional.silu(h)
        out = torch.einsum("eni,eih->nh" if self.is_transposed else "eni,ehi->nh", a, self.down_proj)
        return out + (self.down_proj_bias.sum(0) if self.has_bias else 0)


LAYOUTS = [(t, c, g, b) for t, c, g, b in itertools.product([False, True], repeat=4) if g or c]


def _setup(layout: tuple[bool, ...]) -> tuple[nn.Module, PrunableGroup, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(Experts(*layout))
    return model, PrunableGroup("0", (Slice("0", MOE_FFN, 1, ()),)), torch.randn(5, H)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: "".join("TCGB"[i] if x else "-" for i, x in enumerate(v)))
def test_cut_equals_masked_reference_and_growth_keeps_the_output(layout: tuple[bool, ...]) -> None:
    model, group, x = _setup(layout)
    m = model[0]
    assert experts_layout(m) is not None and group.width(model) == I
    keep, drop = torch.tensor([0, 2, 3, 6]), torch.tensor([1, 4, 5, 7])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model(x).pow(2).mean().backward()
    opt.step()  # momentum slots to follow the cut
    reference = copy.deepcopy(model)
    with torch.no_grad():
        d = reference[0].down_proj
        if m.is_transposed:
            d[:, drop, :] = 0.0
        else:
            d[:, :, drop] = 0.0
    dense = model(x).detach()
    apply_plan_(model, [group], {"0": keep}, [opt])
    with torch.no_grad():
        cut = model(x)
        torch.testing.assert_close(cut, reference(x), atol=1e-5, rtol=0)
    assert (cut - dense).abs().max() > 1e-3
    assert m.intermediate_dim == group.width(model) == 4
    assert all(p in opt.state for p in model.parameters())  # momentum slots followed the swap

    before = model(x).detach()
    apply_plan_(model, [group], {}, [opt], grow={"0": 4})
    assert group.width(model) == m.intermediate_dim == 8
    torch.testing.assert_close(model(x).detach(), before, atol=1e-5, rtol=0)
    model(x).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: "".join("TCGB"[i] if x else "-" for i, x in enumerate(v)))
def test_importance_sums_every_row_of_a_unit_over_all_experts(layout: tuple[bool, ...]) -> None:
    model, group, _ = _setup(layout)
    m = model[0]
    w = getattr(m, m.inp).detach()
    rows = w.transpose(1, 2) if m.is_transposed else w  # [E, s*I, H]
    down = m.down_proj.detach().transpose(1, 2) if m.is_transposed else m.down_proj.detach()  # [E, H, I]
    bias = getattr(m, f"{m.inp}_bias", None)
    expected = []
    for i in range(I):
        idx = ([i, i + I] if m.is_concatenated else [2 * i, 2 * i + 1]) if m.has_gate else [i]
        total = rows[:, idx].pow(2).sum() + down[:, :, i].pow(2).sum()
        if bias is not None:
            total = total + bias.detach()[:, idx].pow(2).sum()
        expected.append(total.sqrt())
    torch.testing.assert_close(MagnitudeImportance().scores(model, group), torch.stack(expected))
