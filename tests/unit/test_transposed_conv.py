"""Transposed convolutions (a decoder's upsampling): their output channels (weight dim 1, bias) and input channels
(weight dim 0) are cut and grown like a convolution's. Before, every group touching one was refused."""

from __future__ import annotations

import torch
from arch_helpers import check_after_cut, snapshot, train_steps
from torch import nn

from ctprune_lightning.surgery import apply_plan_, discover_groups


def decoder() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(8, 6, 2, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 3, 1))


def test_a_cut_keeps_the_selected_channels_values_and_moments_and_the_output_of_the_rest() -> None:
    model = decoder()
    groups, skipped = discover_groups(model, torch.zeros(2, 1, 8, 8))
    kinds = {g.name: [(s.module, s.kind) for s in g.slices] for g in groups}
    assert kinds == {"0": [("0", "conv_out"), ("2", "tconv_in")],
                     "2": [("2", "tconv_out"), ("3", "norm"), ("5", "conv_in")]}, (kinds, skipped)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, (1, 8, 8))
    model.eval()
    plan = {"0": torch.tensor([0, 2, 3, 7]), "2": torch.tensor([1, 4])}
    with torch.no_grad():  # what the dropped channels feed, zeroed: the cut must not change the output
        model[2].weight[[1, 4, 5, 6]] = 0.0
        model[5].weight[:, [0, 2, 3, 5]] = 0.0
        x = torch.randn(3, 1, 8, 8)
        ref = model(x)
    before = snapshot(model, [opt], groups, plan)
    apply_plan_(model, groups, plan, [opt])
    assert (model[2].in_channels, model[2].out_channels) == (4, 2) and model[2].weight.shape == (4, 2, 2, 2)
    check_after_cut(model, [opt], before)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)
    train_steps(model, opt, (1, 8, 8), n=1)  # and it still trains


def test_growth_keeps_the_output_and_grouped_transposed_convolutions_are_refused() -> None:
    model = decoder().eval()
    groups, _ = discover_groups(model, torch.zeros(2, 1, 8, 8))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    apply_plan_(model, groups, {}, grow={"0": 2, "2": 3})
    assert model[2].weight.shape == (10, 9, 2, 2) and model[2].bias.shape == (9,) and model[5].in_channels == 9
    assert float(model[2].weight[:, 6:].abs().sum()) > 0  # new filters drawn, their consumers' weights zero
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)
    grouped = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2),
                            nn.ReLU(), nn.Conv2d(8, 3, 1))
    _, skipped = discover_groups(grouped, torch.zeros(2, 1, 8, 8))
    assert "grouped transposed convolutions are not supported" in dict(skipped)["0"]
