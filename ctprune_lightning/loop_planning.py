"""The planning side of the control step: what the model costs now, and which units a cut or a growth moves.

:class:`LoopPlanning` is the half of :class:`~ctprune_lightning.loop.ControlLoop` that turns a controller's
action into widths and kept units: the FLOPs meter and the cost model (the compute reading), the planner
(:func:`~ctprune_lightning.planning.plan_widths`, on the cost frontier when a cost model is measured), the
never-slower-than-dense rule, trial sizing (:func:`~ctprune_lightning.controllers.sizing.size_cut` over
:func:`~ctprune_lightning.trial.read_cut`), growth planning and the SSM rank events. The state it reads
(groups, limits, ledger, meter, probe store, importance, history) is the loop's own::

    loop.compute(model)                              # fraction of dense FLOPs (or modelled time) per step
    widths = loop._plan_widths(model, obs, u=0.1)    # remove about 0.1 of the dense compute
"""

from __future__ import annotations

import contextlib
import math
from contextlib import AbstractContextManager
from typing import Any, Callable, Iterator, Mapping, Sequence

from torch import Tensor, nn

from .accounting import ComputeLedger, FlopMeter
from .controllers import Controller, Observation
from .controllers.sizing import size_cut
from .cost import CostModel, measure_cost
from .importance import Importance
from .importance.hankel import HankelImportance, plan_lru_ranks
from .planning import flop_predictor, group_floor, plan_growth, plan_widths, select_units
from .probe import batch_size
from .probe_store import LossFn, ProbeStore
from .reading import SIZING_TRIALS, ReadSchedule, likely_cut, sizing_price
from .sensing import DamageSensor
from .surgery.groups import PrunableGroup, arch_spec
from .trial import can_trial, read_cut

__all__ = ["CONFIRM_BATCHES", "CONFIRM_Z", "LoopPlanning"]

#: held-out batches, beyond the probe's, a sized cut is read on before it is made (``ControlPruning``'s default)
CONFIRM_BATCHES = 6
#: a sized cut is not made when its read there exceeds its allowance by more than this many of that read's errors
CONFIRM_Z = 2.0


def keep_key(keep: Mapping[str, Sequence[int]]) -> tuple:
    """A hashable key of a cut: its groups' kept units."""
    return tuple(sorted((name, tuple(int(i) for i in idx)) for name, idx in keep.items()))


