"""ReadSchedule and sizing_price: when a quality budget reads, and what a sizing must repay."""

from __future__ import annotations

import math

import pytest

from ctprune_lightning.reading import CONFIRM_READS, SIZING_TRIALS, ReadSchedule, sizing_price


def test_due_says_why_not_idle_first_then_the_backoff_then_the_sensing_budget() -> None:
    reads = ReadSchedule(sense_budget=0.03)
    assert reads.due(10, sensing_flops=3.0, train_flops=100.0) == ""  # 3% of the training so far: within
    assert reads.due(10, sensing_flops=3.1, train_flops=100.0).startswith("sensing budget: the probe's forwards so "
                                                                          "far are 3.1% of the training FLOPs > 3.0%")
    assert reads.due(10, sensing_flops=50.0, train_flops=100.0, capped=False) == ""  # the first interval reads
    reads.note(10, quiet=True, interval=10)
    assert reads.due(15, 0.0, 100.0).startswith("backoff: 1 reading(s) in a row") and reads.due(29, 0.0, 100.0)
    assert reads.due(30, 0.0, 100.0) == ""
    reads.go_idle("payback: nothing repays its sizing")
    assert reads.due(1000, 0.0, 100.0) == "payback: nothing repays its sizing; no further reading"
    assert ReadSchedule(None).due(10, sensing_flops=1e9, train_flops=1.0) == ""  # no sensing budget


def test_next_due_is_the_first_control_step_due_allows() -> None:
    """``next_due`` (where the importance stops being tracked) in closed form equals scanning ``due`` interval by
    interval with the training FLOPs growing, through the sensing budget, the backoff and both; None when idle or
    when the training adds nothing to repay a spent sensing budget. Fails on an off-by-one in either bound."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        reads = ReadSchedule(sense_budget=rng.choice([None, 0.03, 0.1]))
        interval, step = rng.choice([1, 10, 20]), 10 * rng.randrange(1, 50)
        if rng.random() < 0.5:
            reads.note(step - rng.choice([0, interval]), quiet=True, interval=interval)
            reads.quiet = rng.randrange(1, 4)
            reads.read_after = step + interval * rng.randrange(0, 9)
        sensing, train, per = rng.uniform(0, 20), rng.uniform(1, 100), rng.uniform(0.5, 5)
        scan = next(step + k * interval for k in range(1, 10_000)
                    if reads.due(step + k * interval, sensing, train + k * per) == "")
        assert reads.next_due(step, interval, sensing, train, per) == scan
    spent = ReadSchedule(sense_budget=0.03)
    assert spent.next_due(10, 10, sensing_flops=5.0, train_flops=100.0, interval_flops=0.0) is None
    spent.go_idle("payback")
    assert spent.next_due(10, 10, sensing_flops=0.0, train_flops=100.0, interval_flops=1.0) is None


def test_the_backoff_doubles_its_gap_and_any_other_outcome_resets_it() -> None:
    reads = ReadSchedule()
    due = []
    for step in range(0, 200, 10):
        if not reads.due(step, 0.0, 1.0):
            due.append(step)
            reads.note(step, quiet=step < 100, interval=10)
    assert due[:4] == [0, 20, 60, 140] and due[4:] == [150, 160, 170, 180, 190]  # gaps 2, 4, 8; then read on
    restored = ReadSchedule()
    reads.note(200, quiet=True, interval=10)
    restored.load_state_dict(reads.state_dict())
    assert restored.state_dict() == reads.state_dict() == {"idle": "", "quiet": 1, "read_after": 220}


def test_sizing_price_is_the_cut_whose_saving_over_the_rest_repays_the_sizing_and_its_check() -> None:
    # 8 readings of 2 units and 3 reads of 6 units = 34 units; 100 steps left at 10 units a dense step
    assert (SIZING_TRIALS, CONFIRM_READS) == (8, 3)
    assert sizing_price(2.0, 6.0, dense_step_flops=10.0, remaining_steps=100) == pytest.approx(34 / 1000)
    assert sizing_price(2.0, 6.0, dense_step_flops=10.0, remaining_steps=0) == math.inf
    assert sizing_price(2.0, 6.0, dense_step_flops=0.0, remaining_steps=10) == math.inf


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, True, "3%"])
def test_a_sense_budget_outside_0_1_is_refused_naming_the_value(bad: object) -> None:
    with pytest.raises(ValueError, match=r"sense_budget must be null or a share .* got " + repr(bad).replace(".", r"\.")):
        ReadSchedule(bad)  # type: ignore[arg-type]
