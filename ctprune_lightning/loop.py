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
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from .accounting import ComputeLedger, FlopMeter
from .controllers import Controller, NoneController, Observation
from .importance import Importance
from .importance.hankel import HankelImportance, plan_lru_ranks
from .planning import group_floor, plan_widths, select_units
from .probe import batch_size, batch_statistics, step_error, step_loss
from .sensing import DamageEstimator
from .surgery.groups import PrunableGroup, apply_plan_, arch_spec, discover_groups

LossFn = Callable[[nn.Module, Any], Tensor]

#: the probe loss unless the callback is given another: ``compute_loss(batch)``, else the module's training_step
default_loss = step_loss
#: BUDGET_METRICS: what a quality budget is stated in (see :meth:`ControlLoop.start_budget`)
BUDGET_METRICS = ("loss", "error")


def _identity(x: float) -> float:
    return x


def _detached(batch: Any) -> Any:
    """A copy of ``batch`` that training does not change (kept as a probe)."""
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


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
    """

    step: int
    widths: dict[str, int]
    keep: dict[str, list[int]] = field(default_factory=dict)
    requested: float = 0.0
    snapshot: bool = False
    spectra: dict[str, Any] = field(default_factory=dict)
    grow: dict[str, int] = field(default_factory=dict)


class ControlLoop:
    """Sense, decide and plan; record the effect of each actuation. See the module docstring.

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
    """

    def __init__(self, controller: Controller, importance: Importance, target: float, *, min_width: int = 8,
                 round_to: int = 1, probe_batches: int = 2, loss_fn: LossFn = default_loss,
                 error_fn: LossFn = step_error, reduce_mean: Callable[[float], float] = _identity,
                 flop_view: Callable[[nn.Module], AbstractContextManager[Any]] = nullcontext) -> None:
        self.controller, self.importance = controller, importance
        self.target = 1.0 if isinstance(controller, NoneController) else float(target)
        self.min_width, self.round_to, self.probe_batches = min_width, round_to, probe_batches
        self.loss_fn, self.error_fn, self.reduce_mean, self.flop_view = loss_fn, error_fn, reduce_mean, flop_view
        self.groups: list[PrunableGroup] = []
        self.skipped: list[tuple[str, str]] = []
        self.dense_widths: dict[str, int] = {}
        self.ledger = ComputeLedger()
        self.trace: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.probe: list[Any] = []
        self.held_out: list[Any] = []  # the budget sensor's probe batches from validation data (set_held_out)
        self.meter = FlopMeter(loss_fn)
        self.hankel = HankelImportance()  # SSM layers: scores are Hankel singular values
        self.ref_batch = 1
        self.world_size = 1  # ranks that each train a batch per step: the job's FLOPs are world_size × a rank's
        self.best: float | None = None
        self.jump: float | None = None
        self.last_u = 0.0
        self.saturated = False  # no further cut possible above the floor: importance tracking stops
        self.estimator: DamageEstimator | None = None  # the damage sensor of a quality budget (start_budget)
        self.budget_metric = "loss"  # what the sensor reads: the probe loss, or its error rate
        self._before: tuple[float, float] | None = None  # (probe loss, best) at the last observation

    # ------------------------------------------------------------------------------------ set-up
    def discover(self, model: nn.Module, example: Any, ignored_layers: Sequence[str | type] = (),
                 group_limits: Mapping[str | type, int] | None = None, prune_embeddings: bool = False) -> None:
        """Find the prunable groups; raise ``ValueError`` naming the reasons when there are none."""
        self.groups, self.skipped = discover_groups(model, example, ignored_layers, self.min_width,
                                                    round_to=self.round_to, group_limits=group_limits or {},
                                                    prune_embeddings=prune_embeddings)
        if not self.groups:
            reasons = "; ".join(f"{n}: {r}" for n, r in self.skipped) or "no Linear, Conv or attention layers found"
            raise ValueError(f"ControlPruning: {type(model).__name__} has nothing prunable ({reasons}).")
        self.dense_widths = self.dense_widths or self.widths(model)
        self.importance.attach(model, self.groups)

    def widths(self, model: nn.Module) -> dict[str, int]:
        return {g.name: g.width(model) for g in self.groups}

    @property
    def ready(self) -> bool:
        """Whether enough probe batches are kept to run a control interval."""
        return len(self.probe) >= self.probe_batches

    def add_probe(self, model: nn.Module, batch: Any) -> None:
        """Keep ``batch`` as a probe batch while fewer than ``probe_batches`` are kept."""
        if len(self.probe) >= self.probe_batches:
            return
        kept = _detached(batch)
        if not self.probe and self.budget_metric == "error" and not self.held_out:
            self._check_readable(model, kept, "training")  # before the first step, not mid-run
        self.probe.append(kept)
        if len(self.probe) == 1:
            self.ref_batch = batch_size(batch)
            if not self.ledger.dense_step_flops:
                self.ledger.dense_step_flops = self.flops(model)[0]

    def set_held_out(self, model: nn.Module, batches: Sequence[Any]) -> None:
        """Measure the probe loss on these (validation) batches instead of training batches.

        The FLOP count keeps using the training probe. Raises ``ValueError`` naming the error when the
        loss cannot be computed on them (nothing is kept then).
        """
        kept = [_detached(b) for b in batches]
        if not kept:
            raise ValueError("ControlLoop.set_held_out: no batches given")
        self._check_readable(model, kept[0], "validation")
        self.held_out = kept

    def _check_readable(self, model: nn.Module, batch: Any, kind: str) -> None:
        """Raise ``ValueError`` naming the cause when the sensor's function fails on ``batch``."""
        try:
            self._mean_loss(model, [batch], self.sensor_fn)
        except Exception as err:  # any user loss may fail on a batch it was not written for
            raise ValueError(f"the probe fails on a {kind} batch ({type(err).__name__}: {err})") from err

    def count_batch(self, model: nn.Module, batch: Any) -> None:
        """Charge one training batch at the current architecture to the ledger."""
        self.ledger.add_batch(self.flops(model)[0], batch_size(batch) / self.ref_batch)

    def start_budget(self, total_steps: int, interval: int, metric: str = "loss") -> None:
        """With a quality-budget controller: the damage sensor for a run of ``total_steps`` steps.

        ``metric="loss"``: the budget is the relative excess of the final probe loss over the dense run's.
        ``metric="error"``: it is the absolute excess of the final probe error rate (0.003 = 0.3 points);
        the sensor models the error rate as it models the loss; its relative excess is converted to
        points at the estimated dense error now (conservative: the dense error keeps falling).
        """
        if metric not in BUDGET_METRICS:
            raise ValueError(f"budget metric must be one of {', '.join(BUDGET_METRICS)}, got {metric!r}")
        if getattr(self.controller, "budget", None) is not None and self.estimator is None:
            self.estimator = DamageEstimator(total_steps=max(1, int(total_steps)), interval=interval)
        self.budget_metric = metric if self.estimator is not None else "loss"

    @property
    def batch_stats(self) -> bool:
        """The probe reads BatchNorm with batch statistics: the budget sensor does."""
        return self.estimator is not None

    @property
    def sensor_fn(self) -> LossFn:
        """What the probe reads: the error rate for an error budget, else the loss."""
        return self.error_fn if self.budget_metric == "error" else self.loss_fn

    # ------------------------------------------------------------------------------- measurements
    def flops(self, model: nn.Module) -> tuple[int, dict[str, int]]:
        key = arch_spec(model, self.groups)
        if key not in self.meter.cache:
            with self.flop_view(model):
                self.meter.measure(model, self._probe_on(model, 0), key)
        return self.meter.cache[key]

    def compute(self, model: nn.Module) -> float:
        return self.flops(model)[0] / self.ledger.dense_step_flops

    def _probe_on(self, model: nn.Module, i: int, batches: Sequence[Any] | None = None) -> Any:
        device = next(model.parameters()).device
        return apply_to_collection((self.probe if batches is None else batches)[i], Tensor, lambda t: t.to(device))

    @torch.no_grad()
    def probe_loss(self, model: nn.Module) -> float:
        """Mean loss (error rate, for an error budget) over the probe batches (the held-out ones when set)
        in eval mode, averaged over ranks.

        With a quality budget BatchNorm layers use the probe's batch statistics
        (:func:`~ctprune_lightning.probe.batch_statistics`): a cut's jump is then the change of the function,
        not the lag of the running statistics of the layers after it.
        """
        batches = self.held_out or self.probe
        value = self.reduce_mean(self._mean_loss(model, batches, self.sensor_fn))
        if self.budget_metric == "error":  # half a sample: a log-space sensor needs a positive reading
            value = max(value, 0.5 / max(1, sum(batch_size(b) for b in batches)))
        return value

    @torch.no_grad()
    def _mean_loss(self, model: nn.Module, batches: Sequence[Any], fn: LossFn) -> float:
        was_training = model.training
        model.eval()
        try:
            with batch_statistics(model) if self.batch_stats else nullcontext():
                losses = [float(fn(model, self._probe_on(model, i, batches))) for i in range(len(batches))]
        finally:
            model.train(was_training)
        return sum(losses) / len(losses)

    def update_saturation(self, model: nn.Module) -> None:
        """Saturated when even the deepest allowed cut (down to the floor) changes no width."""
        total, per_module = self.flops(model)
        floor = self.target * self.ledger.dense_step_flops
        widths = self.widths(model)
        self.saturated = widths == plan_widths(widths, per_module, total, self.groups, floor,
                                               self.min_width, self.round_to, floor_flops=floor)

    # ------------------------------------------------------------------------------- the control step
    def observe(self, model: nn.Module, step: int, progress: float) -> Observation:
        """Sense: compute fraction and the probe-loss damage (every rank)."""
        if isinstance(self.controller, NoneController):  # the dense baseline never acts: no probe to pay for
            return Observation(step=step, progress=progress, compute=self.compute(model), damage=0.0)
        loss = self.probe_loss(model)
        best = loss if self.best is None else self.best
        damage = max(0.0, loss - best) / max(best, 1e-12)
        self.best, self._before = min(best, loss), (loss, best)
        sensed: dict[str, Any] = {}
        if self.estimator is not None:  # quality budget: loss now vs the dense reference now, and at the end
            self.estimator.observe(step, loss)
            r = self.estimator.estimate(step)
            damage, final, final_std, damage_std = r["damage"], r["final"], r["final_std"], r["damage_std"]
            if self.budget_metric == "error":  # relative excess of the error rate -> points (a fraction)
                # read at the dense error now, not extrapolated to the end: the trend's extrapolation of an
                # error rate is unstable early, and the error only falls, so this errs on the safe side
                ref = r["reference"]
                damage, damage_std = ref * math.expm1(damage), ref * math.exp(damage) * damage_std
                final, final_std = ref * math.expm1(final), ref * math.exp(final) * final_std
            sensed = {"final_damage": final, "final_std": final_std, "damage_std": damage_std,
                      "reference": r["reference"], "rho": r["rho"]}
        obs = Observation(step=step, progress=progress, compute=self.compute(model), damage=damage,
                          jump=self.jump, last_action=self.last_u, **sensed)
        self.jump, self.last_u = None, 0.0
        return obs

    def decide(self, model: nn.Module, obs: Observation, events_allowed: bool = True) -> Plan:
        """Decide: the controller's action, planned into kept unit indices per group."""
        total, per_module = self.flops(model)
        dense = self.ledger.dense_step_flops
        u = min(max(0.0, float(self.controller.step(obs))), max(0.0, obs.compute - self.target))
        widths = self.widths(model)
        rule = self.controller.rank_event(obs) if events_allowed else None
        snapshot = False
        if rule is not None:  # CompreSSM event: SSM ranks from the Hankel singular values
            new = self._ssm_ranks(model, widths, rule)
            snapshot = new != widths and self.controller.rollback
        elif u > 0:
            new = plan_widths(widths, per_module, total, self.groups, (obs.compute - u) * dense, self.min_width,
                              self.round_to, floor_flops=self.target * dense, reference=self.dense_widths)
        else:
            new = widths
        keep = {g.name: select_units(self._scores(model, g), new[g.name]).tolist()
                for g in self.groups if new[g.name] != widths[g.name]}
        spectra = {n: self.hankel.spectra[n] for n in keep if n in self.hankel.spectra}
        return Plan(step=obs.step, widths=new, keep=keep, requested=u, snapshot=snapshot, spectra=spectra)

    def apply_(self, model: nn.Module, plan: Plan, optimizers: Sequence[Any]) -> None:
        """Actuate ``plan`` on this rank's (unwrapped) model; the importance follows the cut."""
        keep = {name: torch.tensor(idx, dtype=torch.long) for name, idx in plan.keep.items()}
        apply_plan_(model, self.groups, keep, optimizers, grow=plan.grow)
        self.importance.on_surgery(keep)
        if plan.grow:  # grown groups: the importance's per-unit state restarts at the new widths
            self.importance.attach(model, self.groups)

    def record(self, model: nn.Module, obs: Observation, plan: Plan) -> dict[str, Any]:
        """Re-measure after an actuation (or none) and append the trace row (returned)."""
        compute = obs.compute
        if plan.keep:
            compute = self.compute(model)
            before, best = self._before if self._before is not None else (self.probe_loss(model),) * 2
            after = self.probe_loss(model)
            self.jump = (after - before) if self.budget_metric == "error" else (after - before) / max(best, 1e-12)
            if self.estimator is not None:
                self.estimator.add_cut(plan.step, math.log(max(after, 1e-12) / max(before, 1e-12)))
            self.last_u = obs.compute - compute
            self.history.append({"step": plan.step, "widths": dict(plan.widths), "compute": compute}
                                | ({"hankel_spectra": plan.spectra} if plan.spectra else {}))
            self.update_saturation(model)
        row = {"step": obs.step, "progress": obs.progress, "compute": compute, "damage": obs.damage,
               "action": self.last_u, "requested": plan.requested, "widths": self.widths(model)}
        if self.estimator is not None:
            row |= {"damage_std": obs.damage_std, "final_damage": obs.final_damage, "final_std": obs.final_std,
                    "reference": obs.reference, "rho": obs.rho, "budget": getattr(self.controller, "budget", None),
                    "budget_metric": self.budget_metric,
                    "reason": getattr(self.controller, "reason", "")}
        self.trace.append(row)
        return row

    def record_rollback(self, model: nn.Module, step: int, to_step: int, before: float, after: float) -> None:
        """After a rollback restored the model: importance and history follow the restored widths."""
        self.controller.stopped = True
        self.importance.attach(model, self.groups)
        self.history.append({"step": step, "widths": self.widths(model), "compute": self.compute(model),
                             "rollback_to_step": to_step, "val_before": before, "val_after": after})
        self.update_saturation(model)

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

    # ------------------------------------------------------------------------------ state and report
    def summary(self, steps: int) -> dict[str, Any]:
        """Plain-Python report of the run so far."""
        last = self.trace[-1]["widths"] if self.trace else dict(self.dense_widths)
        return {
            "controller": type(self.controller).__name__,
            "importance": getattr(self.importance, "name", type(self.importance).__name__),
            "target": self.target,
            "widths": last,
            "dense_widths": dict(self.dense_widths),
            "dense_step_flops": self.ledger.dense_step_flops,  # one rank's batch
            "flops_fraction": self.history[-1]["compute"] if self.history else 1.0,
            "train_flops": self.ledger.train_flops * self.world_size,  # the whole job
            "dense_train_flops": self.ledger.dense_train_flops * self.world_size,
            "world_size": self.world_size,
            "train_flops_saved": self.ledger.saved,
            "train_time_s": self.ledger.train_time_s,
            "steps": steps,
            "surgeries": len(self.history),
            "history": list(self.history),
            "trace": list(self.trace),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "probe": [apply_to_collection(b, Tensor, lambda t: t.cpu()) for b in self.probe],
            "held_out": [apply_to_collection(b, Tensor, lambda t: t.cpu()) for b in self.held_out],
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
            "estimator": None if self.estimator is None else self.estimator.state_dict(),
            "budget_metric": self.budget_metric,
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
        self.probe = list(state.get("probe", []))
        self.held_out = list(state.get("held_out", []))
        self.ref_batch = int(state.get("ref_batch", 1))
        if state.get("estimator") is not None:
            self.estimator = self.estimator or DamageEstimator(total_steps=1, interval=1)
            self.estimator.load_state_dict(state["estimator"])
            self.budget_metric = str(state.get("budget_metric", "loss"))
