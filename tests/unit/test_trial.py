"""Trial cuts: the jump a trial measures is the jump the real cut makes, and the trial leaves nothing behind."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from ctprune_lightning.controllers import build_controller
from ctprune_lightning.importance import build_importance
from ctprune_lightning.loop import ControlLoop, Plan
from ctprune_lightning.loop_planning import keep_key
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
    assert math.log(loop.cut_reading(net, keep, before, []) / before) == pytest.approx(real, abs=1e-6)
    loop.probe_loss, loop.world_size = read, 2  # several ranks: every rank reads (the reading is collective)
    assert loop.cut_reading(net, keep, before, []) == pytest.approx(read(net))


def _budget_loop(width: int, n_batches: int) -> tuple:
    """An MLP, its held-out batches, a budget loop reading them, and the loop's first observation."""
    net = nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))
    batches = [(torch.randn(width, 12), torch.randint(0, 4, (width,))) for _ in range(n_batches)]
    loop = ControlLoop(build_controller("lqr", 0.1, budget=0.01), build_importance("magnitude"), target=0.1,
                       probe_batches=1, loss_fn=loss_fn, min_width=2)
    loop.discover(net, batches[0][0])
    loop.add_probe(net, batches[0])
    loop.start_budget(total_steps=100, interval=10)
    loop.set_held_out(net, batches)
    return net, batches, loop, loop.observe(net, step=10, progress=0.1)


def test_a_jumps_error_is_the_spread_of_its_per_batch_changes() -> None:
    """The standard error of a cut's jump comes from its probe batches' own changes: it is what the sensor pools
    (a bug that read the spread of the losses, not of their changes, or forgot the √n, fails); the budget sensor's
    noise law learns from every trial read (sized by the controller's request)."""
    torch.manual_seed(1)
    net, batches, loop, obs = _budget_loop(width=32, n_batches=3)
    assert obs.sensed and len(loop._before_batches) == 3
    keep = {g.name: list(range(0, g.width(net), 2)) for g in loop.groups}
    with torch.no_grad():
        before = torch.stack([loss_fn(net, b) for b in batches])
        loop.trial_jump(net, keep)
        loop.apply_(net, Plan(step=10, widths={}, keep=keep), [])
        after = torch.stack([loss_fn(net, b) for b in batches])
    change = after - before
    expected = float(change.std() / math.sqrt(3) / before.mean())
    assert expected > 1e-4 and loop.trial_reads[keep_key(keep)][1] == pytest.approx(expected, rel=1e-5)
    assert loop.jump_error([1.0], [1.5], 1.0) is None  # one batch on one rank: no spread to read
    loop.world_size = 2  # two ranks, each with these two batches (the mean over ranks is the identity here)
    assert loop.jump_error([1.0, 1.0], [1.1, 1.3], 1.0) == pytest.approx(
        float(torch.tensor([0.1, 0.3, 0.1, 0.3]).std() / 2))


def test_sizing_feeds_the_noise_law_and_keeps_its_error_to_spare() -> None:
    """Every trial read teaches the budget sensor's noise law; the cut chosen fits ``max_jump`` with the law's
    error to spare, and the next larger one tried did not (a sizing without the margin picks a larger cut)."""
    torch.manual_seed(2)
    net, batches, loop, obs = _budget_loop(width=64, n_batches=2)
    jumps = {}
    for u in (0.2, 0.4, 0.6):
        keep = loop._keep(net, loop.widths(net), loop._plan_widths(net, obs, u))
        jumps[u] = loop.trial_jump(net, keep)
    max_jump = jumps[0.4]  # the bare trial of 0.4 fits this exactly: with a margin it must not
    loop.estimator.noise.reads.clear()
    loop.jump_rate = 1e-9  # a loop that has cut before: no trial of the smallest cut worth sizing first
    loop.trial_reads = {}
    sized = loop._size_by_trial(net, obs, 0.6, max_jump)
    assert loop.trials >= 2 and len(loop.estimator.noise.reads) == loop.trials
    keep = loop._keep(net, loop.widths(net), loop._plan_widths(net, obs, sized))
    chosen = loop.trial_reads[keep_key(keep)][0]
    jump = math.log(chosen / loop._before[0])
    assert 0 < sized < 0.4 and jump + loop.estimator.jump_error(sized, jump) <= max_jump


