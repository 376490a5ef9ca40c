"""The control step, free of Lightning: sense -> decide -> plan, then record what the actuation did.

:class:`ControlLoop` owns what the step needs (groups, probe batches, controller, importance, FLOPs
meter, compute ledger, trace and history). A :class:`Plan` is plain data, so a distributed strategy
can broadcast rank 0's plan and every rank can apply the same one. The Lightning callback
(:mod:`ctprune_lightning.callback`) only adapts hooks, logging and checkpoint state to it::

    loop = ControlLoop(build_controller("lqr", 0.3), build_importance("trajectory"), target=0.3)
    loop.discover(model, example)
    loop.add_probe(batch)
    obs = loop.observe(model, step=120, progress=0.1)
    plan = loop.decide(model, obs)                  # rank 0; broadcast it
    if plan.keep:
        loop.apply_(model, plan, optimizers)        # every rank, at the optimizer-step boundary
    loop.record(model, obs, plan)
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .accounting import ComputeLedger, FlopMeter
from .controllers import Controller, NoneController, Observation
from .importance import Importance
from .importance.hankel import HankelImportance
from .cost import AUTO, CostModel, TimeLedger, auto_round_to, check_cost, check_round_to
from .loop_planning import LoopPlanning
from .probe import batch_size, step_error, step_loss
from .probe_store import LossFn, ProbeStore
from .reading import ReadSchedule
from .sensing import DamageSensor, check_persistence_prior
from .surgery.groups import PrunableGroup, apply_plan_, discover_groups
from .trial import can_trial

#: the probe loss unless the callback is given another: ``compute_loss(batch)``, else the module's training_step
default_loss = step_loss
#: BUDGET_METRICS: what a quality budget is stated in (see :meth:`ControlLoop.start_budget`)
BUDGET_METRICS = ("loss", "error")


def _identity(x: float) -> float:
    return x


@dataclass(frozen=True)
class Plan:
    """What to do at one control interval: plain data, identical on every rank once broadcast.

    Attributes:
        step: the optimizer step it was decided at.
        widths: every group's width after the plan.
        keep: ``{group name: sorted kept unit indices}`` for the groups that change (empty: no cut).
        requested: the controller's action ``u`` (fraction of dense FLOPs to remove), after capping.
        snapshot: take a rollback snapshot before actuating (CompreSSM rollback mode).
        spectra: the Hankel singular values of the SSM groups cut, for the history.
        grow: ``{group name: units to add}`` after the cuts (function-preserving growth; empty: none).
        quiet: a hold that only a change of the damage estimate can end (a quality budget spent with no growth to
            watch for, no cut that fits repays its sizing, or the trial cuts found none that fits): the readings
            back off (:meth:`ControlLoop.note_quiet`).
            Rank 0's, like the rest of the plan, so every rank backs off alike.
    """

    step: int
    widths: dict[str, int]
    keep: dict[str, list[int]] = field(default_factory=dict)
    requested: float = 0.0
    snapshot: bool = False
    spectra: dict[str, Any] = field(default_factory=dict)
    grow: dict[str, int] = field(default_factory=dict)
    quiet: bool = False


class ControlLoop(LoopPlanning):
    """Sense, decide and plan; record the effect of each actuation. See the module docstring.

    The planning half (compute readings, the planner, trial sizing, growth and SSM rank plans) is
    :class:`~ctprune_lightning.loop_planning.LoopPlanning`.

    Args:
        controller / importance: built objects.
        target: the compute floor ``c*`` (the dense baseline's is 1).
        min_width / round_to: planner limits (every group's own limits live on the group).
        probe_batches: first training batches kept to measure the loss damage.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for the probe and FLOP counting (default:
            :func:`~ctprune_lightning.probe.step_loss`, the module's own loss).
        error_fn: ``error_fn(model, batch) -> error rate`` for a budget stated in error (default
            :func:`~ctprune_lightning.probe.step_error`).
        reduce_mean: averages a float over ranks (identity on one process).
        flop_view: ``flop_view(model)`` is a context in which ``model`` holds plain (unsharded) modules
            of the same shapes, for FLOP counting without collectives (FSDP2); none by default.
        cost: the controller's compute reading: ``"flops"`` (FLOPs per step ÷ dense) or ``"time"`` (the
            measured cost model's modelled time per step ÷ dense; see :mod:`ctprune_lightning.cost`).
        cost_kwargs: measure a cost model on the first probe batch with these
            :func:`~ctprune_lightning.cost.measure_cost` settings (``cost="time"``: ``{}`` when None); with
            it, the planner keeps to the cost frontier and a plan not modelled faster than dense is held.
    """

    def __init__(self, controller: Controller, importance: Importance, target: float, *, min_width: int = 8,
                 round_to: int = 1, probe_batches: int = 2, loss_fn: LossFn = default_loss,
                 error_fn: LossFn = step_error, reduce_mean: Callable[[float], float] = _identity,
                 flop_view: Callable[[nn.Module], AbstractContextManager[Any]] = nullcontext,
                 cost: str = "flops", cost_kwargs: Mapping[str, Any] | None = None,
                 sense_budget: float | None = None, persistence_prior: Mapping[str, float] | None = None) -> None:
        self.controller, self.importance = controller, importance
        self.reads = ReadSchedule(sense_budget)  # when a quality budget reads (sensing budget, backoff, idle)
        self.persistence_prior = check_persistence_prior(persistence_prior)
        self.cost = check_cost(cost)
        check_round_to(round_to)
        self.cost_kwargs = dict(cost_kwargs) if cost_kwargs is not None else ({} if cost == "time" else None)
        self.cost_model: CostModel | None = None  # measured on the first probe batch when cost_kwargs is set
        self.cost_context: Callable[[], AbstractContextManager[Any]] = nullcontext  # e.g. the trainer's autocast
        self.time_ledger = TimeLedger()
        self.target = 1.0 if isinstance(controller, NoneController) else float(target)
        self.min_width, self.round_to = min_width, round_to
        self.loss_fn, self.flop_view = loss_fn, flop_view
        self.store = ProbeStore(probe_batches, loss_fn, error_fn, reduce_mean)
        self.groups: list[PrunableGroup] = []
        self.skipped: list[tuple[str, str]] = []
        self.dense_widths: dict[str, int] = {}
        self.ledger = ComputeLedger()
        self.trace: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.meter = FlopMeter(loss_fn)
        self.hankel = HankelImportance()  # SSM layers: scores are Hankel singular values
        self.ref_batch = 1
        self.world_size = 1  # ranks that each train a batch per step: the job's FLOPs are world_size × a rank's
        self.best: float | None = None
        self.jump: float | None = None
        self.last_u = 0.0
        self.saturated = False  # no further cut possible above the floor: importance tracking stops
        self.trials = 0  # trial cuts evaluated at the last decision
        self.trial_reads: dict[tuple, tuple[float, float | None]] = {}  # their readings (and jump errors), by cut
        self.hold_reason = ""  # why the last decision cut less than the controller asked (trial sizing)
        self.unrepaid = False  # the last decision held: no cut that fits repays its sizing (payback)
        self.jump_rate: float | None = None  # the last real cut's probe log-jump per unit of compute removed
        self._train_before: float | None = None  # the training batches' loss just before a planned cut
        self.estimator: DamageSensor | None = None  # the damage sensor of a quality budget (start_budget)
        self._before: tuple[float, float] | None = None  # (probe loss, best) at the last observation
        self._before_batches: list[float] = []  # its per-batch values on this rank (a jump's error is their spread)
        self.unsensed = ""  # why this interval's probe was not read (the sensing budget), "" when it was
        self.read_next = True  # a reading can still come after this interval: track (:meth:`expect_reading`)

    # ------------------------------------------------------------------------------------ set-up
    def discover(self, model: nn.Module, example: Any, ignored_layers: Sequence[str | type] = (),
                 group_limits: Mapping[str | type, int] | None = None, prune_embeddings: bool = False) -> None:
        """Find the prunable groups; raise ``ValueError`` naming the reasons when there are none.

        ``round_to="auto"`` is resolved here from the model's device and dtype, unless set before."""
        if self.round_to == AUTO:
            param = next(model.parameters())
            self.round_to = auto_round_to(param.device.type, param.dtype)
        self.groups, self.skipped = discover_groups(model, example, ignored_layers, self.min_width,
                                                    round_to=self.round_to, group_limits=group_limits or {},
                                                    prune_embeddings=prune_embeddings)
        if not self.groups:
            reasons = "; ".join(f"{n}: {r}" for n, r in self.skipped) or "no Linear, Conv or attention layers found"
            raise ValueError(f"ControlPruning: {type(model).__name__} has nothing prunable ({reasons}).")
        self.dense_widths = self.dense_widths or self.widths(model)
        self.importance.attach(model, self.groups)

    # the probe store, under the names the callback and users read (``probe``: :class:`LoopPlanning`)
    held_out = property(lambda self: self.store.held_out)
    budget_metric = property(lambda self: self.store.metric)
    ready = property(lambda self: self.store.ready, doc="Whether enough probe batches are kept to run an interval.")

    @property
    def reduce_mean(self) -> Callable[[float], float]:
        return self.store.reduce_mean

    @reduce_mean.setter
    def reduce_mean(self, fn: Callable[[float], float]) -> None:
        self.store.reduce_mean = fn

    def add_probe(self, model: nn.Module, batch: Any) -> None:
        """Keep ``batch`` as a probe batch while fewer than ``probe_batches`` are kept."""
        if self.store.add(model, batch):
            self.ref_batch = batch_size(batch)
            if not self.ledger.dense_step_flops:
                self.ledger.dense_step_flops = self.flops(model, part="setup")[0]
            measure = self.cost_kwargs is not None and not isinstance(self.controller, NoneController)
            if measure and self.cost_model is None:  # the dense baseline never cuts: nothing to plan for
                self.cost_model = self.measure_cost(model)

    def set_held_out(self, model: nn.Module, batches: Sequence[Any], confirm: Sequence[Any] = ()) -> None:
        """Measure the probe loss on these (validation) batches instead of training batches (FLOPs are still
        counted on the training probe); ``confirm``: more of them, on which a cut sized by trial is read before it
        is made (:meth:`~ctprune_lightning.loop_planning.LoopPlanning.confirm_cut`). ``ValueError`` naming the
        error when they cannot be read."""
        self.store.set_held_out(model, batches, confirm)

    def count_batch(self, model: nn.Module, batch: Any) -> None:
        """Charge one training batch at the current architecture to the ledger."""
        self.ledger.add_batch(self.flops(model)[0], batch_size(batch) / self.ref_batch)
        if self.cost_model is not None:
            self.time_ledger.add(self.cost_model.step_time(self.widths(model)), self.cost_model.dense_time,
                                 batch_size(batch) / self.ref_batch)

    def start_budget(self, total_steps: int, interval: int, metric: str = "loss") -> None:
        """With a quality-budget controller: the damage sensor for a run of ``total_steps`` steps.

        ``metric="loss"``: the budget is the relative excess of the final probe loss over the dense run's.
        ``metric="error"``: it is the absolute excess of the final probe error rate (0.003 = 0.3 points);
        the sensor models the error rate as it models the loss; its relative excess is converted to
        points at the estimated dense error now (conservative: the dense error keeps falling).
        """
        if metric not in BUDGET_METRICS:
            raise ValueError(f"budget metric must be one of {', '.join(BUDGET_METRICS)}, got {metric!r}")
        if self.controller.budget is not None and self.estimator is None:
            prior = self.persistence_prior
            self.estimator = DamageSensor(total_steps=max(1, int(total_steps)), interval=interval,
                                          rho_mean=prior["mean"], rho_mean_std=prior["std"], rho_spread=prior["spread"])
        self.store.metric = metric if self.estimator is not None else "loss"
        self.store.batch_stats = self.estimator is not None  # the budget sensor reads BatchNorm on the batch

    # ------------------------------------------------------------------------------- the control step
    def observe(self, model: nn.Module, step: int, progress: float, train_loss: float | None = None,
                lr: float | None = None, unsensed: str = "", span: int | None = None) -> Observation:
        """Sense: compute fraction and the probe-loss damage (every rank).

        ``train_loss`` (the mean training loss of the steps since the last observation, averaged over ranks)
        and ``lr`` (the learning rate now) feed the budget sensor's second channel and its clock (``span``: the
        steps that mean covers, default one interval). ``unsensed``: why the probe is not read this interval (the
        sensing budget, target mode): ``Observation.sensed`` is then False and the cut made on it measures no jump.
        """
        compute = self.compute(model)
        self.unsensed = unsensed
        unread = Observation(step=step, progress=progress, compute=compute, damage=math.nan,
                             last_action=self.last_u, sensed=False)
        if unsensed:
            return unread
        if not self.controller.reads_damage and self.controller.budget is None:
            # the dense baseline and the open-loop schedules act on progress alone: no probe to pay for
            self.jump, self.last_u = None, 0.0
            return unread
        if self.saturated and self.controller.budget is None and not self.controller.due(progress):
            # no cut is possible and no budget may ask for growth: nothing to decide, no probe to pay for
            return Observation(step=step, progress=progress, compute=compute, damage=math.nan)
        loss = self.probe_loss(model)
        best = loss if self.best is None else self.best
        damage = max(0.0, loss - best) / max(best, 1e-12)
        self.best, self._before, self._before_batches = min(best, loss), (loss, best), list(self.store.last_batches)
        sensed: dict[str, Any] = {}
        if self.estimator is not None:  # quality budget: loss now vs the dense reference now, and at the end
            self.estimator.observe(step, loss, train_loss, lr, span)
            sensed = self.estimator.reading(step, self.budget_metric, compute)
            damage = sensed.pop("damage")
        obs = Observation(step=step, progress=progress, compute=compute, damage=damage,
                          jump=self.jump, last_action=self.last_u, **sensed)
        self.jump, self.last_u = None, 0.0
        return obs

    def observe_training(self, step: int, train_loss: float | None, lr: float | None, span: int | None = None) -> None:
        """An interval the probe does not read (:meth:`sensing_due`): the budget sensor still gets its free channel,
        the mean training loss of the last ``span`` steps, so the recovery after a cut is followed between the
        readings (on the suite's char-GPT and ResNet-20 the 3% sensing budget reads 2 of 25–30 intervals)."""
        if self.estimator is not None:
            self.estimator.observe(step, None, train_loss, lr, span)

    def sensing_due(self, step: int) -> str:
        """Why the interval at ``step`` is not read ("" when it is due): the forwards of the probe readings and
        trial cuts so far (``ledger.sensing_flops``) would exceed ``sense_budget`` of the training FLOPs. Counted
        in FLOPs, not seconds, so a run decides alike on any machine and a resumed run as the uninterrupted one.
        The first interval always reads. A quality budget gone :attr:`idle` reads no more; one whose readings found
        nothing to do ``n`` times in a row (its budget spent, or no cut that fits repays its sizing) skips the next
        ``2ⁿ − 1`` intervals (:meth:`note_quiet`). An unread interval's trace row says why; a quality budget holds
        on it (it cuts only on a reading: the trial), a compute target acts on the last reading
        (``Observation.sensed``)."""
        return self.reads.due(step, self.ledger.sensing_flops, self.ledger.train_flops, capped=self._capped)

    @property
    def _capped(self) -> bool:
        """Whether the sensing budget applies: not to the first interval, nor to a controller that reads no damage."""
        return bool(self.trace) and self.controller.reads_damage

    @property
    def idle(self) -> str:
        """Why a quality budget reads no more (no cut was made and none that repays its sizing fits); "" while it
        reads (:class:`~ctprune_lightning.reading.ReadSchedule`)."""
        return self.reads.idle

    def note_quiet(self, plan: Plan) -> None:
        """After a quality budget's reading: when its plan found nothing to do (``Plan.quiet``: its budget spent
        with no growth to watch for, or no cut that fits repays its sizing) the ``n``-th time in a row, the next
        ``2ⁿ − 1`` intervals are not read; any other outcome reads every interval again. Such a hold ends only when
        the damage estimate moves; in the suite's 75 runs that held so, one cut (0.007 of the compute, at the last
        step) followed it. On the MLP and LRU budget runs the backoff took the sensing from 3.0% to 1.8–2.5% of the
        training FLOPs with the same cuts (``experiments/results/suite/loop_2026-12-07.md``)."""
        interval = self.estimator.interval if self.estimator is not None else 1
        self.reads.note(plan.step, plan.quiet and self.estimator is not None, interval)  # a quiet plan cuts nothing

    def tracking(self, step: int) -> bool:
        """Whether the importance is tracked at the optimizer step ``step``: not once no cut is possible
        (:attr:`saturated`), nor where no cut can come before the next interval's end (:meth:`expect_reading`)."""
        return not self.saturated and self.read_next

    def expect_reading(self, model: nn.Module, step: int, batches_per_step: int = 1) -> bool:
        """After the control interval at ``step``: whether to track the importance until the next one
        (:attr:`read_next`). A quality budget cuts only on a reading, so it does not track in a backoff's gap (the
        path tracked before it is kept: the importance sums the tracked steps since the last cut), nor once no
        reading can come before the end of training: the sensing budget spent for good at the FLOPs the batches
        add at the current width (``batches_per_step`` per optimizer step; a full batch each, an upper bound), or
        idle. For a path integral (the trajectory) the intervals the sensing budget leaves unread before a later
        reading are tracked: the path since the last cut ranks the next one (tracking only the interval before each
        reading cut the MLP's budget runs' saving from 27.9% to 25.0%,
        ``experiments/results/suite/loop_2026-12-07.md``). Scores that forget (``Importance.memory``: Taylor's EMA
        remembers ~10 steps) are tracked only in the intervals within that memory before the reading. Exact:
        nothing is read between two control steps, and ``model`` has the width the batches until then train at.
        Every rank must track alike (an FSDP2 tracking step gathers the parameters): the callback takes rank 0's
        answer. A compute target acts on the last reading, and tracks every interval."""
        if self.estimator is None or self.controller.budget is None:
            self.read_next = True
            return True
        interval = self.estimator.interval
        flops = interval * max(1, int(batches_per_step)) * self.flops(model)[0]  # a full batch each: an upper bound
        due = self.reads.next_due(step, interval, self.ledger.sensing_flops, self.ledger.train_flops, flops,
                                  self._capped)
        gap = step + interval < self.reads.read_after  # the next interval ends inside a backoff's gap
        self.read_next = due is not None and due <= self.estimator.total_steps and not gap
        memory = self.importance.memory
        if self.read_next and memory is not None:  # scores that forget: only the intervals they remember count
            self.read_next = due - step <= max(1, math.ceil(memory / interval)) * interval
        return self.read_next

    def record_skip(self, model: nn.Module, step: int, progress: float, reason: str) -> dict[str, Any]:
        """The trace row of a quality budget's interval left unread (:meth:`sensing_due`): a hold, with its reason."""
        row = {"step": step, "progress": progress, "compute": self.compute(model), "damage": math.nan,
               "action": 0.0, "requested": 0.0, "widths": self.widths(model), "reason": reason}
        self.trace.append(row)
        return row

    def decide(self, model: nn.Module, obs: Observation, events_allowed: bool = True) -> Plan:
        """Decide: the controller's action, planned into kept unit indices per group.

        With a ``max_jump`` from the controller (the budget mode), the cut is sized by trial first: the
        largest cut up to the action whose measured jump on the probe batches fits (:meth:`trial_jump`).
        """
        u = min(max(0.0, float(self.controller.step(obs))), max(0.0, obs.compute - self.target))
        widths = self.widths(model)
        rule = self.controller.rank_event(obs) if events_allowed else None
        snapshot = False
        self.trials, self.hold_reason, self.trial_reads, self.unrepaid = 0, "", {}, False
        request = float(self.controller.grow_request or 0.0)
        if rule is None and u <= 0 and request > 0 and math.isfinite(request):  # grow back the groups cut last
            grow = self.plan_growth(model, request)
            units = ", ".join(f"{n} +{k}" for n, k in grow.items())
            self.hold_reason = (f"{self.controller.reason}; +{sum(grow.values())} units to groups {units}" if grow
                                else f"{self.controller.reason}; nothing to grow back (no cut group can grow)")
            return Plan(step=obs.step, widths={n: w + grow.get(n, 0) for n, w in widths.items()},
                        requested=-request, grow=grow)
        if rule is not None:  # CompreSSM event: SSM ranks from the Hankel singular values
            new = self._ssm_ranks(model, widths, rule)
            snapshot = new != widths and self.controller.rollback
        elif u > 0:
            if self.controller.max_jump is not None:
                u = self._size_by_trial(model, obs, u, self.controller.max_jump)
            new = self._plan_widths(model, obs, u) if u > 0 else widths
        else:
            new = widths
        new = self._never_slower(widths, new)
        keep = self._keep(model, widths, new)
        max_jump = self.controller.max_jump
        if keep and rule is None and max_jump is not None and self.store.confirm and can_trial(model):
            new, keep, u = self.checked_cut(model, obs, widths, new, u, max_jump)  # the sized cut, read again
        if keep and self.estimator is not None and self.held_out:  # the training channel's jump, measured too
            self._train_before = self.train_loss(model)
        spectra = {n: self.hankel.spectra[n] for n in keep if n in self.hankel.spectra}
        quiet = not keep and (self.controller.spent or self.unrepaid or self.trials > 0)  # or no trial cut fitted
        return Plan(step=obs.step, widths=new, keep=keep, requested=u, snapshot=snapshot, spectra=spectra, quiet=quiet)

    def apply_(self, model: nn.Module, plan: Plan, optimizers: Sequence[Any]) -> None:
        """Actuate ``plan`` on this rank's (unwrapped) model; the importance follows the cut."""
        keep = {name: torch.tensor(idx, dtype=torch.long) for name, idx in plan.keep.items()}
        with self.ledger.overhead("surgery"):
            apply_plan_(model, self.groups, keep, optimizers, grow=plan.grow)
        self.importance.on_surgery(keep)
        if plan.grow:  # grown groups: the importance's per-unit state restarts at the new widths
            self.importance.attach(model, self.groups)

    def record(self, model: nn.Module, obs: Observation, plan: Plan) -> dict[str, Any]:
        """Re-measure after an actuation (or none) and append the trace row (returned)."""
        compute = obs.compute
        if plan.keep or plan.grow:
            compute = self.compute(model)
            self.last_u = obs.compute - compute
            if obs.sensed and (self.controller.reads_damage or self.estimator is not None):
                # the cut's jump (a schedule needs none; an unread interval has no reading to compare with)
                before, best, batches = self.reading_before(model)
                after = self.cut_reading(model, plan.keep, before, batches)
                self.jump = (after - before) if self.budget_metric == "error" else (after - before) / max(best, 1e-12)
                log_jump = math.log(max(after, 1e-12) / max(before, 1e-12))
                self.jump_rate = log_jump / self.last_u if self.last_u > 1e-9 else self.jump_rate
            if self.estimator is not None and not plan.grow:
                # a growth is no cut for the sensor: it preserves the function (jump 0, which would read as a
                # perfectly measured jump and shrink the jump noise); it reaches the sensor through the readings
                # that follow (the loss falls below the prediction: the cuts' persistent fractions ρ fall)
                train_jump = None
                if self._train_before is not None:
                    train_after = self.train_loss(model)
                    train_jump = math.log(max(train_after, 1e-12) / max(self._train_before, 1e-12))
                    self._train_before = None
                self.estimator.add_cut(plan.step, log_jump, train_jump, size=self.last_u)
            self.history.append({"step": plan.step, "widths": dict(plan.widths), "compute": compute}
                                | self._flops_entry(model)
                                | ({"hankel_spectra": plan.spectra} if plan.spectra else {})
                                | ({"grown": dict(plan.grow)} if plan.grow else {}))
            self.update_saturation(model)
        row = {"step": obs.step, "progress": obs.progress, "compute": compute, "damage": obs.damage,
               "action": self.last_u, "requested": plan.requested, "widths": self.widths(model)}
        if plan.grow:  # a growth: the units added per group (action < 0: compute given back)
            row["grown"] = dict(plan.grow)
        if self.estimator is not None:
            row |= {"damage_std": obs.damage_std, "final_damage": obs.final_damage, "final_std": obs.final_std,
                    "reference": obs.reference, "rho": obs.rho, "budget": self.controller.budget,
                    "budget_metric": self.budget_metric, "next_factor": obs.next_factor,
                    "max_jump": self.controller.max_jump, "trials": self.trials,
                    "reason": self.hold_reason or self.controller.reason}
            self.note_quiet(plan)
        elif self.hold_reason or self.unsensed:  # e.g. the cost model held a cut (never slower than dense)
            row["reason"] = "; ".join(r for r in (self.unsensed and f"{self.unsensed} (the last reading holds)",
                                                  self.hold_reason) if r)
        self.trace.append(row)
        return row

    def record_rollback(self, model: nn.Module, step: int, to_step: int, before: float, after: float) -> None:
        """After a rollback restored the model: importance and history follow the restored widths."""
        self.controller.stopped = True
        self.importance.attach(model, self.groups)
        self.history.append({"step": step, "widths": self.widths(model), "compute": self.compute(model),
                             "rollback_to_step": to_step, "val_before": before, "val_after": after}
                            | self._flops_entry(model))
        self.update_saturation(model)

    # ------------------------------------------------------------------------------ state and report
    def summary(self, steps: int) -> dict[str, Any]:
        """Plain-Python report of the run so far (with a cost model: the modelled time beside the FLOPs)."""
        last = self.trace[-1]["widths"] if self.trace else dict(self.dense_widths)
        cm = self.cost_model
        return {
            "controller": type(self.controller).__name__,
            "importance": getattr(self.importance, "name", type(self.importance).__name__),
            "target": self.target,
            "widths": last,
            "dense_widths": dict(self.dense_widths),
            "dense_step_flops": self.ledger.dense_step_flops,  # one rank's batch
            "flops_fraction": self.history[-1].get("flops", self.history[-1]["compute"]) if self.history else 1.0,
            "cost": self.cost,
            "time_fraction": cm.fraction(last) if cm is not None else None,
            "train_time_saved": self.time_ledger.saved if cm is not None else None,  # modelled
            "cost_model": cm.describe() if cm is not None else None,
            "train_flops": self.ledger.train_flops * self.world_size,  # the whole job
            "dense_train_flops": self.ledger.dense_train_flops * self.world_size,
            "world_size": self.world_size,
            "train_flops_saved": self.ledger.saved,
            "train_time_s": self.ledger.train_time_s,
            "control_time_s": self.ledger.overhead_s,  # the callback's own share of it
            "control_overhead": self.ledger.overhead_share,
            "control_time_parts": {k: round(v, 4) for k, v in sorted(self.ledger.overhead_parts.items())},
            "sensing_flops": self.ledger.sensing_flops * self.world_size,  # the probe's forwards (not in train_flops)
            "sensing_share": (self.ledger.sensing_flops / self.ledger.train_flops if self.ledger.train_flops
                              else None),
            "steps": steps,
            "surgeries": len(self.history),
            "history": list(self.history),
            "trace": list(self.trace),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.store.state_dict(),
            "ref_batch": self.ref_batch,
            "controller": self.controller.state_dict(),
            "importance": self.importance.state_dict(),
            "ledger": self.ledger.state_dict(),
            "trace": list(self.trace),
            "history": list(self.history),
            "dense_widths": dict(self.dense_widths),
            "best": self.best,
            "jump": self.jump,
            "last_u": self.last_u,
            "jump_rate": self.jump_rate,
            **self.reads.state_dict(),
            "read_next": self.read_next,
            "estimator": None if self.estimator is None else self.estimator.state_dict(),
            "budget_metric": self.budget_metric,
            "cost_model": None if self.cost_model is None else self.cost_model.state_dict(),
            "time_ledger": self.time_ledger.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.controller.load_state_dict(state.get("controller", {}))
        self.importance.load_state_dict(state.get("importance", {}))
        self.ledger.load_state_dict(state.get("ledger", {}))
        self.trace = list(state.get("trace", []))
        self.history = list(state.get("history", []))
        self.dense_widths = dict(state.get("dense_widths", {}))
        self.best = state.get("best")
        self.jump = state.get("jump")
        self.last_u = float(state.get("last_u", 0.0))
        rate = state.get("jump_rate")
        self.jump_rate = None if rate is None else float(rate)
        self.reads.load_state_dict(state)
        self.read_next = bool(state.get("read_next", True))
        self.store.load_state_dict(dict(state))
        self.ref_batch = int(state.get("ref_batch", 1))
        if state.get("cost_model") is not None:
            self.cost_model = CostModel.from_state(state["cost_model"])
        self.time_ledger.load_state_dict(state.get("time_ledger", {}))
        if state.get("estimator") is not None:
            self.estimator = self.estimator or DamageSensor(total_steps=1, interval=1)
            self.estimator.load_state_dict(state["estimator"])
            self.store.metric = str(state.get("budget_metric", "loss"))
            self.store.batch_stats = True
