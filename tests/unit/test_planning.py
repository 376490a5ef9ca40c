"""From a compute cut to widths and kept units."""

from __future__ import annotations

import torch
from torch import nn

from ctprune_lightning.accounting import ComputeLedger, count_training_flops
from ctprune_lightning.planning import plan_widths, predict_flops, select_units
from ctprune_lightning.surgery import apply_plan_, discover_groups


def ce(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_flop_prediction_matches_measurement_after_surgery() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))
    batch = (torch.randn(8, 30), torch.randint(0, 4, (8,)))
    groups, _ = discover_groups(model, batch[0])
    total, per_module = count_training_flops(model, batch, ce)
    # forward 2*B*in*out per Linear, backward 2x that except the first layer (no input grad)
    expected = 2 * 8 * (30 * 64 + 64 * 48 + 48 * 4) * 3 - 2 * 8 * 30 * 64
    assert total == expected
    new = {"0": 16, "2": 40}
    predicted = predict_flops({"0": 64, "2": 48}, new, per_module, total, groups)
    apply_plan_(model, groups, {"0": torch.arange(16), "2": torch.arange(40)})
    assert predicted == count_training_flops(model, batch, ce)[0]


def test_plan_widths_reaches_but_never_undercuts_the_target() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    batch = (torch.randn(4, 100), torch.randint(0, 10, (4,)))
    groups, _ = discover_groups(model, batch[0])
    total, per_module = count_training_flops(model, batch, ce)
    widths = {"0": 256, "2": 256}
    for frac in (0.9, 0.5, 0.3):
        new = plan_widths(widths, per_module, total, groups, frac * total, min_width=8, round_to=8)
        got = predict_flops(widths, new, per_module, total, groups)
        assert got >= frac * total
        assert all(w % 8 == 0 for w in new.values())
        # one more step of 8 on every group would undercut: the plan is the deepest allowed cut
        deeper = {k: v - 8 for k, v in new.items()}
        assert predict_flops(widths, deeper, per_module, total, groups) < frac * total
    floor = plan_widths(widths, per_module, total, groups, 0.0, min_width=8, round_to=8)
    assert floor == {"0": 8, "2": 8}


def test_select_units_keeps_the_highest_scores_sorted() -> None:
    scores = torch.tensor([0.1, 5.0, 3.0, 3.0, -1.0, 4.0])
    assert select_units(scores, 3).tolist() == [1, 2, 5]
    assert select_units(scores, 4).tolist() == [1, 2, 3, 5]


def test_ledger_counts_saved_fraction() -> None:
    ledger = ComputeLedger(dense_step_flops=100)
    for f in (100, 50, 50, 20):
        ledger.add_batch(f)
    ledger.add_batch(20, scale=0.5)
    assert ledger.train_flops == 230 and ledger.dense_train_flops == 450
    assert abs(ledger.saved - (1 - 230 / 450)) < 1e-12
    clone = ComputeLedger()
    clone.load_state_dict(ledger.state_dict())
    assert clone.saved == ledger.saved


def test_plan_rounds_to_the_nearest_step_but_respects_the_floor() -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    batch = (torch.randn(4, 64), torch.randint(0, 10, (4,)))
    groups, _ = discover_groups(model, batch[0])
    total, per_module = count_training_flops(model, batch, ce)
    widths = {"0": 256, "2": 256}
    target = 0.9 * total
    under = plan_widths(widths, per_module, total, groups, target, round_to=8)
    nearest = plan_widths(widths, per_module, total, groups, target, round_to=8, floor_flops=0.5 * total)
    got_under = predict_flops(widths, under, per_module, total, groups)
    got_nearest = predict_flops(widths, nearest, per_module, total, groups)
    assert got_under >= target
    assert abs(got_nearest - target) <= abs(got_under - target)
    assert nearest != under  # here the step below the target is closer
    # with the floor at the target, nothing below it is allowed
    assert plan_widths(widths, per_module, total, groups, target, round_to=8, floor_flops=target) == under


def test_small_requests_still_cut_when_groups_differ_in_width() -> None:
    """One rounding step of one group at a time: no deadlock at a quantisation boundary."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16),
                          nn.ReLU(), nn.Linear(16, 10))
    batch = (torch.randn(4, 64), torch.randint(0, 10, (4,)))
    groups, _ = discover_groups(model, batch[0])
    dense = {g.name: g.width(model) for g in groups}
    total, per_module = count_training_flops(model, batch, ce)
    dense_total, floor = total, 0.3 * total
    for _ in range(40):  # a proportional controller: half the remaining error, at most 10% of dense, per interval
        widths = {g.name: g.width(model) for g in groups}
        u = min(0.1 * dense_total, 0.5 * (total - floor))
        new = plan_widths(widths, per_module, total, groups, max(floor, total - u), min_width=4,
                          round_to=4, floor_flops=floor, reference=dense)
        apply_plan_(model, groups, {n: torch.arange(w) for n, w in new.items() if w != widths[n]})
        total, per_module = count_training_flops(model, batch, ce)
    widths = {g.name: g.width(model) for g in groups}
    assert floor <= total < floor + 0.05 * dense_total
    assert all(w % 4 == 0 for w in widths.values()) and widths["4"] < 16  # the narrow group was cut too
