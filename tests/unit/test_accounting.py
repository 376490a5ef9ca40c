"""FlopMeter: counts on a few samples extrapolated, and architectures predicted from verified groups: exactly,
or not at all."""

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


def mlp2(a: int, b: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, a), nn.ReLU(), nn.Linear(a, b), nn.ReLU(), nn.Linear(b, 4))


def _widths(groups, a: int, b: int) -> dict[str, int]:
    first, second = sorted(g.name for g in groups)
    return {first: a, second: b}


def _counting(monkeypatch) -> list[int]:
    from ctprune_lightning import accounting

    calls: list[int] = []
    real = accounting.count_training_flops
    monkeypatch.setattr(accounting, "count_training_flops", lambda *a: calls.append(1) or real(*a))
    return calls


def test_a_width_change_of_verified_groups_is_predicted_exactly_without_a_count(monkeypatch) -> None:
    """A group becomes verified when a count with its width changed equals the prediction; then its widths are
    predicted, per module as in total, equal to a real count (a bug that predicted unverified groups, or scaled a
    module twice, would fail here)."""
    from ctprune_lightning.surgery.discover import discover_groups

    batch = (torch.randn(32, 16), torch.randint(0, 4, (32,)))
    groups, _ = discover_groups(mlp2(64, 64), batch[0])
    meter = FlopMeter(ce)
    calls = _counting(monkeypatch)
    for (a, b), counted in (((64, 64), True), ((48, 64), True), ((32, 64), False), ((32, 48), True),
                            ((24, 40), False), ((40, 56), False)):  # the last one grows back: predicted too
        calls.clear()
        got = meter.measure(mlp2(a, b), batch, key=(a, b), widths=_widths(groups, a, b), groups=groups)
        assert (len(calls) > 0) is counted, (a, b)
        monkeypatch.undo()
        assert got == count_training_flops(mlp2(a, b), batch, ce), (a, b)
        calls = _counting(monkeypatch)
    assert meter.predictable and meter.counted == 3


def hidden_gram(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy plus a matmul outside every module whose cost is quadratic in the first hidden width."""
    w = model[0].weight
    return ce(model, batch) + (w @ w.T).trace() * 1e-4


def test_a_prediction_that_misses_a_count_makes_every_later_architecture_counted(monkeypatch) -> None:
    """The second group is verified first (the Gram matrix does not see it); the first group's change then misses
    the prediction, and from then on even a change of the verified group alone is counted, exactly."""
    from ctprune_lightning.surgery.discover import discover_groups

    batch = (torch.randn(32, 16), torch.randint(0, 4, (32,)))
    groups, _ = discover_groups(mlp2(64, 64), batch[0])
    meter = FlopMeter(hidden_gram)
    for a, b in ((64, 64), (64, 48), (48, 48)):
        meter.measure(mlp2(a, b), batch, key=(a, b), widths=_widths(groups, a, b), groups=groups)
    assert len(meter.verified) == 1 and not meter.predictable  # the Gram matrix's FLOPs do not follow the ratio
    calls = _counting(monkeypatch)
    got = meter.measure(mlp2(48, 32), batch, key=(48, 32), widths=_widths(groups, 48, 32), groups=groups)
    assert calls
    monkeypatch.undo()
    assert got == count_training_flops(mlp2(48, 32), batch, hidden_gram)


def test_the_first_count_on_8_samples_is_the_whole_batch_count_and_a_pairwise_loss_is_counted_whole(
        monkeypatch) -> None:
    """The dense count is the line through the counts at 2 and 4 samples where the count at 8 lies on it; a loss
    over pairs of samples (quadratic in the batch) is counted on the whole batch instead."""
    from ctprune_lightning import accounting

    batch = (torch.randn(64, 16), torch.randint(0, 4, (64,)))
    for loss, linear in ((ce, True), (pairwise, False)):
        sizes: list[int] = []
        real = accounting.count_training_flops
        monkeypatch.setattr(accounting, "count_training_flops", lambda m, b, f: sizes.append(len(b[0])) or real(m, b, f))
        got = FlopMeter(loss).measure(mlp(64), batch, key=0)
        monkeypatch.undo()
        assert got == count_training_flops(mlp(64), batch, loss)
        assert sizes == ([2, 4, 8] if linear else [2, 4, 8, 64])
