"""Trial cuts: the jump a trial measures is the jump the real cut makes, and the trial leaves nothing behind."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ctprune_lightning.controllers import build_controller
from ctprune_lightning.importance import build_importance
from ctprune_lightning.loop import ControlLoop, Plan
from ctprune_lightning.trial import can_trial


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_the_trial_jump_is_the_real_cuts_jump_and_the_trial_leaves_the_model_as_it_was(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                            nn.Linear(32, 4))
        batch = (torch.randn(64, 12), torch.randint(0, 4, (64,)))
    else:
        net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
        batch = (torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,)))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(3):  # some optimizer state to keep
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step()
    loop = ControlLoop(build_controller("lqr", 0.2, budget=0.01), build_importance("magnitude"), target=0.2,
                       probe_batches=1, loss_fn=loss_fn, min_width=2)
    loop.discover(net, batch[0])
    loop.add_probe(net, batch)
    loop.start_budget(total_steps=100, interval=10)
    assert can_trial(net)
    params = {n: p for n, p in net.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in params.items()}
    x = batch[0]
    net.eval()
    before_out = net(x).detach()
    net.train()
    keep = {g.name: list(range(0, g.width(net), 2)) for g in loop.groups}  # every other unit
    before = loop.probe_loss(net)
    trial = loop.trial_jump(net, keep)
    # nothing changed: the same Parameter objects, optimizer state and outputs
    assert {n: p for n, p in net.named_parameters()} == params
    assert all(torch.equal(opt.state[p][k], state[n][k]) for n, p in params.items() for k in state[n])
    net.eval()
    assert torch.equal(net(x).detach(), before_out)
    net.train()
    # the real cut, on the same probe batches: the same jump
    loop.apply_(net, Plan(step=0, widths={}, keep=keep), [opt])
    real = math.log(loop.probe_loss(net) / before)
    assert abs(trial) > 1e-3 and trial == pytest.approx(real, abs=1e-6)
    # so the cut's own reading reuses its trial's (one probe reading fewer per cut), on one rank only
    read = loop.probe_loss
    loop.probe_loss = lambda model: pytest.fail("read the probe again")  # type: ignore[method-assign]
    assert math.log(loop.cut_reading(net, keep) / before) == pytest.approx(real, abs=1e-6)
    loop.probe_loss, loop.world_size = read, 2  # several ranks: every rank reads (the reading is collective)
    assert loop.cut_reading(net, keep) == pytest.approx(read(net))
