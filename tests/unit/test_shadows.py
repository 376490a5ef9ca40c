"""Model copies other callbacks keep (weight averaging) follow the surgery: a cut keeps the surviving units'
averages, anything the cut cannot mirror (grown units) restarts from the live values."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ctprune_lightning.shadows import follow_, shadow_models
from ctprune_lightning.surgery import apply_plan_, discover_groups


def live_and_average() -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(0)
    live = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    average = copy.deepcopy(live)
    with torch.no_grad():  # an average is not the live model
        for p in average.parameters():
            p.add_(torch.randn_like(p))
        average[1].running_mean.add_(1.0)
    return live, average


def test_a_cut_is_mirrored_and_the_kept_units_keep_their_averages() -> None:
    live, average = live_and_average()
    groups, _ = discover_groups(live, torch.zeros(2, 6))
    before = {k: v.clone() for k, v in average.state_dict().items()}
    keep = {"0": torch.tensor([1, 2, 6])}
    apply_plan_(live, groups, keep)
    assert follow_(average, live, groups, keep) == []
    k = keep["0"]
    torch.testing.assert_close(average[0].weight, before["0.weight"][k], rtol=0, atol=0)
    torch.testing.assert_close(average[1].running_mean, before["1.running_mean"][k], rtol=0, atol=0)
    torch.testing.assert_close(average[3].weight, before["3.weight"][:, k], rtol=0, atol=0)
    assert average[0].out_features == 3 and average[3].in_features == 3


def test_grown_tensors_restart_from_the_live_values_and_the_rest_keep_their_averages() -> None:
    live, average = live_and_average()
    groups, _ = discover_groups(live, torch.zeros(2, 6))
    bias_before = average[3].bias.detach().clone()
    apply_plan_(live, groups, {}, grow={"0": 2})
    restarted = follow_(average, live, groups)
    assert set(restarted) >= {"0.weight", "0.bias", "3.weight"} and "3.bias" not in restarted
    for name, t in live.state_dict().items():
        assert average.state_dict()[name].shape == t.shape, name
        if name in restarted:
            torch.testing.assert_close(average.state_dict()[name], t, rtol=0, atol=0)
    torch.testing.assert_close(average[3].bias, bias_before, rtol=0, atol=0)


def test_the_averaging_callbacks_copies_are_found() -> None:
    live, _ = live_and_average()

    class EMA:  # Lightning's WeightAveraging: an AveragedModel
        _average_model = AveragedModel(live)

    class SWA:  # Lightning's StochasticWeightAveraging: a deep copy of the module
        _average_model = copy.deepcopy(live)

    class NotYet:  # before setup
        _average_model = None

    found = shadow_models([EMA(), SWA(), NotYet(), object()])
    assert found[0] is EMA._average_model.module and found[1] is SWA._average_model and len(found) == 2


def test_a_state_space_cut_is_not_mirrored_but_restarts_from_the_live_model() -> None:
    from ctprune_lightning.models.lru import LRUClassifier

    torch.manual_seed(0)
    live = LRUClassifier(input_dim=8, d_model=8, d_state=8, num_blocks=1, dropout=0.0)
    average = copy.deepcopy(live)
    with torch.no_grad():
        for p in average.parameters():
            p.mul_(0.9)  # another system: its own balanced truncation would keep other states in another basis
    groups, _ = discover_groups(live, torch.zeros(2, 5, 8))
    keep = {"blocks.0.lru": torch.arange(5)}
    apply_plan_(live, groups, keep)
    restarted = follow_(average, live, groups, keep)
    assert {"blocks.0.lru.nu_log", "blocks.0.lru.B_re", "blocks.0.lru.C_re"} <= set(restarted)
    shadow = average.state_dict()
    for name in restarted:  # the live model's basis, not a truncation of the copy's own
        torch.testing.assert_close(shadow[name], live.state_dict()[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(shadow["blocks.0.lru.D"], live.blocks[0].lru.D)  # not cut: keeps its average
