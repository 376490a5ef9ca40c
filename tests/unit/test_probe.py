"""The probe: BatchNorm read with batch statistics (running statistics untouched), and held-out batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctprune_lightning.controllers import build_controller
from ctprune_lightning.importance import build_importance
from ctprune_lightning.loop import ControlLoop
from ctprune_lightning.probe import batch_statistics


def test_batch_statistics_normalises_with_the_batch_and_leaves_running_stats_and_modes_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2),
                        nn.BatchNorm1d(2, momentum=None))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = 3 * torch.randn(16, 3, 6, 6) + 1  # far from the (0, 1) running statistics
    with torch.no_grad(), batch_statistics(net):
        h = net[1](net[0](x))
        y = net(x)
    assert h.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # the batch's own mean, not the running one
    assert y.mean(dim=0).abs().max() < 1e-5
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # running stats and num_batches_tracked untouched
    assert not any(m.training for m in net.modules())
    assert net[1].momentum == 0.1 and net[5].momentum is None
    with torch.no_grad():
        assert net[1](net[0](x)).mean(dim=(0, 2, 3)).abs().max() > 0.1  # outside the context: running stats


def test_the_budget_loop_probes_with_batch_statistics_and_the_plain_loop_does_not() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    batch = (3 * torch.randn(32, 8) + 2, torch.randint(0, 3, (32,)))

    def loss_fn(model, b):
        return nn.functional.cross_entropy(model(b[0]), b[1])

    readings = {}
    for name, ctl in (("plain", build_controller("lqr", 0.5)),
                      ("budget", build_controller("lqr", 0.5, budget=0.01))):
        loop = ControlLoop(ctl, build_importance("magnitude"), target=0.5, probe_batches=1, loss_fn=loss_fn)
        loop.discover(net, batch[0])
        loop.add_probe(net, batch)
        loop.start_budget(total_steps=100, interval=10)
        readings[name] = (loop.store.batch_stats, loop.probe_loss(net))
    with torch.no_grad():
        net.eval()
        eval_loss = float(loss_fn(net, batch))
        net.train()
        train_loss = float(loss_fn(net, batch))
        net.eval()
    assert readings["plain"] == (False, eval_loss)
    assert readings["budget"][0] and abs(readings["budget"][1] - train_loss) < 1e-6
    assert abs(eval_loss - train_loss) > 0.01  # the two readings differ on this batch


def test_a_held_out_batch_the_loss_cannot_read_is_refused_and_nothing_is_kept() -> None:
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def loss_fn(model, b):
        return nn.functional.cross_entropy(model(b[0]), b[1])

    loop = ControlLoop(build_controller("lqr", 0.5), build_importance("magnitude"), target=0.5, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="fails on a validation batch.*IndexError"):
        loop.set_held_out(net, [(torch.randn(4, 8),)])  # no labels
    assert loop.held_out == [] and net.training
    with pytest.raises(ValueError, match="no batches"):
        loop.set_held_out(net, [])


def test_step_error_reads_classifiers_and_token_models_and_refuses_other_batches() -> None:
    from ctprune_lightning.probe import step_error

    torch.manual_seed(0)
    clf = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    assert float(step_error(clf, (x, y))) == pytest.approx(float((clf(x).argmax(1) != y).float().mean()))
    tok = nn.Sequential(nn.Embedding(7, 5), nn.Linear(5, 7))  # (batch, time) tokens -> (batch, time, vocab)
    ids, nxt = torch.randint(0, 7, (2, 6)), torch.randint(0, 7, (2, 6))
    assert float(step_error(tok, (ids, nxt))) == pytest.approx(float((tok(ids).argmax(-1) != nxt).float().mean()))

    class Custom(nn.Linear):
        def compute_error(self, batch):
            return torch.tensor(0.25)

    assert float(step_error(Custom(4, 3), {"anything": 1})) == 0.25
    with pytest.raises(TypeError, match="compute_error"):
        step_error(clf, (x, torch.randn(10)))  # float targets: not labels
