"""ControlPruning: shrink a LightningModule physically while it trains, under feedback control.

Every ``every_n_steps`` optimizer steps the callback *senses* (compute fraction, loss damage on a fixed
probe batch), asks the controller how much compute to remove, asks the importance which units go,
and *actuates* at the optimizer-step boundary through :mod:`ctprune_lightning.surgery` (new, smaller
Parameters; optimizer state sliced alike). FLOPs are re-measured after each surgery and logged.

Example::

    trainer = L.Trainer(callbacks=[ControlPruning(controller="lqr", target=0.3)])
    trainer.fit(model, datamodule)
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from .accounting import ComputeLedger, FlopMeter
from .checkpoint import CTPRUNE_KEY, install_checkpoint_hooks, make_spec
from .controllers import Controller, NoneController, Observation, build_controller
from .controllers.base import check_number
from .importance import Importance, build_importance
from .importance.hankel import HankelImportance, plan_lru_ranks
from .planning import plan_widths, select_units
from .rollback import Snapshot
from .surgery.groups import PrunableGroup, apply_plan_, arch_spec, discover_groups

log = logging.getLogger(__name__)

# Metric keys (logged through Lightning, so W&B / CSV / the progress bar all get them).
FLOPS_RATIO = "ctprune/flops_ratio"
SAVED = "ctprune/saved"
DAMAGE = "ctprune/damage"
ACTION = "ctprune/action"
PARAMS = "ctprune/params"


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """The probe loss: ``model.compute_loss(batch)`` when defined, else cross-entropy on ``(x, y)``."""
    if hasattr(model, "compute_loss"):
        return model.compute_loss(batch)
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise TypeError(
            f"ControlPruning cannot compute a loss on a batch of type {type(batch).__name__}: "
            "give your LightningModule a `compute_loss(batch) -> Tensor` method, or yield (inputs, targets)."
        )
    logits = model(batch[0])
    return F.cross_entropy(logits.flatten(0, -2) if logits.dim() > 2 else logits, batch[1].flatten())


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if isinstance(first, Tensor) else 1


class ControlPruning(Callback):
    """Closed-loop structured pruning during training.

    Args:
        controller: a name (``none``, ``gmp``, ``linear``, ``pid``, ``lqr``) or a
            :class:`~ctprune_lightning.controllers.Controller`; an instance's own ``target`` wins.
        target: compute setpoint ``c*``: FLOPs per step of the final net ÷ dense, in ``(0, 1]``.
        importance: ``magnitude``, ``taylor``, ``trajectory`` or an :class:`Importance`.
        every_n_steps: optimizer steps per control interval.
        start_step: no cut before this optimizer step.
        min_width: no group narrower than this.
        round_to: widths are multiples of this (hardware-friendly), unless ``min_width`` binds.
        ignored_layers: qualified module names (prefixes) or module types left dense.
        controller_kwargs / importance_kwargs: passed to the builder when given by name.
        probe_batches: number of first training batches kept to measure the loss damage.
        group_limits: ``{group name, name prefix or module type: minimum width}`` (heads count as
            units of a head group).
        prune_embeddings: also cut embedding / residual widths (never the vocabulary or the output).
    """

    def __init__(
        self,
        controller: str | Controller = "lqr",
        target: float = 0.3,
        importance: str | Importance = "trajectory",
        every_n_steps: int = 20,
        start_step: int = 0,
        min_width: int = 8,
        round_to: int = 1,
        ignored_layers: Sequence[str | type] = (),
        controller_kwargs: Mapping[str, Any] | None = None,
        importance_kwargs: Mapping[str, Any] | None = None,
        probe_batches: int = 2,
        group_limits: Mapping[str | type, int] | None = None,
        prune_embeddings: bool = False,
    ) -> None:
        super().__init__()
        for name, value, low in (("every_n_steps", every_n_steps, 1), ("start_step", start_step, 0),
                                 ("min_width", min_width, 1), ("round_to", round_to, 1),
                                 ("probe_batches", probe_batches, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ControlPruning: `{name}` must be an integer >= {low}, got {value!r}")
        if isinstance(controller, Controller):
            self.controller = controller
        elif isinstance(controller, str):
            self.controller = build_controller(controller, check_number("target", target, 0.0, 1.0, low_open=True),
                                               **dict(controller_kwargs or {}))
        else:
            raise TypeError(f"ControlPruning: `controller` must be a name or a Controller, got {controller!r}")
        # the dense baseline's setpoint is dense, whatever target it was built with
        self.target = 1.0 if isinstance(self.controller, NoneController) else float(self.controller.target)
        if isinstance(importance, Importance):
            self.importance = importance
        elif isinstance(importance, str):
            self.importance = build_importance(importance, **dict(importance_kwargs or {}))
        else:
            raise TypeError(f"ControlPruning: `importance` must be a name or an Importance, got {importance!r}")
        self.every_n_steps, self.start_step = every_n_steps, start_step
        self.min_width, self.round_to, self.probe_batches = min_width, round_to, probe_batches
        self.ignored_layers = list(ignored_layers)
        self.group_limits = dict(group_limits or {})
        for key, value in self.group_limits.items():
            if not isinstance(key, (str, type)):
                raise TypeError(f"ControlPruning: `group_limits` keys are names or module types, got {key!r}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ControlPruning: `group_limits[{key!r}]` must be an integer >= 1, got {value!r}")
        self.prune_embeddings = bool(prune_embeddings)
        self.groups: list[PrunableGroup] = []
        self.skipped: list[tuple[str, str]] = []
        self.dense_widths: dict[str, int] = {}
        self.ledger = ComputeLedger()
        self.trace: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self._probe: list[Any] = []
        self._meter = FlopMeter(default_loss)
        self._hankel = HankelImportance()  # SSM layers: scores are Hankel singular values
        self._ref_batch = 1
        self._best: float | None = None
        self._jump: float | None = None
        self._last_u = 0.0
        self._last_step = -1
        self._saturated = False  # no further cut possible above the setpoint: stop tracking importance
        self._refresh = False
        self._rollback: dict[str, Any] | None = None  # CompreSSM rollback mode: the event awaiting validation

    # ----------------------------------------------------------------------------------- set-up
    @property
    def state_key(self) -> str:
        return self._generate_state_key(controller=type(self.controller).__name__, target=self.target)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        install_checkpoint_hooks(trainer)  # any stage: validate/test(ckpt_path=...) must rebuild too
        if stage != "fit":
            return
        if trainer.world_size > 1:
            raise RuntimeError(
                f"ControlPruning alone supports a single process (world_size={trainer.world_size}); "
                "distributed training needs the ctprune pruning strategy."
            )
        if pl_module.example_input_array is not None and not self.groups:
            self._discover(pl_module, pl_module.example_input_array)

    def _discover(self, pl_module: L.LightningModule, example: Any) -> None:
        self.groups, self.skipped = discover_groups(pl_module, example, self.ignored_layers, self.min_width,
                                                    round_to=self.round_to, group_limits=self.group_limits,
                                                    prune_embeddings=self.prune_embeddings)
        if not self.groups:
            reasons = "; ".join(f"{n}: {r}" for n, r in self.skipped) or "no Linear, Conv or attention layers found"
            raise ValueError(f"ControlPruning: {type(pl_module).__name__} has nothing prunable ({reasons}).")
        self.dense_widths = self.dense_widths or self.widths(pl_module)
        self.importance.attach(pl_module, self.groups)
        rows = [f"  {g.name:<24} width {g.width(pl_module):>6}  slices: {', '.join(s.module + ':' + s.kind for s in g.slices)}"
                for g in self.groups]
        rows += [f"  {n:<24} dense: {r}" for n, r in self.skipped]
        rank_zero_info("ControlPruning groups (controlled) and layers left dense:\n" + "\n".join(rows))

    def widths(self, pl_module: nn.Module) -> dict[str, int]:
        return {g.name: g.width(pl_module) for g in self.groups}

    # ------------------------------------------------------------------------------ training hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ledger.start_clock()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ledger.stop_clock()
        s = self.summary()
        rank_zero_info(f"ControlPruning: final FLOPs/step {s['flops_fraction']:.3f} of dense, "
                       f"training FLOPs saved {s['train_flops_saved']:.1%}, widths {s['widths']}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.groups:
            self._discover(pl_module, batch[0] if isinstance(batch, (tuple, list)) else batch)
        if len(self._probe) < self.probe_batches:
            self._probe.append(apply_to_collection(batch, Tensor, lambda t: t.detach().clone()))
            if len(self._probe) == 1:
                self._ref_batch = _batch_size(batch)
                if not self.ledger.dense_step_flops:
                    self.ledger.dense_step_flops = self._flops(pl_module)[0]
                self._refresh = True
        if self._refresh:  # first batch, or first batch after a resume
            self._update_saturation(pl_module)
            self._refresh = False
        self.ledger.add_batch(self._flops(pl_module)[0], _batch_size(batch) / self._ref_batch)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self._saturated:
            self.importance.before_optimizer_step(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # accumulating gradients: no optimizer step yet
            return
        self._last_step = step
        if not self._saturated:
            self.importance.after_optimizer_step(pl_module)
        due = step % self.every_n_steps == 0
        if hasattr(self.controller, "due"):  # event-driven controllers (CompreSSM) may ask between intervals
            due = due or self.controller.due(self._progress(trainer))
        if step >= self.start_step and due and len(self._probe) >= self.probe_batches:
            self._control(trainer, pl_module)

    # ------------------------------------------------------------------------------ control loop
    def _flops(self, pl_module: nn.Module) -> tuple[int, dict[str, int]]:
        return self._meter.measure(pl_module, self._probe_on(pl_module, 0), arch_spec(pl_module, self.groups))

    def _probe_on(self, pl_module: nn.Module, i: int) -> Any:
        device = next(pl_module.parameters()).device
        return apply_to_collection(self._probe[i], Tensor, lambda t: t.to(device))

    @staticmethod
    def _progress(trainer: L.Trainer) -> float:
        return min(1.0, trainer.global_step / max(1, trainer.estimated_stepping_batches))

    def _update_saturation(self, pl_module: nn.Module) -> None:
        """Saturated when even the deepest allowed cut (down to the setpoint) changes no width."""
        total, per_module = self._flops(pl_module)
        floor = self.target * self.ledger.dense_step_flops
        widths = self.widths(pl_module)
        self._saturated = widths == plan_widths(widths, per_module, total, self.groups, floor,
                                                self.min_width, self.round_to, floor_flops=floor)

    @torch.no_grad()
    def _probe_loss(self, pl_module: nn.Module) -> float:
        was_training = pl_module.training
        pl_module.eval()
        try:
            losses = [float(default_loss(pl_module, self._probe_on(pl_module, i))) for i in range(len(self._probe))]
            return sum(losses) / len(losses)
        finally:
            pl_module.train(was_training)

    def _control(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dense = self.ledger.dense_step_flops
        total, per_module = self._flops(pl_module)
        compute = total / dense
        loss = self._probe_loss(pl_module)
        best = loss if self._best is None else self._best
        damage = max(0.0, loss - best) / max(best, 1e-12)
        self._best = min(best, loss)
        obs = Observation(step=trainer.global_step, progress=self._progress(trainer), compute=compute,
                          damage=damage, jump=self._jump, last_action=self._last_u)
        u = min(max(0.0, float(self.controller.step(obs))), max(0.0, compute - self.target))
        self._jump, self._last_u = None, 0.0
        widths = self.widths(pl_module)
        rule = None
        if hasattr(self.controller, "rank_event") and self._rollback is None:  # wait for a pending verdict
            rule = self.controller.rank_event(obs)
        if rule is not None:  # CompreSSM event: SSM ranks from the Hankel singular values
            new = self._ssm_ranks(pl_module, widths, rule)
            if new != widths and getattr(self.controller, "rollback", False):
                monitor = trainer.callback_metrics.get(self.controller.rollback_monitor)
                self._rollback = {"snapshot": Snapshot.take(pl_module, trainer.optimizers), "step": obs.step,
                                  "before": None if monitor is None else float(monitor)}
        elif u > 0:
            new = plan_widths(widths, per_module, total, self.groups, (compute - u) * dense, self.min_width,
                              self.round_to, floor_flops=self.target * dense, reference=self.dense_widths)
        else:
            new = widths
        if new != widths:
            plan = {g.name: select_units(self._scores(pl_module, g), new[g.name])
                    for g in self.groups if new[g.name] != widths[g.name]}
            event: dict[str, Any] = {"step": trainer.global_step, "widths": new}
            spectra = {n: self._hankel.spectra[n] for n in plan if n in self._hankel.spectra}
            apply_plan_(pl_module, self.groups, plan, trainer.optimizers)
            self.importance.on_surgery(plan)
            new_compute = self._flops(pl_module)[0] / dense
            self._jump = (self._probe_loss(pl_module) - loss) / max(best, 1e-12)
            self._last_u = compute - new_compute
            self.history.append(event | {"compute": new_compute} | ({"hankel_spectra": spectra} if spectra else {}))
            self._update_saturation(pl_module)
            compute = new_compute
        self.trace.append({"step": trainer.global_step, "progress": obs.progress, "compute": compute,
                           "damage": damage, "action": self._last_u, "requested": u,
                           "widths": self.widths(pl_module)})
        pl_module.log(FLOPS_RATIO, compute, prog_bar=True, on_step=True, on_epoch=False)
        pl_module.log(SAVED, self.ledger.saved, on_step=True, on_epoch=False)
        pl_module.log(DAMAGE, damage, on_step=True, on_epoch=False)
        pl_module.log(ACTION, self._last_u, on_step=True, on_epoch=False)
        pl_module.log(PARAMS, float(sum(p.numel() for p in pl_module.parameters())), on_step=True, on_epoch=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rollback mode: undo the last SSM event if validation got worse, then stop reducing."""
        pending, ctl = self._rollback, self.controller
        if pending is None or trainer.sanity_checking or ctl.rollback_monitor not in trainer.callback_metrics:
            return
        self._rollback = None
        after = float(trainer.callback_metrics[ctl.rollback_monitor])
        if pending["before"] is None or not ctl.worse(pending["before"], after):
            return  # an event before any validation is accepted unchecked
        pending["snapshot"].restore_(pl_module, trainer.optimizers)
        ctl.stopped = True
        self.importance.attach(pl_module, self.groups)  # accumulators follow the restored widths
        compute = self._flops(pl_module)[0] / self.ledger.dense_step_flops
        self.history.append({"step": trainer.global_step, "widths": self.widths(pl_module), "compute": compute,
                             "rollback_to_step": pending["step"], "val_before": pending["before"], "val_after": after})
        self._update_saturation(pl_module)
        rank_zero_info(f"ControlPruning: validation {ctl.rollback_monitor} went {pending['before']:.4f} -> {after:.4f}; "
                       f"rolled back the reduction of step {pending['step']} and stopped reducing")

    def _scores(self, pl_module: nn.Module, group: PrunableGroup) -> Tensor:
        """SSM state groups are ranked by their Hankel singular values, every other group by the importance."""
        if group.unit == "state":
            return self._hankel.scores(pl_module, group)
        return self.importance.scores(pl_module, group)

    def _ssm_ranks(self, pl_module: nn.Module, widths: dict[str, int], rule: Mapping[str, Any]) -> dict[str, int]:
        """Widths with each SSM group at the rank that ``rule`` (mode, tau, fraction, gate) gives it."""
        states = [g for g in self.groups if g.unit == "state"]
        hsvs = {g.name: self._scores(pl_module, g) for g in states}
        ranks = plan_lru_ranks(pl_module, hsvs=hsvs, min_rank=self.min_width, **dict(rule))
        return {**widths, **{n: r for n, r in ranks.items() if n in hsvs}}

    # ---------------------------------------------------------------------------- state and report
    def summary(self) -> dict[str, Any]:
        """Plain-Python report of the run so far (what train.py writes to summary.json)."""
        dense = self.ledger.dense_step_flops
        last = self.trace[-1]["widths"] if self.trace else dict(self.dense_widths)
        final = self.history[-1]["compute"] if self.history else 1.0
        return {
            "controller": type(self.controller).__name__,
            "importance": getattr(self.importance, "name", type(self.importance).__name__),
            "target": self.target,
            "widths": last,
            "dense_widths": dict(self.dense_widths),
            "dense_step_flops": dense,
            "flops_fraction": final,
            "train_flops": self.ledger.train_flops,
            "dense_train_flops": self.ledger.dense_train_flops,
            "train_flops_saved": self.ledger.saved,
            "train_time_s": self.ledger.train_time_s,
            "steps": self._last_step,
            "surgeries": len(self.history),
            "history": list(self.history),
            "trace": list(self.trace),
        }

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CTPRUNE_KEY] = make_spec(pl_module, self.history)

    def state_dict(self) -> dict[str, Any]:
        return {
            "probe": [apply_to_collection(b, Tensor, lambda t: t.cpu()) for b in self._probe],
            "ref_batch": self._ref_batch,
            "last_step": self._last_step,
            "controller": self.controller.state_dict(),
            "importance": self.importance.state_dict(),
            "ledger": self.ledger.state_dict(),
            "trace": list(self.trace),
            "history": list(self.history),
            "dense_widths": dict(self.dense_widths),
            "best": self._best,
            "jump": self._jump,
            "last_u": self._last_u,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.controller.load_state_dict(state_dict.get("controller", {}))
        self.importance.load_state_dict(state_dict.get("importance", {}))
        self.ledger.load_state_dict(state_dict.get("ledger", {}))
        self.trace = list(state_dict.get("trace", []))
        self.history = list(state_dict.get("history", []))
        self.dense_widths = dict(state_dict.get("dense_widths", {}))
        self._best = state_dict.get("best")
        self._jump = state_dict.get("jump")
        self._last_u = float(state_dict.get("last_u", 0.0))
        self._probe = list(state_dict.get("probe", []))
        self._ref_batch = int(state_dict.get("ref_batch", 1))
        self._last_step = int(state_dict.get("last_step", -1))
        self._refresh = bool(self._probe)