class LoopPlanning:
    """Compute readings and plans for :class:`~ctprune_lightning.loop.ControlLoop` (see the module docstring)."""

    QUANTUM = 0.005  # the finest cut (fraction of dense compute) the trial sizing resolves

    controller: Controller
    importance: Importance
    hankel: HankelImportance
    groups: list[PrunableGroup]
    dense_widths: dict[str, int]
    history: list[dict[str, Any]]
    target: float
    min_width: int
    round_to: Any
    store: ProbeStore
    ledger: ComputeLedger
    meter: FlopMeter
    loss_fn: LossFn
    flop_view: Callable[[nn.Module], AbstractContextManager[Any]]
    cost: str
    cost_model: CostModel | None
    cost_kwargs: dict[str, Any] | None
    cost_context: Callable[[], AbstractContextManager[Any]]
    saturated: bool
    reads: ReadSchedule  # when a quality budget reads: the sensing budget, the backoff, idle
    ref_batch: int
    world_size: int
    trial_reads: dict[tuple, tuple[float, float | None]]  # this interval's trial readings and their errors, by cut
    _before_batches: list[float]  # this rank's per-batch probe values of the reading in ``_before``
    estimator: DamageSensor | None
    last_u: float
    trials: int
    hold_reason: str
    unrepaid: bool
    jump_rate: float | None
    _before: tuple[float, float] | None

    def widths(self, model: nn.Module) -> dict[str, int]:
        return {g.name: g.width(model) for g in self.groups}

    probe = property(lambda self: self.store.train)

    @contextlib.contextmanager
    def sensing(self, model: nn.Module, part: str) -> Iterator[None]:
        """Charge the block's readings to the ledger: its wall-clock to ``part``, its forwards to ``sensing_flops``
        (a forward costs a third of a training step's FLOPs per sample: backward is twice the forward)."""
        read = self.store.samples_read
        with self.ledger.overhead(part):
            yield
        samples = self.store.samples_read - read
        if samples and self.ledger.dense_step_flops:
            self.ledger.sensing_flops += samples * self.flops(model)[0] / (3.0 * self.ref_batch)

    def probe_loss(self, model: nn.Module) -> float:
        """The probe reading (:meth:`ProbeStore.loss`): loss or error rate, held-out batches when kept."""
        with self.sensing(model, "probe"):
            return self.store.loss(model)

    def train_loss(self, model: nn.Module) -> float:
        """The training channel's reading on the stored training batches (:meth:`ProbeStore.train_loss`)."""
        with self.sensing(model, "probe"):
            return self.store.train_loss(model)

    def measure_cost(self, model: nn.Module) -> CostModel:
        """The cost model of ``model`` on the first probe batch (:func:`~ctprune_lightning.cost.measure_cost`)."""
        if not can_trial(model):
            raise ValueError("ControlPruning: a cost model cuts the model for a moment; sharded (FSDP2) parameters "
                             "cannot be cut that way: use cost='flops' and no cost model there")
        shares = self.flop_shares(model)
        with self.cost_context(), self.ledger.overhead("cost_model"):
            return measure_cost(model, self.groups, self.store.on(model, self.probe[0]), self.loss_fn,
                                min_width=self.min_width, round_to=self.round_to,
                                **{"shares": shares, **self.cost_kwargs})

    def flop_shares(self, model: nn.Module) -> dict[str, float]:
        """Each group's share of the step's FLOPs: what cutting it alone to nothing would remove (the planner's
        first-order prediction). A cost model assumes that share of the step time where its budget did not time
        the group's narrower widths; before, the whole step, compounded over the groups: the ResNet-20's model
        (1 of 12 groups timed in 2 s) predicted 58% of the time saved where the run saved 6%."""
        total, per_module = self.flops(model)
        widths = self.widths(model)
        predict = flop_predictor(widths, per_module, total, self.groups)
        return {g.name: min(1.0, max(0.0, 1.0 - predict({**widths, g.name: 0}) / total)) if total else 1.0
                for g in self.groups}

    def flops(self, model: nn.Module, part: str = "flops") -> tuple[int, dict[str, int]]:
        """(FLOPs per step, per module) of ``model``'s architecture, counted once per architecture (charged to
        the ledger's ``part``: the dense count is set-up, every later one a recount)."""
        key = arch_spec(model, self.groups)
        if key not in self.meter.cache:
            with self.flop_view(model), self.ledger.overhead(part):
                self.meter.measure(model, self.store.on(model, self.probe[0]), key, self.widths(model), self.groups)
        return self.meter.cache[key]

    def compute(self, model: nn.Module) -> float:
        """The controller's compute reading: FLOPs ÷ dense, or the modelled time ÷ dense with ``cost="time"``."""
        if self.cost == "time" and self.cost_model is not None:
            return self.cost_model.fraction(self.widths(model))
        return self.flops(model)[0] / self.ledger.dense_step_flops

    def _planner(self, model: nn.Module) -> tuple[float, dict[str, int], float, dict[str, Any]]:
        """(now, per-module FLOPs, dense, extra planner arguments) in the unit of the compute reading."""
        total, per_module = self.flops(model)
        cm = self.cost_model
        if self.cost == "time" and cm is not None:
            return cm.step_time(self.widths(model)), per_module, cm.dense_time, {"cost": cm, "predict": cm.step_time}
        return total, per_module, self.ledger.dense_step_flops, {"cost": cm}

    def update_saturation(self, model: nn.Module) -> None:
        """Saturated when even the deepest cut the controller may still ask for changes no width: down to the floor,
        or with a compute target down to the target plus the controller's ``settle`` (inside it, it never cuts); and
        a quality budget gone :attr:`idle`."""
        total, per_module, dense, extra = self._planner(model)
        ctl = self.controller
        floor = (self.target + (ctl.settle if ctl.budget is None else 0.0)) * dense
        widths = self.widths(model)
        self.saturated = bool(self.reads.idle) or widths == plan_widths(widths, per_module, total, self.groups, floor,
                                                                  self.min_width, self.round_to, floor_flops=floor,
                                                                  **extra)

    def plan_growth(self, model: nn.Module, request: float) -> dict[str, int]:
        """``{group: units to add}`` giving back about ``request`` of the dense compute from the cuts of
        :attr:`history`, the last one first (:func:`~ctprune_lightning.planning.plan_growth`)."""
        refused = {g.name for g in self.groups if g.grow_refusal(model)}
        return plan_growth(self.widths(model), self.history, self.dense_widths, refused, request, self.round_to)

    def _plan_widths(self, model: nn.Module, obs: Observation, u: float) -> dict[str, int]:
        total, per_module, dense, extra = self._planner(model)
        return plan_widths(self.widths(model), per_module, total, self.groups, (obs.compute - u) * dense,
                           self.min_width, self.round_to, floor_flops=self.target * dense,
                           reference=self.dense_widths, **extra)

    def _never_slower(self, widths: dict[str, int], new: dict[str, int]) -> dict[str, int]:
        """``new``, unless the cost model's modelled time per step of it is not below dense: then no cut (the
        reason is kept for the trace row)."""
        cm = self.cost_model
        if cm is None or new == widths:
            return new
        modelled = cm.fraction(new)
        if modelled < 1.0:
            return new
        self.hold_reason = self.hold_reason or (f"cost: the planned widths' modelled time per step is {modelled:.3f} "
                                                "of dense (not below dense); no cut")
        return dict(widths)

    def _keep(self, model: nn.Module, widths: Mapping[str, int], new: Mapping[str, int]) -> dict[str, list[int]]:
        return {g.name: select_units(self._scores(model, g), new[g.name]).tolist()
                for g in self.groups if new[g.name] != widths[g.name]}

    def _size_by_trial(self, model: nn.Module, obs: Observation, u: float, max_jump: float) -> float:
        """The largest cut ``<= u`` whose trial jump fits ``max_jump`` with its own error to spare (the loop's reason
        says when none)."""
        widths = self.widths(model)
        seen: dict[tuple[int, ...], float] = {}

        def trial(v: float) -> float:
            keep = self._keep(model, widths, self._plan_widths(model, obs, v))
            key = tuple(len(keep.get(g.name, ())) or widths[g.name] for g in self.groups)
            if key not in seen:
                seen[key] = self.trial_jump(model, keep) if keep else 0.0
                if keep and self.estimator is not None:
                    self.estimator.add_jump_read(v, seen[key], self.trial_reads[keep_key(keep)][1])
            # a trial must fit with its error to spare: the largest cut whose trial fits reads low by about that
            # much (the winner's curse of sizing by a noisy measurement); the law's error, not the trial's own
            # (one degree of freedom on two batches, and selected on too)
            margin = self.estimator.jump_error(v, seen[key]) if self.estimator is not None else 0.0
            return seen[key] + margin

        if not can_trial(model):  # FSDP2 shards: no trial; the last measured jump rate scales the cut
            rate = self.jump_rate
            return u if rate is None else min(u, max_jump / max(rate, 1e-9))
        worth = self.smallest_worth_trying(model, obs)
        likely = likely_cut(u, max_jump, self.jump_rate)
        if likely < worth:  # the sizing would cost more than the cut it finds can save: no trial, no cut
            self.unrepaid = True
            self.hold_reason = (f"payback: a cut that fits (u≈{likely:.4f}) saves less over the rest of the run than "
                                f"sizing and checking it cost (it would need u ≥ {worth:.4f})")
            return 0.0
        if self.first_cut and trial(u) > max_jump and trial(worth) > max_jump:
            # the request does not fit, nor does the smallest cut that repays its sizing, so no cut in between does
            # (the jump grows with the cut)
            self.trials = len(seen)
            self.go_idle(f"payback: the smallest cut that repays sizing and checking it (u={worth:.4f}) jumps more "
                         f"than allowed ({max_jump:.4g})")
            return 0.0
        sized = size_cut(trial, u, max_jump, quantum=self.QUANTUM, max_trials=SIZING_TRIALS)
        self.trials = len(seen)
        if sized > 0 and self._plan_widths(model, obs, sized) == widths:
            self.hold_reason = f"the cut that fits (u={sized:.4f}) is below one planner step"
            return 0.0
        if sized <= 0:
            self.hold_reason = (f"trial: the smallest cut tried jumps more than allowed ({max_jump:.4g})")
        return sized

    @property
    def first_cut(self) -> bool:
        """Whether no cut has been made yet (no jump measured, no history)."""
        return self.jump_rate is None and not self.history

    def go_idle(self, reason: str) -> None:
        """Hold now and read no more (:attr:`idle`): called where no cut has been made and none that repays its
        sizing fits; no later reading changes that (nothing cut: no damage; the allowance only shrinks, as a cut's
        persistent share grows towards the end of the run; the price of a sizing only grows, with fewer steps
        left to repay it)."""
        self.hold_reason = reason
        self.reads.go_idle(reason)
        self.saturated = True

    def checked_cut(self, model: nn.Module, obs: Observation, widths: dict[str, int], new: dict[str, int],
                    size: float, max_jump: float) -> tuple[dict[str, int], dict[str, list[int]], float]:
        """:meth:`confirm_cut`, except that a first cut it scales down below the price of its sizing
        (:meth:`smallest_worth_trying`) is not made, and the loop goes :meth:`go_idle`."""
        new, keep, size = self.confirm_cut(model, obs, widths, new, size, max_jump)
        if keep and self.first_cut and size < (worth := self.smallest_worth_trying(model, obs)):
            self.go_idle(f"payback: the first cut that fits the unselected batches too (u={size:.4f}) saves less "
                         f"than sizing and checking it cost (u ≥ {worth:.4f}); not made")
            return dict(widths), {}, size
        return new, keep, size

    def confirm_cut(self, model: nn.Module, obs: Observation, widths: dict[str, int], new: dict[str, int],
                    size: float, max_jump: float) -> tuple[dict[str, int], dict[str, list[int]], float]:
        """(widths, kept units, size) of the cut to make after reading the sized cut ``new`` on the confirm batches
        (held out, not the ones the trial selected it on). It is made when its jump there fits ``max_jump`` within
        :data:`CONFIRM_Z` of its error (the noise law's, scaled to those batches); else the cut scaled down to fit
        that read (a cut's jump is about proportional to its size) is read there once and made if it fits; else
        no cut, and :attr:`hold_reason` says why. The probe's 2 batches can miss a cut's damage altogether (sparse
        per-sample damage): the sizing then takes the largest cut they read as free
        (``experiments/results/suite/not_kept_2026-12-06.md``: 4 of 22 cuts read 0.03–0.11 lower there)."""
        keep = self._keep(model, widths, new)
        with self.sensing(model, "confirm"):
            before = self.store.confirm_loss(model)
            jump = self._confirm_jump(model, keep, before)
            if self._fits_confirm(size, jump, max_jump):
                return new, keep, size
            reads = f"u={size:.4f} reads {jump:+.4f}"
            smaller = math.floor(size * 0.98 * max_jump / jump / self.QUANTUM) * self.QUANTUM if jump > 0 else 0.0
            if smaller > 0:
                scaled = self._never_slower(widths, self._plan_widths(model, obs, smaller))
                scaled_keep = self._keep(model, widths, scaled)
                if scaled_keep and scaled != new:
                    again = self._confirm_jump(model, scaled_keep, before)
                    if self._fits_confirm(smaller, again, max_jump):
                        return scaled, scaled_keep, smaller
                    reads += f", u={smaller:.4f} reads {again:+.4f}"
        self.hold_reason = (f"confirm: on {len(self.store.confirm)} held-out batches the trial did not select on, "
                            f"{reads}: over the allowance {max_jump:.4g} + {CONFIRM_Z:g}σ")
        return dict(widths), {}, size

    def _confirm_jump(self, model: nn.Module, keep: Mapping[str, Sequence[int]], before: float) -> float:
        """The log-jump of cutting to ``keep`` on the confirm batches, from their reading ``before`` (nothing cut)."""
        after = read_cut(model, self.groups, keep, self.store.confirm_loss)
        return math.log(max(after, 1e-12) / max(before, 1e-12))

    def _fits_confirm(self, size: float, jump: float, max_jump: float) -> bool:
        """Whether a cut of ``size`` reading ``jump`` on the confirm batches fits ``max_jump`` within
        :data:`CONFIRM_Z` of that read's error: the noise law's 2-batch error scaled to the confirm batches."""
        probe, confirm = len(self.store.held_out), len(self.store.confirm)  # kept with held-out probe batches only
        law = self.estimator.jump_error(size, jump) if self.estimator is not None else 0.0
        return jump <= max_jump + CONFIRM_Z * law * math.sqrt(probe / confirm)

    def smallest_worth_trying(self, model: nn.Module, obs: Observation) -> float:
        """The smallest cut (fraction of the dense compute) whose training FLOPs saved over the rest of the run
        repay the most its sizing and check can cost (:func:`~ctprune_lightning.reading.sizing_price`: trial readings
        of the probe batches and reads of the confirm batches, each a forward at the current width), so the sensing
        never costs more than the cuts it sizes save (late in a run, a small cut does not)."""
        total = self.estimator.total_steps if self.estimator is not None else 0
        per_sample = self.flops(model)[0] / (3.0 * self.ref_batch)  # as :meth:`sensing` charges a reading
        reading = sum(batch_size(b) for b in (self.store.held_out or self.store.train)) * per_sample
        confirm = sum(batch_size(b) for b in self.store.confirm) * per_sample
        return sizing_price(reading, confirm, self.ledger.dense_step_flops, max(total - obs.step, 0))

    def reading_before(self, model: nn.Module) -> tuple[float, float, list[float]]:
        """(probe loss, best, this rank's per-batch values) before a cut: the interval's reading, else a new one."""
        if self._before is not None:
            return (*self._before, self._before_batches)
        loss = self.probe_loss(model)
        return loss, loss, list(self.store.last_batches)

    def cut_reading(self, model: nn.Module, keep: Mapping[str, Sequence[int]], before: float,
                    batches: Sequence[float]) -> float:
        """The probe reading just after cutting to ``keep`` from ``before`` (per batch ``batches``): the trial's of
        the same cut when one ran this interval (a trial reads the model the cut leaves, on the same batches),
        else a new reading, whose jump and error the budget sensor's noise law learns from too. On several ranks
        always a new reading: every rank must make the same collective readings."""
        tried = self.trial_reads.get(keep_key(keep)) if self.world_size == 1 else None
        if tried is not None:
            return tried[0]
        after = self.probe_loss(model)
        error = self.jump_error(batches, self.store.last_batches, before)
        if self.estimator is not None:
            self.estimator.add_jump_read(self.last_u, math.log(max(after, 1e-12) / max(before, 1e-12)), error)
        return after

    def trial_jump(self, model: nn.Module, keep: Mapping[str, Sequence[int]]) -> float:
        """The probe's immediate log-jump if ``keep`` were cut now (:func:`~ctprune_lightning.trial.read_cut`); the
        reading and its standard error are kept in :attr:`trial_reads`."""
        before, _, batches = self.reading_before(model)
        with self.sensing(model, "trial"):  # charged at the uncut model's FLOPs: an upper bound
            after = read_cut(model, self.groups, keep, self.store.loss)
        error = self.jump_error(batches, self.store.last_batches, before)
        self.trial_reads[keep_key(keep)] = (after, error)
        return math.log(max(after, 1e-12) / max(before, 1e-12))

    def jump_error(self, before: Sequence[float], after: Sequence[float], level: float) -> float | None:
        """The standard error of the log-jump from ``level`` read on batches whose values went from ``before`` to
        ``after`` (this rank's), from the spread of the per-batch changes over every rank's batches; ``None``
        with a single batch in all. Collective on several ranks, like the readings."""
        n = len(before) * self.world_size
        if n < 2 or len(after) != len(before):
            return None
        change = [a - b for a, b in zip(after, before)]
        mean = self.store.reduce_mean(sum(change) / len(change))
        square = self.store.reduce_mean(sum(d * d for d in change) / len(change))
        return math.sqrt(max(square - mean * mean, 0.0) / (n - 1)) / max(level, 1e-12)

    def _scores(self, model: nn.Module, group: PrunableGroup) -> Tensor:
        """SSM state groups are ranked by their Hankel singular values, every other group by the importance."""
        if group.unit == "state":
            return self.hankel.scores(model, group)
        return self.importance.scores(model, group)

    def _ssm_ranks(self, model: nn.Module, widths: dict[str, int], rule: Mapping[str, Any]) -> dict[str, int]:
        """Widths with each SSM group at the rank that ``rule`` (mode, tau, fraction, gate) gives it."""
        states = [g for g in self.groups if g.unit == "state"]
        hsvs = {g.name: self._scores(model, g) for g in states}
        ranks = plan_lru_ranks(model, hsvs=hsvs, **dict(rule))
        floors = {g.name: group_floor(g, self.min_width) for g in states}  # the planner's one rule (planning.py)
        return {**widths, **{n: min(widths[n], max(r, floors[n])) for n, r in ranks.items() if n in hsvs}}

    def _flops_entry(self, model: nn.Module) -> dict[str, float]:
        """With ``cost="time"`` the history's compute is modelled time: the FLOPs fraction is kept beside it."""
        return {"flops": self.flops(model)[0] / self.ledger.dense_step_flops} if self.cost == "time" else {}
