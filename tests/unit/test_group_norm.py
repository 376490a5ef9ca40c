"""GroupNorm (diffusion U-Nets, GN ResNets, detection heads): a GroupNorm of several groups is cut and grown in whole
groups, every slice coupled to it too; one of a single group is cut per channel and refuses to grow. Before, every
group touching a GroupNorm was left dense ("which cannot be shrunk yet")."""

from __future__ import annotations

import pytest
import torch
from arch_helpers import check_after_cut, snapshot, train_steps
from torch import nn

from ctprune_lightning.surgery import apply_plan_, discover_groups
from ctprune_lightning.surgery.arch import apply_arch_, capture_arch
from ctprune_lightning.surgery.shrink import shrink_norm_


def gn_net(groups: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(groups, 32), nn.SiLU(),
                         nn.Conv2d(32, 16, 3, padding=1), nn.GroupNorm(1, 16), nn.SiLU(), nn.Conv2d(16, 4, 1))


def test_a_groupnorm_is_cut_in_whole_groups_and_the_kept_groups_compute_as_before() -> None:
    """Units of the first group are the GroupNorm's 8 groups of 4 channels (kind ``blocked4:...``); cutting 4 of them
    keeps each kept group's channels, values and moments, and (the dropped groups' consumers zeroed) the output.
    Fails if a unit is not a whole group, the GroupNorm's ``num_groups`` does not follow, or a kept group's
    normalisation changes."""
    model = gn_net()
    groups, skipped = discover_groups(model, torch.zeros(2, 3, 8, 8))
    kinds = {g.name: [(s.module, s.kind) for s in g.slices] for g in groups}
    assert kinds == {"0": [("0", "blocked4:conv_out"), ("1", "blocked4:norm"), ("3", "blocked4:conv_in")],
                     "3": [("3", "conv_out"), ("4", "norm"), ("6", "conv_in")]}, (kinds, skipped)
    assert groups[0].width(model) == 8 and groups[1].width(model) == 16
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, (3, 8, 8))
    model.eval()
    keep = torch.tensor([1, 2, 5, 7])
    channels = (keep[:, None] * 4 + torch.arange(4)).flatten()
    dead = torch.tensor([c for c in range(32) if c not in channels.tolist()])
    with torch.no_grad():
        model[3].weight[:, dead] = 0.0  # what the dropped groups feed: the cut must not change the output
        x = torch.randn(3, 3, 8, 8)
        ref = model(x)
    before = snapshot(model, [opt], groups, {"0": keep})
    apply_plan_(model, groups, {"0": keep}, [opt])
    assert (model[1].num_groups, model[1].num_channels, model[0].out_channels, model[3].in_channels) == (4, 16, 16, 16)
    check_after_cut(model, [opt], before)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    train_steps(model, opt, (3, 8, 8), n=1)  # and it still trains
    rebuilt = gn_net()  # a checkpoint's architecture rebuilds the GroupNorm's groups too
    apply_arch_(rebuilt, capture_arch(model), "test")
    rebuilt.load_state_dict(model.state_dict())
    assert (rebuilt[1].num_groups, rebuilt[1].num_channels) == (4, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x), atol=0, rtol=0)


def test_growth_adds_whole_groups_and_keeps_the_output_a_single_group_refuses() -> None:
    model = gn_net().eval()
    groups, _ = discover_groups(model, torch.zeros(2, 3, 8, 8))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    apply_plan_(model, groups, {}, grow={"0": 2})
    assert (model[1].num_groups, model[1].num_channels, model[3].in_channels) == (10, 40, 40)
    assert float(model[0].weight[32:].abs().sum()) > 0  # new filters drawn; their consumers' weights zero
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="GroupNorm normalises over the grown features"):
        apply_plan_(model, groups, {}, grow={"3": 2})  # GroupNorm(1, 16): every channel in one group
    assert model[4].num_channels == 16 == model[3].out_channels  # refused before anything was touched


def test_a_single_group_is_cut_per_channel_and_other_couplings_are_refused_with_a_reason() -> None:
    model = gn_net()
    groups, _ = discover_groups(model, torch.zeros(2, 3, 8, 8))
    apply_plan_(model, groups, {"3": torch.tensor([0, 3, 4, 9, 15])})
    assert (model[4].num_groups, model[4].num_channels, model[6].in_channels) == (1, 5, 5)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="cut in whole groups; keep must be whole groups of 4 consecutive channels"):
        shrink_norm_(nn.GroupNorm(8, 32), torch.tensor([0, 1, 2, 5]))
    per_channel = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(16, 16), nn.ReLU(), nn.Conv2d(16, 2, 1))
    groups, _ = discover_groups(per_channel, torch.zeros(2, 3, 8, 8))  # one channel per group: per channel
    assert groups[0].width(per_channel) == 16
    apply_plan_(per_channel, groups, {"0": torch.tensor([2, 5, 11])})
    assert (per_channel[1].num_groups, per_channel[1].num_channels) == (3, 3)
    grouped = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                            nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(16, 2, 1))
    _, skipped = discover_groups(grouped, torch.zeros(2, 3, 8, 8))
    assert "coupled to GroupNorm ['1'] and a grouped convolution" in dict(skipped)["0"], skipped
