"""Importance criteria return one meaningful score per unit and follow surgery."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctprune_lightning.importance import Importance, build_importance
from ctprune_lightning.surgery import apply_plan_, discover_groups


def setup_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    groups, _ = discover_groups(model, torch.zeros(2, 10))
    return model, groups


def test_magnitude_is_the_norm_over_all_coupled_slices() -> None:
    model, groups = setup_model()
    imp = build_importance("magnitude")
    imp.attach(model, groups)
    s = imp.scores(model, groups[0])
    expected = (model[0].weight.pow(2).sum(1) + model[0].bias.pow(2) + model[2].weight.pow(2).sum(0)).sqrt()
    torch.testing.assert_close(s, expected.detach())


def _step(model, opt, imp, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    imp.before_optimizer_step(model)
    opt.step()
    imp.after_optimizer_step(model)


@pytest.mark.parametrize("name", ["taylor", "trajectory"])
def test_dead_units_score_zero_and_state_follows_surgery(name: str) -> None:
    model, groups = setup_model()
    with torch.no_grad():  # units 0..3 are dead: no input weights, no bias, no outgoing weights
        model[0].weight[:4] = 0
        model[0].bias[:4] = 0
        model[2].weight[:, :4] = 0
    imp = build_importance(name)
    imp.attach(model, groups)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        _step(model, opt, imp, torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g))
    s = imp.scores(model, groups[0])
    assert s.shape == (16,)
    assert torch.all(s[:4] == 0) and torch.all(s[4:].abs() > 0)
    if name == "trajectory":  # plain SGD: -g·Δθ = lr·|g|² >= 0, summed per unit
        assert torch.all(s >= 0)
    keep = torch.tensor([4, 5, 6, 7, 8])
    before = s[keep]
    apply_plan_(model, groups, {"0": keep}, [opt])
    imp.on_surgery({"0": keep})
    after = imp.scores(model, groups[0])
    assert after.shape == (5,)
    if name == "taylor":
        torch.testing.assert_close(after, before)
    else:
        assert torch.all(after == 0)  # the path integral restarts at each event
    _step(model, opt, imp, torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g))
    restored = build_importance(name)
    restored.load_state_dict(imp.state_dict())
    torch.testing.assert_close(restored.scores(model, groups[0]), imp.scores(model, groups[0]))


def test_trajectory_ranks_the_unit_that_reduced_the_loss() -> None:
    """Only unit 1 may move; it alone reduces the loss, so it alone scores."""
    model, groups = setup_model()
    imp = build_importance("trajectory")
    imp.attach(model, groups)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            p.grad[...] = 0 if p.dim() == 1 else p.grad
        model[0].weight.grad[torch.arange(16) != 1] = 0
        model[2].weight.grad.zero_()
        imp.before_optimizer_step(model)
        opt.step()
        imp.after_optimizer_step(model)
    s = imp.scores(model, groups[0])
    assert s.argmax().item() == 1 and s[1] > 0
    assert torch.count_nonzero(s) == 1


def test_unknown_importance_names_the_choices() -> None:
    with pytest.raises(ValueError, match="Unknown importance 'foo'. Choose one of: magnitude, taylor, trajectory"):
        build_importance("foo")


def test_taylor_is_the_ema_of_the_absolute_unit_sum_of_w_times_g() -> None:
    """Hand-computed: per hidden unit j, s_j = |Σ w·g| over its row of layer 0, its bias and its column of layer 2.

    The values are chosen so the per-element terms cancel: Σ|w·g| would give [5.5, 7, 4] (another ranking).
    """
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    groups, _ = discover_groups(model, torch.zeros(2, 2))
    assert [g.name for g in groups] == ["0"]
    values = {  # parameter: (value, gradient)
        model[0].weight: ([[1.0, 2.0], [1.0, -1.0], [0.5, 0.5]], [[1.0, -1.0], [2.0, 2.0], [1.0, 1.0]]),
        model[0].bias: ([1.0, -1.0, 2.0], [0.5, 1.0, -1.0]),
        model[2].weight: ([[1.0, 1.0, 1.0], [2.0, -1.0, 0.0]], [[1.0, 1.0, 1.0], [0.5, 1.0, 2.0]]),
        model[2].bias: ([3.0, 3.0], [1.0, 1.0]),  # the output layer's bias belongs to no unit
    }
    with torch.no_grad():
        for p, (value, grad) in values.items():
            p.copy_(torch.tensor(value))
            p.grad = torch.tensor(grad)
    # unit 0: (1 - 2) + 0.5 + (1 + 1) = 1.5; unit 1: (2 - 2) - 1 + (1 - 1) = -1; unit 2: (0.5 + 0.5) - 2 + (1 + 0) = 0
    per_step = torch.tensor([1.5, 1.0, 0.0])
    imp = build_importance("taylor", beta=0.75)
    imp.attach(model, groups)
    imp.before_optimizer_step(model)
    torch.testing.assert_close(imp.scores(model, groups[0]), 0.25 * per_step, rtol=0, atol=1e-7)
    imp.before_optimizer_step(model)  # EMA: 0.75 * previous + 0.25 * this step
    torch.testing.assert_close(imp.scores(model, groups[0]), torch.tensor([0.65625, 0.4375, 0.0]), rtol=0, atol=1e-7)


def trajectory_setup() -> tuple[nn.Module, list, Importance, torch.optim.Optimizer]:
    """The small model, its groups, an attached trajectory importance and an Adam of lr 0.05."""
    model, groups = setup_model()
    imp = build_importance("trajectory")
    imp.attach(model, groups)
    return model, groups, imp, torch.optim.Adam(model.parameters(), lr=0.05)


def trajectory_step(model: nn.Module, opt: torch.optim.Optimizer, imp: Importance, gen: torch.Generator,
                    after_hook: bool = True, clip: bool = False) -> torch.Tensor:
    """One step with the importance's hooks around the update (``clip``: the gradient clipped in place between
    them, as Lightning does); returns the step's exact −g·Δθ per unit of group "0", g as the update used it."""
    tracked = (model[0].weight, model[0].bias, model[2].weight)
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(16, 10, generator=gen)),
                                torch.randint(0, 3, (16,), generator=gen)).backward()
    before = [p.detach().clone() for p in tracked]
    imp.before_optimizer_step(model)
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
    opt.step()
    if after_hook:
        imp.after_optimizer_step(model)
    w0, b0, w2 = (-(p.grad * (p.detach() - b)) for p, b in zip(tracked, before))
    return w0.sum(1) + b0 + w2.sum(0)