def test_no_trial_for_a_cut_that_cannot_repay_it() -> None:
    """A cut is sized by trial only if its FLOPs saved over the rest of the run repay the most its sizing can cost (8
    trial readings, and 3 reads of the confirm batches when kept): late in the run (5 of 100 steps left) a cut of
    0.2 cannot (it needs u >= 1.07), so no trial runs and the hold says why;
    early (90 steps left) the same request is tried and cut. A loop without the rule tries both (the ResNet budget
    run spent 2.7% of its fit on trials that found cuts of 0.007 of the compute)."""
    torch.manual_seed(3)
    net, _, loop, early = _budget_loop(width=32, n_batches=2)
    # each trial forwards the 2 held-out batches of 32 samples: 64 / (3 x 32) of a training step at this width
    assert loop.smallest_worth_trying(net, early) == pytest.approx(8 * (64 / 96) / 90, rel=1e-9)
    late = dataclasses.replace(early, step=95, progress=0.95)
    assert loop.smallest_worth_trying(net, late) == pytest.approx(8 * (64 / 96) / 5, rel=1e-9)
    read = loop.store.samples_read
    assert loop._size_by_trial(net, late, 0.2, max_jump=10.0) == 0.0
    assert loop.store.samples_read == read and loop.trials == 0 and loop.hold_reason.startswith("payback")
    assert loop.unrepaid  # the hold the backoff counts (note_quiet)
    assert loop._size_by_trial(net, early, 0.2, max_jump=10.0) == pytest.approx(0.2)
    assert loop.store.samples_read > read and loop.trials == 1
    loop.jump_rate = 10.0 / 0.01  # the last cut jumped 10 per 0.01: the cut that fits now is ~0.01 < 0.059
    assert loop._size_by_trial(net, early, 0.2, max_jump=10.0) == 0.0 and loop.hold_reason.startswith("payback")
    assert not loop.idle  # a loop that has cut keeps reading (its cuts' damage, a growth)
    loop.store.confirm = [(b[0][:16], b[1][:16]) for b in loop.store.held_out]  # the check's two reads count too
    assert loop.smallest_worth_trying(net, early) == pytest.approx((8 * 64 + 3 * 32) / 96 / 90, rel=1e-9)


def test_a_budget_that_can_cut_nothing_worth_its_sizing_stops_reading() -> None:
    """Before any cut, the smallest cut that repays its sizing and check is tried first: when even it does not fit,
    the loop holds after that one trial and reads no more (no probe, no trial, no importance tracking:
    ``saturated``), and says why; the state survives a checkpoint. The ResNet-20's budget runs paid 3.3% of their
    training FLOPs to size first cuts of 0.005-0.015 of the compute. Where it fits, the sizing goes on."""
    torch.manual_seed(3)
    net, _, loop, early = _budget_loop(width=32, n_batches=2)
    late = dataclasses.replace(early, step=80, progress=0.8)
    worth = loop.smallest_worth_trying(net, late)
    assert worth == pytest.approx(8 * (64 / 96) / 20, rel=1e-9)  # 0.27 of the compute repays 8 trials in 20 steps
    keep = loop._keep(net, loop.widths(net), loop._plan_widths(net, late, worth))
    jump = loop.trial_jump(net, keep)
    assert jump > 0
    read = loop.store.samples_read
    max_jump = 0.5 * jump  # the smallest cut worth sizing jumps twice the allowance; the request of 0.5 more
    assert loop._size_by_trial(net, late, 0.5, max_jump=max_jump) == 0.0
    assert loop.trials == 2 and loop.store.samples_read == read + 128  # two trials (0.5, 0.27): 2 batches of 32 each
    assert loop.hold_reason.startswith("payback") and loop.idle.startswith("payback") and loop.saturated
    assert loop.sensing_due(0) == loop.idle
    restored = _budget_loop(width=32, n_batches=2)[2]
    restored.load_state_dict(loop.state_dict())
    assert restored.idle == loop.idle and restored.sensing_due(0) == loop.idle
    _, _, fits, _ = _budget_loop(width=32, n_batches=2)  # where the whole request fits, it is cut after one trial
    assert fits._size_by_trial(net, late, 0.5, max_jump=10.0) == pytest.approx(0.5) and not fits.idle
    assert fits.trials == 1


