"""Optimizer state across a surgery, for optimizers whose state is not one tensor per element (issue: any optimizer).

Adafactor factors its second moment into a row and a column statistic (shapes ``(m, 1)`` and ``(1, n)`` for an
``(m, n)`` weight); LBFGS keeps its search direction and history as flat vectors over all its parameters in its first
parameter's slot. Before these rules, a cut left both stale and the next step raised a size mismatch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ctprune_lightning.surgery.optim import grow_parameter_, replace_parameter_, uncarried


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if isinstance(opt, torch.optim.LBFGS):  # re-evaluates the loss itself
        return float(opt.step(closure).detach())
    loss = closure()
    opt.step()
    return float(loss.detach())


def cut_hidden_(model: nn.Sequential, keep: torch.Tensor, opt: torch.optim.Optimizer, layer: int = 0) -> None:
    """Cut the units ``keep`` of the hidden layer ``model[layer]`` (0 or 2)."""
    replace_parameter_(model[layer], "weight", keep, 0, [opt])
    replace_parameter_(model[layer], "bias", keep, 0, [opt])
    replace_parameter_(model[layer + 2], "weight", keep, 1, [opt])


def test_adafactor_factored_moments_follow_the_cut_and_the_growth() -> None:
    model = net()
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    for s in range(3):
        step(model, opt, s)
    w0, w2 = model[0].weight, model[2].weight
    before0 = {k: v.clone() for k, v in opt.state[w0].items()}
    before2 = {k: v.clone() for k, v in opt.state[w2].items()}
    assert before0["row_var"].shape == (8, 1) and before2["col_var"].shape == (1, 8)
    keep = torch.tensor([0, 2, 3, 7])
    cut_hidden_(model, keep, opt)
    s0, s2 = opt.state[model[0].weight], opt.state[model[2].weight]
    # the statistic along the cut dimension is sliced; the one reduced over it is kept (an approximation: it was a
    # mean over all 8 units); the step count is kept
    torch.testing.assert_close(s0["row_var"], before0["row_var"][keep], rtol=0, atol=0)
    torch.testing.assert_close(s0["col_var"], before0["col_var"], rtol=0, atol=0)
    torch.testing.assert_close(s2["col_var"], before2["col_var"][:, keep], rtol=0, atol=0)
    torch.testing.assert_close(s2["row_var"], before2["row_var"], rtol=0, atol=0)
    assert s0["step"] == before0["step"]
    assert opt.state[model[0].bias]["variance"].shape == (4,)
    step(model, opt, 5)  # raised "size of tensor a (8) must match ... (4)" before
    grow_parameter_(model[0], "weight", torch.zeros(2, 6), 0, [opt])
    row = opt.state[model[0].weight]["row_var"]
    assert row.shape == (6, 1) and torch.equal(row[4:], torch.zeros(2, 1))


@pytest.mark.parametrize("first", [True, False], ids=["cut-first-param", "cut-later-param"])
def test_lbfgs_restarts_its_history_when_its_parameters_change_size(first: bool) -> None:
    model = net()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=5)
    for s in range(3):
        step(model, opt, s)
    flat = sum(p.numel() for p in model.parameters())
    assert opt.state[model[0].weight]["d"].numel() == flat and opt._numel_cache == flat
    with pytest.warns(UserWarning, match="LBFGS's optimizer state 'd' .* restarts"):
        # the second hidden layer: LBFGS's history sits in the first parameter's slot, which that cut leaves alone
        cut_hidden_(model, torch.tensor([1, 4, 5]), opt, layer=0 if first else 2)
    assert all(v.numel() != flat for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    assert opt._numel_cache is None
    losses = [step(model, opt, 7) for _ in range(4)]  # raised a size mismatch of the flat vectors before
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_state_no_rule_can_cut_restarts_that_slot_only() -> None:
    w, other = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))
    layer = nn.Module()
    layer.weight = w
    opt = torch.optim.SGD([w, other], lr=0.1, momentum=0.9)
    opt.state[w] = {"momentum_buffer": torch.ones(4, 3), "precond": torch.eye(4), "step": torch.tensor([3.0])}
    opt.state[other] = {"momentum_buffer": torch.ones(5)}
    assert uncarried(opt.state[w], w) == "precond"
    assert uncarried({"row": torch.ones(4, 1), "col": torch.ones(1, 3), "step": torch.tensor([3.0])}, w) is None
    assert uncarried({"history": [torch.ones(12)]}, w) == "history"
    with pytest.warns(UserWarning, match="'precond' is of a shape the parameter's cut cannot follow"):
        new = replace_parameter_(layer, "weight", torch.tensor([0, 2]), 0, [opt])
    assert new not in opt.state and torch.equal(opt.state[other]["momentum_buffer"], torch.ones(5))
    with warnings.catch_warnings():  # a carried state does not warn
        warnings.simplefilter("error")
        opt.state[new] = {"momentum_buffer": torch.ones(2, 3), "step": torch.tensor([3.0])}
        newer = replace_parameter_(layer, "weight", torch.tensor([1]), 0, [opt])
    assert opt.state[newer]["momentum_buffer"].shape == (1, 3) and opt.state[newer]["step"].shape == (1,)


def test_a_one_unit_parameter_grows_its_moments() -> None:
    bias = nn.Parameter(torch.ones(1))
    layer = nn.Module()
    layer.bias = bias
    opt = torch.optim.Adam([bias], lr=0.1)
    bias.grad = torch.ones(1)
    opt.step()
    grown = grow_parameter_(layer, "bias", torch.zeros(2), 0, [opt])
    state = opt.state[grown]
    assert state["exp_avg"].shape == (3,) and state["exp_avg_sq"].shape == (3,) and state["step"].dim() == 0
    bigger = grow_parameter_(layer, "bias", torch.zeros(1), 0, [opt])
    assert opt.state[bigger]["exp_avg"].shape == (4,) and opt.state[bigger]["step"].dim() == 0


def test_transformers_adafactor_row_and_column_moments_follow_the_cut_even_on_a_square_weight() -> None:
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))  # 2: square
    opt = Adafactor(model.parameters(), lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9)
    for s in range(3):
        step(model, opt, s)
    w2 = model[2].weight
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[w2].items()}
    assert before["exp_avg_sq_row"].shape == (8,) == before["exp_avg_sq_col"].shape  # the shape cannot tell them
    keep = torch.tensor([0, 3, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # carried, not restarted
        cut_hidden_(model, keep, opt, layer=0)  # model[2]'s inputs: its columns
    state = opt.state[model[2].weight]
    torch.testing.assert_close(state["exp_avg_sq_col"], before["exp_avg_sq_col"][keep], rtol=0, atol=0)
    torch.testing.assert_close(state["exp_avg_sq_row"], before["exp_avg_sq_row"], rtol=0, atol=0)  # over the columns
    torch.testing.assert_close(state["exp_avg"], before["exp_avg"][:, keep], rtol=0, atol=0)
    assert state["step"] == before["step"]
    losses = [step(model, opt, 9) for _ in range(3)]  # raised a size mismatch before
    assert losses[-1] < losses[0]


def grow_hidden_(model: nn.Sequential, n: int, opt: torch.optim.Optimizer) -> None:
    """Append ``n`` units to the first hidden layer (fixed incoming weights, zero outgoing: the function is kept)."""
    g = torch.Generator().manual_seed(7)
    grow_parameter_(model[0], "weight", 0.1 * torch.randn(n, model[0].in_features, generator=g), 0, [opt])
    grow_parameter_(model[0], "bias", torch.zeros(n), 0, [opt])
    grow_parameter_(model[2], "weight", torch.zeros(model[2].out_features, n), 1, [opt])


OPTIMIZERS = {
    "adamw": lambda params, **kw: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **kw),
    "adam": lambda params, **kw: torch.optim.Adam(params, lr=1e-2, **kw),
    "sgd": lambda params, **kw: torch.optim.SGD(params, lr=1e-2, momentum=0.9, **kw),
    "adagrad": lambda params, **kw: torch.optim.Adagrad(params, lr=1e-2, **kw),
}


@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}], ids=["foreach", "fused"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_foreach_and_fused_kernels_take_the_cut_and_grown_state_as_the_for_loop_does(name: str, impl: dict) -> None:
    """torch's multi-tensor and fused kernels (CPU too) read the state as lists of tensors of one dtype and device; a
    sliced or grown moment, or a ``step`` left behind, would raise there or diverge from the per-parameter loop."""
    def train(**kw) -> list[torch.Tensor]:
        model = net()
        opt = OPTIMIZERS[name](model.parameters(), **kw)
        for i in range(3):
            step(model, opt, i)
        cut_hidden_(model, torch.tensor([0, 2, 3, 5, 7]), opt)
        for i in range(3):
            step(model, opt, 10 + i)
        grow_hidden_(model, 4, opt)
        for i in range(3):
            step(model, opt, 20 + i)
        return [p.detach().clone() for p in model.parameters()]

    reference, other = train(foreach=False), train(**impl)
    assert [p.shape for p in other] == [p.shape for p in reference] and reference[0].shape == (9, 6)
    for a, b in zip(reference, other):  # the fused kernels round differently: float32 ulps, not a wrong update
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
