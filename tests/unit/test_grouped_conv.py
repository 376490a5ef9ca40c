"""Grouped convolutions (1 < groups, not depthwise): cut and grown uniformly per group, every coupled slice
(producer, BatchNorm, consumer) through a tiled slice whose channel c is unit c % (channels / groups)."""

from __future__ import annotations

import pytest
import torch
from arch_helpers import check_after_cut, snapshot
from torch import nn

from ctprune_lightning.surgery import apply_plan_, discover_groups
from ctprune_lightning.surgery.handlers.conv import tile_units


def _net(g: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, groups=g), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


def _trained(g: int) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    model = _net(g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):  # non-trivial BN statistics and Adam moments
        opt.zero_grad()
        model(torch.randn(4, 3, 6, 6)).square().mean().backward()
        opt.step()
    return model.eval(), opt


@pytest.mark.parametrize("g", [2, 4])
def test_discovery_finds_both_sides_of_a_grouped_convolution(g: int) -> None:
    model = _net(g)
    groups, skipped = discover_groups(model, torch.zeros(2, 3, 6, 6))
    by = {x.name: [(s.module, s.kind) for s in x.slices] for x in groups}
    assert by["0"] == [("0", f"tiled{g}:conv_out"), ("1", f"tiled{g}:norm"), ("3", "gconv_in")]
    assert by["3"] == [("3", "gconv_out"), ("4", f"tiled{g}:norm"), ("6", f"tiled{g}:conv_in")]
    widths = {x.name: x.width(model) for x in groups}
    assert widths["0"] == 8 // g and widths["3"] == 16 // g
    assert not any("grouped" in why for _, why in skipped), skipped


@pytest.mark.parametrize("g", [2, 4])
@pytest.mark.parametrize("side", ["out", "in"])
def test_cut_equals_masked_reference_and_slices_the_optimizer_state(g: int, side: str) -> None:
    model, opt = _trained(g)
    groups, _ = discover_groups(model, torch.zeros(2, 3, 6, 6))
    name = "3" if side == "out" else "0"
    group = next(x for x in groups if x.name == name)
    w = group.width(model)
    keep = torch.tensor([0, w - 1]) if w > 2 else torch.tensor([1])
    dead = torch.tensor([u for u in range(w) if u not in keep.tolist()])
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():  # the reference: the dead units' outgoing weights zeroed
        if side == "out":
            model[6].weight[:, tile_units(dead, g, w)] = 0.0
        else:
            model[3].weight[:, dead] = 0.0
        ref = model(x)
    before = snapshot(model, [opt], groups, {name: keep})
    apply_plan_(model, groups, {name: keep}, [opt])
    check_after_cut(model, [opt], before)
    if side == "out":
        assert (model[3].out_channels, model[4].num_features, model[6].in_channels) == (g * keep.numel(),) * 3
        assert model[3].weight.shape[0] == g * keep.numel() and model[3].in_channels == 8
    else:
        assert (model[0].out_channels, model[1].num_features, model[3].in_channels) == (g * keep.numel(),) * 3
        assert model[3].weight.shape[1] == keep.numel() and model[3].out_channels == 16
    assert model[3].groups == g
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
    out = model(x)  # still trains
    out.sum().backward()
    opt.step()


@pytest.mark.parametrize("g", [2, 4])
def test_growth_per_group_keeps_the_outputs(g: int) -> None:
    model, opt = _trained(g)
    groups, _ = discover_groups(model, torch.zeros(2, 3, 6, 6))
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    old_w = model[3].weight.detach().clone()
    apply_plan_(model, groups, {}, [opt], grow={"0": 2, "3": 1})
    assert (model[0].out_channels, model[3].in_channels, model[3].weight.shape[1]) == (8 + 2 * g, 8 + 2 * g, 8 // g + 2)
    assert (model[3].out_channels, model[4].num_features, model[6].in_channels) == (16 + g,) * 3
    w = 16 // g  # the old filters of group j now sit at j*(w+1) .. j*(w+1)+w-1, their old inputs first
    for j in range(g):
        torch.testing.assert_close(model[3].weight[j * (w + 1): j * (w + 1) + w, : 8 // g].detach(),
                                   old_w[j * w: (j + 1) * w], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
    model.train()
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert model[3].weight.grad is not None


def test_grouped_convolutions_of_different_groups_on_one_width_are_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 8, 1, groups=4),
                          nn.Flatten(), nn.Linear(8 * 16, 3))
    groups, skipped = discover_groups(model, torch.zeros(2, 3, 4, 4))
    assert "different groups [2, 4]" in dict(skipped)["1"]
    assert {x.name for x in groups} == {"0", "2"}
    apply_plan_(model, groups, {"0": torch.tensor([1, 3]), "2": torch.tensor([0])})
    assert (model[0].out_channels, model[1].in_channels, model[2].out_channels, model[4].in_features) == (4, 4, 4, 64)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 3)
