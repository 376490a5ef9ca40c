"""FlopMeter: later architectures counted on 2 and 4 samples and extrapolated, exactly, or not at all."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctprune_lightning.accounting import FlopMeter, count_training_flops


def ce(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def pairwise(model: nn.Module, batch) -> torch.Tensor:
    """A loss over all pairs of samples: its FLOPs grow with the square of the batch."""
    z = model(batch[0])
    return (z @ z.T).mean()


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 4))


def test_extrapolated_counts_equal_whole_batch_counts() -> None:
    batch = (torch.randn(32, 16), torch.randint(0, 4, (32,)))
    meter = FlopMeter(ce)
    meter.measure(mlp(64), batch, key=64)
    assert meter.batch_linear is True
    for width in (48, 24):  # counted on 2 + 4 samples now
        assert meter.measure(mlp(width), batch, key=width) == count_training_flops(mlp(width), batch, ce)


def test_a_loss_not_linear_in_the_batch_keeps_whole_batch_counts() -> None:
    batch = (torch.randn(32, 16), torch.randint(0, 4, (32,)))
    meter = FlopMeter(pairwise)
    meter.measure(mlp(64), batch, key=64)
    assert meter.batch_linear is False
    assert meter.measure(mlp(24), batch, key=24) == count_training_flops(mlp(24), batch, pairwise)


def test_overhead_parts_are_exclusive_and_add_up(monkeypatch) -> None:
    """A nested block is charged to its own part only; the outer part gets the rest; the total counts once."""
    from ctprune_lightning import accounting

    clock = iter([0.0, 1.0, 3.0, 4.0, 10.0, 11.0])  # outer 0..4 with a nested probe 1..3; a lone block 10..11
    monkeypatch.setattr(accounting.time, "perf_counter", lambda: next(clock))
    ledger = accounting.ComputeLedger()
    with ledger.overhead("control"):
        with ledger.overhead("probe"):
            pass
    with ledger.overhead("importance"):
        pass
    assert ledger.overhead_parts == {"probe": 2.0, "control": 2.0, "importance": 1.0}
    assert ledger.overhead_s == 5.0 and ledger.spent("probe", "importance") == 3.0
    restored = accounting.ComputeLedger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.overhead_parts == ledger.overhead_parts and restored.overhead_s == 5.0


def with_weight_decay_term(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy plus a product of two weights: a cost that is the same for any batch (the line's intercept)."""
    w = model[0].weight
    return ce(model, batch) + (w @ w.T).trace() * 1e-4


def test_a_count_through_zero_takes_one_pass_and_one_with_an_intercept_takes_two(monkeypatch) -> None:
    """Both stay exact: the proportional shortcut is taken only where the counts at 2 and 4 samples show no
    intercept (a bug that scaled the 2-sample count regardless would miss the weight product's FLOPs)."""
    from ctprune_lightning import accounting

    batch = (torch.randn(32, 16), torch.randint(0, 4, (32,)))
    for loss, passes, proportional in ((ce, 1, True), (with_weight_decay_term, 2, False)):
        meter = FlopMeter(loss)
        meter.measure(mlp(64), batch, key=64)
        assert meter.batch_linear is True and meter.proportional is proportional
        calls = []
        real = accounting.count_training_flops
        monkeypatch.setattr(accounting, "count_training_flops", lambda *a: calls.append(1) or real(*a))
        for width in (48, 24):
            calls.clear()
            assert meter.measure(mlp(width), batch, key=width) == real(mlp(width), batch, loss)
            assert len(calls) == passes
        monkeypatch.undo()