def test_trajectory_is_the_exact_path_integral_and_follows_new_parameters() -> None:
    """Σ_t −g·Δθ per unit, checked against an explicit sum; the per-step slice cache must follow a surgery and
    a parameter that is swapped for a new object (a re-wrap or a restore) — a stale cache would read the old
    tensors and the sums would differ."""
    model, groups, imp, opt = trajectory_setup()
    gen = torch.Generator().manual_seed(1)
    expected = sum(trajectory_step(model, opt, imp, gen) for _ in range(3))
    torch.testing.assert_close(imp.scores(model, groups[0]), expected, rtol=1e-5, atol=1e-7)
    keep = torch.arange(0, 16, 2)
    apply_plan_(model, groups, {"0": keep}, [opt])
    imp.on_surgery({"0": keep})
    # the integral restarts at each surgery, on the new (narrower) parameters
    expected = sum(trajectory_step(model, opt, imp, gen) for _ in range(2))
    torch.testing.assert_close(imp.scores(model, groups[0]), expected, rtol=1e-5, atol=1e-7)
    # a new Parameter object behind the module's back (no surgery call): the cache must notice it
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    imp.acc["0"].zero_()
    expected = sum(trajectory_step(model, opt, imp, gen) for _ in range(2))
    torch.testing.assert_close(imp.scores(model, groups[0]), expected, rtol=1e-5, atol=1e-7)


def test_trajectory_closes_a_step_whose_after_hook_never_came_and_saves_its_pending_sums() -> None:
    """Two optimizer steps in a row with no after-hook between them (two optimizers, a manual loop): the first
    step's −g·Δθ is closed at the next before-hook, so the integral stays exact (a snapshot overwritten by the
    second step would lose it). The per-element sums not yet reduced to units are part of ``state_dict``: a
    resumed copy scores the same."""
    model, groups, imp, opt = trajectory_setup()
    gen = torch.Generator().manual_seed(2)
    expected = sum(trajectory_step(model, opt, imp, gen, after_hook=hook) for hook in (False, True, True))
    resumed = build_importance("trajectory")
    resumed.attach(model, groups)
    resumed.load_state_dict(imp.state_dict())
    torch.testing.assert_close(imp.scores(model, groups[0]), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(resumed.scores(model, groups[0]), expected, rtol=1e-5, atol=1e-7)


def test_trajectory_reads_the_gradient_the_optimizer_used_when_it_is_clipped_after_the_hook() -> None:
    """Lightning clips the gradient in place after the callbacks' ``on_before_optimizer_step``. The integral must
    be −g·Δθ with the clipped g the update used (not g_before·θ_old − g_clipped·θ_new, which is off by the clip
    times θ): with clipping from the first step it copies θ throughout; where clipping starts later, the fused
    steps since the last read are dropped and the rest is exact. Without clipping the fused path runs."""
    for clip_from, mode in ((None, "fused"), (1, "copy"), (3, "copy")):
        model, groups, imp, opt = trajectory_setup()
        gen = torch.Generator().manual_seed(3)
        expected = torch.zeros(16)
        for k in range(1, 6):
            term = trajectory_step(model, opt, imp, gen, clip=clip_from is not None and k >= clip_from)
            if clip_from is None or clip_from == 1 or k > clip_from:  # what survives: see the docstring
                expected.add_(term)
        assert imp._mode == mode, (clip_from, imp._mode)
        torch.testing.assert_close(imp.scores(model, groups[0]), expected, rtol=1e-5, atol=1e-7)