def test_a_first_cut_scaled_below_its_price_by_the_check_is_not_made() -> None:
    """The check on the unselected batches may scale the first cut down below what repays its sizing: then it is not
    made and the loop reads no more (nothing cut, nothing to watch); at or above that price it is made."""
    for scale, expect_cut in ((0.5, False), (2.0, True)):
        torch.manual_seed(3)
        net, batches, loop, obs = _budget_loop(width=32, n_batches=2)
        loop.store.confirm = list(loop.store.held_out)
        made = scale * loop.smallest_worth_trying(net, obs)
        loop._size_by_trial = lambda model, o, u, max_jump: 0.4  # the sizing found 0.4

        def confirm(model, o, widths, new, size, max_jump, made=made):
            return new, loop._keep(model, widths, new), made  # "fits once scaled down to `made`"

        loop.confirm_cut = confirm
        plan = loop.decide(net, obs)
        assert bool(plan.keep) is expect_cut and bool(loop.idle) is not expect_cut, (made, loop.hold_reason)
        if not expect_cut:
            assert loop.hold_reason.startswith("payback: the first cut") and loop.saturated
            assert plan.widths == loop.widths(net)


def test_a_budget_whose_readings_find_nothing_to_do_reads_at_doubling_gaps() -> None:
    """Readings after a hold on a spent budget (or on a cut that cannot repay its sizing) changed nothing in the
    suite's runs: the n-th such reading in a row skips the next 2ⁿ − 1 intervals, and says so; a reading that acts
    (or holds for any other reason) reads every interval again; the backoff survives a checkpoint. A loop without
    it reads every interval (fails the first assertion); one that never resets keeps skipping after a cut. The
    importance is not tracked in the gaps."""
    net, _, loop, obs = _budget_loop(width=32, n_batches=2)  # start_budget(total_steps=100, interval=10)
    due = []
    for step in range(10, 100, 10):
        if not loop.sensing_due(step):
            due.append(step)
            loop.note_quiet(Plan(step=step, widths={}, quiet=True))
    assert due == [10, 30, 70]  # gaps of 2, 4, 8 intervals
    # no importance tracking in the gap (no cut can come there), nor before a reading after the end of training
    assert not loop.expect_reading(net, 130) and not loop.tracking(131)
    assert not loop.expect_reading(net, 140)  # its reading (150) comes after the end of training (100 steps)
    loop.estimator.total_steps = 200
    assert loop.expect_reading(net, 140) and loop.tracking(141)  # the interval before a reading that can come
    loop.estimator.total_steps = 100
    assert loop.sensing_due(80).startswith("backoff: 3 reading(s) in a row") and "step 150" in loop.sensing_due(80)
    restored = _budget_loop(width=32, n_batches=2)[2]
    restored.load_state_dict(loop.state_dict())
    assert restored.sensing_due(80) == loop.sensing_due(80)
    loop.note_quiet(Plan(step=150, widths={}, keep={"net.0": [0]}))  # a cut (or a growth): read every interval
    assert loop.reads.quiet == 0 and loop.sensing_due(160) == ""
    loop.note_quiet(Plan(step=160, widths={}, quiet=True))  # e.g. the payback hold (unrepaid)
    assert loop.sensing_due(170).startswith("backoff: 1 reading(s)") and loop.sensing_due(180) == ""
    loop.note_quiet(Plan(step=180, widths={}))  # any other hold (warm-up, rate limit, the check...) reads on
    assert loop.reads.quiet == 0 and loop.sensing_due(190) == ""

    def quiet(spent: bool, unrepaid: bool) -> bool:  # the plan carries the hold (rank 0's: every rank backs off alike)
        loop.controller.step = lambda o: (setattr(loop.controller, "spent", spent), 0.0 if spent else 0.2)[1]
        loop.controller.max_jump = 0.01
        loop._size_by_trial = lambda model, o, u, max_jump: (setattr(loop, "unrepaid", unrepaid), 0.0)[1]
        return loop.decide(net, obs).quiet

    assert quiet(spent=True, unrepaid=False) and quiet(spent=False, unrepaid=True)
    assert not quiet(spent=False, unrepaid=False)  # e.g. the trial found no cut that fits: no backoff
