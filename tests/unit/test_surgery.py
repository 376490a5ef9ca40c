"""Surgery keeps training correct: optimizer continuity and function preservation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ctprune_lightning.surgery import apply_plan_, discover_groups, shrink_linear_out_features_, shrink_norm_
from ctprune_lightning.surgery.optim import optimizer_params


def mlp(norm: str | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    norms = {"layernorm": lambda n: nn.LayerNorm(n), "batchnorm": lambda n: nn.BatchNorm1d(n), None: lambda n: nn.Identity()}
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 32), norms[norm](32), nn.ReLU(),
                         nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int = 3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_discovers_hidden_groups_and_leaves_output_dense() -> None:
    groups, skipped = discover_groups(mlp("layernorm"), torch.zeros(2, 20))
    assert [g.name for g in groups] == ["1", "4"]
    assert [(s.module, s.kind) for s in groups[0].slices] == [("1", "linear_out"), ("2", "norm"), ("4", "linear_in")]
    assert ("6", "output layer (its features leave the model)") in skipped


def test_ignored_layers_and_min_width() -> None:
    groups, skipped = discover_groups(mlp(), torch.zeros(2, 20), ignored_layers=["4"], min_width=1)
    assert [g.name for g in groups] == []  # group "1" touches the ignored layer's inputs
    assert dict(skipped)["1"] == "coupled to ignored layer '4'"
    groups, skipped = discover_groups(mlp(), torch.zeros(2, 20), min_width=24)
    assert [g.name for g in groups] == ["1"]
    assert "too small" in dict(skipped)["4"]
    with pytest.raises(ValueError, match=r"`ignored_layers` \['head'\] names no module of Sequential"):
        discover_groups(mlp(), torch.zeros(2, 20), ignored_layers=["4", "head"])  # a typo protected nothing before
    from ctprune_lightning import ControlPruning

    with pytest.raises(TypeError, match="`ignored_layers` takes module names or types, got \\[3.5\\]"):
        ControlPruning(ignored_layers=[3.5])


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
@pytest.mark.parametrize("norm", [None, "layernorm", "batchnorm"])
def test_optimizer_continuity(opt_name: str, norm: str | None) -> None:
    model = mlp(norm)
    groups, _ = discover_groups(model, torch.zeros(2, 20))
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if opt_name == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_steps(model, opt)
    sched.step()
    keep1, keep4 = torch.tensor([0, 3, 5, 9, 31]), torch.tensor([1, 2, 20])
    before_w = model[1].weight.detach().clone()
    before_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[model[1].weight].items()}
    before_in_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[model[4].weight].items()}
    norm_state = {k: v.clone() for k, v in model[2].state_dict().items()}  # trained: non-trivial running stats
    apply_plan_(model, groups, {"1": keep1, "4": keep4}, [opt])

    live = list(model.parameters())
    in_opt = optimizer_params([opt])
    assert len(in_opt) == len(live)
    assert all(any(p is q for q in in_opt) for p in live), "a live parameter is missing from the optimizer"
    assert all(any(p is q for q in live) for p in in_opt), "a dead parameter is still in the optimizer"
    assert set(map(id, opt.state)) <= set(map(id, live))
    # surviving units keep their moments (the same values, sliced: exact, also for Adam's tiny second moments)
    state = opt.state[model[1].weight]
    assert set(state) == set(before_state) and (opt_name == "sgd" or "exp_avg_sq" in state)
    for key, value in before_state.items():
        if torch.is_tensor(value) and value.dim() > 0:
            torch.testing.assert_close(state[key], value[keep1], rtol=0, atol=0)
        else:
            assert state[key] == value  # AdamW's scalar step is kept
    for key, value in before_in_state.items():
        if torch.is_tensor(value) and value.dim() > 0:
            torch.testing.assert_close(opt.state[model[4].weight][key], value[keep4][:, keep1], rtol=0, atol=0)
    torch.testing.assert_close(model[1].weight, before_w[keep1], rtol=0, atol=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-2)  # scheduler position kept
    if norm == "batchnorm":
        assert not torch.allclose(norm_state["running_var"], torch.ones(32), atol=1e-3)  # not the 0/1 defaults
        for key, value in model[2].state_dict().items():
            expected = norm_state[key] if value.dim() == 0 else norm_state[key][keep1]  # num_batches_tracked kept
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    # the shrunk layers still learn
    w1, w4 = model[1].weight.detach().clone(), model[4].weight.detach().clone()
    train_steps(model, opt, n=1, seed=7)
    assert not torch.equal(w1, model[1].weight) and not torch.equal(w4, model[4].weight)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25e-2)


@pytest.mark.parametrize("norm", [None, "batchnorm"])
def test_removing_zero_contribution_units_preserves_function(norm: str | None) -> None:
    """(A LayerNorm over the pruned units is not function-preserving: its statistics span them.)"""
    model = mlp(norm)
    if norm == "batchnorm":  # non-trivial running statistics and affine parameters (defaults 0/1 would hide a
        with torch.no_grad():  # BatchNorm sliced with the wrong indices)
            for _ in range(5):
                model(3 * torch.randn(64, 20) + 1)
            nn.init.uniform_(model[2].weight, 0.5, 1.5)
            nn.init.uniform_(model[2].bias, -0.5, 0.5)
        assert float((model[2].running_var - 1).abs().min()) > 0.1 and float(model[2].running_mean.abs().max()) > 0.1
    model.eval()
    groups, _ = discover_groups(model, torch.zeros(2, 20))
    dead1, dead4 = torch.tensor([2, 7, 8, 30]), torch.tensor([0, 5, 23])
    with torch.no_grad():
        model[4].weight[:, dead1] = 0.0  # outgoing weights of units 2, 7, 8, 30 of layer 1
        model[6].weight[:, dead4] = 0.0
    x = torch.randn(64, 20)
    reference = model(x)
    keep = lambda n, dead: torch.tensor([i for i in range(n) if i not in set(dead.tolist())])  # noqa: E731
    apply_plan_(model, groups, {"1": keep(32, dead1), "4": keep(24, dead4)})
    assert model[1].out_features == 28 and model[4].in_features == 28 and model[6].in_features == 21
    torch.testing.assert_close(model(x), reference, atol=1e-6, rtol=0)


def test_frozen_parameter_stays_frozen() -> None:
    model = mlp()
    model[1].bias.requires_grad_(False)
    shrink_linear_out_features_(model[1], torch.tensor([0, 1, 2]))
    assert model[1].weight.requires_grad and not model[1].bias.requires_grad


def test_bad_plans_raise_and_change_nothing() -> None:
    model = mlp()
    groups, _ = discover_groups(model, torch.zeros(2, 20))
    with pytest.raises(KeyError, match=r"unknown groups \['nope'\].*known groups: \['1', '4'\]"):
        apply_plan_(model, groups, {"nope": torch.tensor([0])})
    assert model[1].out_features == 32
    with pytest.raises(ValueError, match=r"keep indices must lie in \[0, 32\)"):
        shrink_linear_out_features_(model[1], torch.tensor([0, 40]))
    assert model[1].out_features == 32 and model[1].weight.shape == (32, 20)
    with pytest.raises(TypeError, match="unsupported module ReLU"):
        shrink_norm_(nn.ReLU(), torch.tensor([0]))


def test_a_channels_last_conv_net_stays_channels_last_through_cuts_growth_and_a_rebuild() -> None:
    """A cut, a growth and a checkpoint rebuild keep every 4-D weight and its Adam moments in ``channels_last``
    (an ``index_select`` returns the default layout: each later step would convert, on a GPU off its fast
    kernels), with the numbers of the same surgery in the default layout."""
    from ctprune_lightning.surgery.arch import apply_arch_, capture_arch

    def convnet() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 8, 1),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    x = torch.randn(4, 3, 8, 8)
    dense = convnet()
    opt = torch.optim.Adam(dense.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        dense(x).square().mean().backward()
        opt.step()
    nets = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        net = copy.deepcopy(dense).to(memory_format=layout)
        net_opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        net_opt.load_state_dict(opt.state_dict())  # the moments in the default layout: the swap converts them
        groups, _ = discover_groups(net, x)
        torch.manual_seed(1)  # the grown units' initialisation
        apply_plan_(net, groups, {g.name: torch.arange(0, g.width(net), 2) for g in groups}, [net_opt],
                    grow={groups[0].name: 2})
        nets[layout] = (net, net_opt)
    net, opt = nets[torch.channels_last]
    weights = [p for p in net.parameters() if p.dim() == 4 and p.shape[2] * p.shape[3] > 1]  # 1x1: both layouts
    assert [tuple(p.shape[:2]) for p in weights] == [(10, 3), (12, 10)]
    for p in weights:
        assert p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        assert all(opt.state[p][k].is_contiguous(memory_format=torch.channels_last) for k in ("exp_avg", "exp_avg_sq"))
    reference, reference_opt = nets[torch.contiguous_format]
    for a, b in zip(net.parameters(), reference.parameters()):
        assert torch.equal(a, b) and all(torch.equal(opt.state[a][k], reference_opt.state[b][k]) for k in opt.state[a])
    rebuilt = convnet().to(memory_format=torch.channels_last)
    apply_arch_(rebuilt, capture_arch(net), "test")
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in rebuilt.parameters() if p.dim() == 4)


def test_torch_rmsnorm_is_cut_with_its_features_and_refuses_growth() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.RMSNorm(32), nn.ReLU(), nn.Linear(32, 5))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    groups, skipped = discover_groups(model, torch.zeros(2, 20))  # before: "a bare nn.Parameter '1.weight'"
    assert [(s.module, s.kind) for s in groups[0].slices] == [("0", "linear_out"), ("1", "norm"), ("3", "linear_in")]
    keep = torch.tensor([0, 4, 9, 31])
    x = torch.randn(3, 20)
    with torch.no_grad():  # the reference: the kept features normalised over themselves
        h = model[0](x)[:, keep]
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + torch.finfo(h.dtype).eps) * model[1].weight[keep]
        ref = model[3].weight[:, keep] @ torch.relu(normed).T
        weight = model[1].weight[keep].clone()
    apply_plan_(model, groups, {"0": keep})
    assert model[1].normalized_shape == (4,) and torch.equal(model[1].weight.detach(), weight)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.T + model[3].bias, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="RMSNorm normalises over the grown features"):
        apply_plan_(model, groups, {}, grow={"0": 2})
    assert model[0].out_features == 4 == model[3].in_features  # refused before anything was touched
