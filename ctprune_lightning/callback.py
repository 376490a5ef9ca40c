"""ControlPruning: shrink a LightningModule physically while it trains, under feedback control.

Every ``every_n_steps`` optimizer steps the callback runs one step of the
:class:`~ctprune_lightning.loop.ControlLoop` -- sense (compute fraction, loss damage on fixed probe
batches), decide (the controller's action, planned into kept units by the importance) -- and
actuates the plan at the optimizer-step boundary: directly on a single device, or through a pruning
strategy (:mod:`ctprune_lightning.strategy`) that applies rank 0's plan on every rank and re-wraps
DDP / re-shards FSDP2. This module only adapts Lightning's hooks, logging and checkpoint state.

Example::

    trainer = L.Trainer(callbacks=[ControlPruning(controller="lqr", target=0.3)])
    trainer.fit(model, datamodule)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from .checkpoint import CTPRUNE_KEY, install_checkpoint_hooks, make_spec
from .compiled import CompileWatch, eager, is_compiled
from .controllers import Controller, build_controller
from .controllers.base import check_number
from .cost import AUTO, auto_round_to, check_cost, check_round_to, precision_dtype
from .importance import Importance, build_importance
from .loop import BUDGET_METRICS, ControlLoop, default_loss
from .loop_planning import CONFIRM_BATCHES
from .probe import CallInputs, capture_network_call
from .reading import check_sense_budget
from .rollback import Snapshot
from .sensing import check_persistence_prior
from .shadows import follow_, shadow_models
from .strategy import PruningStrategy, require_pruning_strategy
from .surgery.mha import convert_multihead_attention_

# Metric keys (logged through Lightning, so W&B / CSV / the progress bar all get them).
FLOPS_RATIO = "ctprune/flops_ratio"
SAVED = "ctprune/saved"
DAMAGE = "ctprune/damage"
ACTION = "ctprune/action"
PARAMS = "ctprune/params"
FINAL_DAMAGE = "ctprune/final_damage"  # with a quality budget: the predicted damage at the end of training
DAMAGE_STD = "ctprune/damage_std"
FINAL_STD = "ctprune/final_std"  # the standard deviation of the predicted final damage
BUDGET = "ctprune/budget"
REFERENCE = "ctprune/reference"  # the estimated dense probe loss now

DEFAULT_TARGET = 0.3
PROBE_DATA = ("auto", "train", "val")  # where the probe loss is measured ("auto": validation data for a budget)

__all__ = ["ACTION", "BUDGET", "DAMAGE", "DAMAGE_STD", "FINAL_DAMAGE", "FINAL_STD", "FLOPS_RATIO", "PARAMS",
           "REFERENCE", "SAVED", "ControlPruning", "default_loss"]


class ControlPruning(Callback):
    """Closed-loop structured pruning during training.

    Args:
        controller: a name (``none``, ``gmp``, ``linear``, ``pid``, ``lqr``, ``hankel``) or a
            :class:`~ctprune_lightning.controllers.Controller`.
        target: compute setpoint ``c*``: FLOPs per step of the final net ÷ dense, in ``(0, 1]``
            (default 0.3); with a Controller instance, omit it or pass the instance's own target.
        importance: ``magnitude``, ``taylor``, ``trajectory``, ``auto`` (the default) or an :class:`Importance`.
            ``auto`` is ``taylor`` with a quality budget and ``trajectory`` at a compute target. A budget sizes each
            cut by its immediate jump, which Taylor's first-order score estimates. Its short memory (~10 steps) lets
            the loop track only the intervals within it before each reading. On the MLP, over 9 seeds, that saved
            +3.7 ± 2.9 points more than the trajectory (7 of 9 seeds up) with a quarter of the tracking time
            (``experiments/results/suite/loop_2026-12-07.md``).
        every_n_steps: optimizer steps per control interval.
        start_step: no cut before this optimizer step.
        min_width: no group narrower than this.
        round_to: widths are multiples of this (hardware-friendly), unless ``min_width`` binds; ``"auto"``:
            the alignment for the trainer's device and precision (:func:`ctprune_lightning.cost.auto_round_to`).
        ignored_layers: qualified module names (prefixes) or module types left dense.
        controller_kwargs / importance_kwargs: passed to the builder when given by name.
        probe_batches: number of batches kept to measure the loss damage.
        probe_data: where those batches come from: ``"train"`` (the first training batches), ``"val"``
            (the first validation batches: held-out data, as the quality the user keeps is judged), or
            ``"auto"`` (the default: validation batches for a ``quality_budget`` when the trainer has
            validation data, training batches otherwise). FLOPs are always counted on training batches.
        group_limits: ``{group name, name prefix or module type: minimum width}`` (heads count as
            units of a head group).
        prune_embeddings: also cut embedding / residual widths (never the vocabulary or the output).
        quality_budget: the quality the user gives up instead of a compute target: the relative excess
            of the probe loss (held-out batches, see ``probe_data``) at the end of training over what the
            dense run would reach (e.g. 0.01); ``target`` becomes the compute floor. Needs
            ``controller="lqr"`` or ``"pid"``, which then control the budget slack measured by
            :mod:`ctprune_lightning.sensing`.
        budget_metric: ``"loss"`` (the default, as above) or ``"error"``: the budget is then the absolute
            excess of the probe's error rate (``quality_budget=0.003``: 0.3 points of accuracy). One
            wrong sample is ``1 / probe samples`` of error, so give it enough ``probe_batches`` to
            resolve the budget (e.g. 8 batches of 256 for 0.3 points).
        error_fn: ``error_fn(module, batch) -> error rate`` for ``budget_metric="error"`` (default:
            ``compute_error(batch)`` when the module defines it, else argmax of ``module(x)`` against
            integer labels ``y``; see :func:`ctprune_lightning.probe.step_error`).
        convert_attention: replace every ``nn.MultiheadAttention`` by the drop-in
            :class:`~ctprune_lightning.surgery.mha.PrunableMultiheadAttention` at ``setup`` (same forward,
            same state-dict names) so its heads can be cut; ``False`` leaves them dense.
        cost: what the controller's compute is: ``"flops"`` (FLOPs per step ÷ dense, the default) or ``"time"``
            (the measured cost model's modelled time per step ÷ dense); the summary reports both when a cost
            model is measured.
        cost_model: measure a cost model on the first batch (:mod:`ctprune_lightning.cost`: each group's step
            time at a ladder of widths): the planner then keeps to each group's cost frontier, and a plan not
            modelled faster than dense is not cut. ``None`` (default): measured when ``cost="time"``.
        cost_kwargs: settings of :func:`~ctprune_lightning.cost.measure_cost` (``max_seconds``, ``points``,
            ``repeats``, ``warmup``, ``cache_dir``).
        sense_budget: the most that reading the model may cost, as a share of the training FLOPs: the forwards
            of the probe readings and the trial cuts (``sensing_flops`` in the summary; their wall-clock is in
            ``control_time_parts``), e.g. ``0.03``. An interval over it is skipped as a hold whose trace row says
            why (the first interval always reads; a controller's own events still run). Counted in FLOPs, so the
            decisions do not depend on the machine's speed. ``None`` (default): read at every interval. The
            Hydra configs set 0.03.
        persistence_prior: with a quality budget, the damage sensor's prior on the share of a cut's immediate
            jump still there at the end of training: some of ``{"mean", "std", "spread"}`` (the shared mean's
            prior, one cut's departure from it), the rest from
            :data:`~ctprune_lightning.sensing.PERSISTENCE_PRIOR` (``None``: all). Where the readings cannot tell
            a cut's recovery (a small cut under a noisy probe), the loop spends the budget by this prior: a task
            known to recover (a wide over-parameterised net) can say ``{"mean": 0.2}``.
        confirm_batches: with a quality budget and held-out probe batches, this many more validation batches are
            kept, and a cut sized by trial is read on them before it is made: when its jump there exceeds the
            allowance by more than 2 of that read's errors, the cut scaled down to that read is read there once and
            made if it fits, else none (a hold, with the reason in the trace). The
            probe's own batches can miss a cut's damage (it falls on a few samples) and the trial then takes the
            largest cut they read as free. Their forwards count as sensing. 0: no check.

    Any LightningModule works as it is: the probe loss is ``compute_loss(batch)`` when the module
    defines it, else its own ``training_step`` (logging silenced, metric states restored); the layers
    are traced with ``example_input_array`` when set, else with the inputs that ``training_step``
    passes to its network on the first batch (see :mod:`ctprune_lightning.probe`).
    """

    def __init__(
        self,
        controller: str | Controller = "lqr",
        target: float | None = None,
        importance: str | Importance = "auto",
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
        convert_attention: bool = True,
        quality_budget: float | None = None,
        probe_data: str = "auto",
        budget_metric: str = "loss",
        error_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        cost: str = "flops",
        cost_model: bool | None = None,
        cost_kwargs: Mapping[str, Any] | None = None,
        sense_budget: float | None = None,
        persistence_prior: Mapping[str, float] | None = None,
        confirm_batches: int = CONFIRM_BATCHES,
    ) -> None:
        super().__init__()
        if probe_data not in PROBE_DATA:
            raise ValueError(f"ControlPruning: `probe_data` must be one of {', '.join(PROBE_DATA)}, got {probe_data!r}")
        if budget_metric not in BUDGET_METRICS:
            raise ValueError(f"ControlPruning: `budget_metric` must be one of {', '.join(BUDGET_METRICS)}, "
                             f"got {budget_metric!r}")
        self.probe_data, self.budget_metric = probe_data, budget_metric
        try:
            check_round_to(round_to)
            check_cost(cost)
            check_sense_budget(sense_budget)
            check_persistence_prior(persistence_prior)
        except ValueError as err:
            raise ValueError(f"ControlPruning: {err}") from None
        if cost == "time" and cost_model is False:
            raise ValueError("ControlPruning: cost='time' reads the measured cost model; cost_model=False turns it off")
        measure = cost_model if cost_model is not None else cost == "time"
        for name, value, low in (("every_n_steps", every_n_steps, 1), ("start_step", start_step, 0),
                                 ("min_width", min_width, 1), ("probe_batches", probe_batches, 1),
                                 ("confirm_batches", confirm_batches, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ControlPruning: `{name}` must be an integer >= {low}, got {value!r}")
        if isinstance(controller, Controller):
            if target is not None and float(target) != float(controller.target):
                raise ValueError(f"ControlPruning: target={target!r} disagrees with the given controller's target "
                                 f"{controller.target!r}; pass one of them (or the same value)")
            self.controller = controller
        elif isinstance(controller, str):
            target = check_number("target", DEFAULT_TARGET if target is None else target, 0.0, 1.0, low_open=True)
            self.controller = build_controller(controller, target, **dict(controller_kwargs or {}))
        else:
            raise TypeError(f"ControlPruning: `controller` must be a name or a Controller, got {controller!r}")
        if quality_budget is not None:  # the feedback controllers' budget mode (a Controller built with one agrees)
            if self.controller.budget is None:
                self.controller.set_budget(quality_budget)
            elif float(self.controller.budget) != float(quality_budget):
                raise ValueError(f"ControlPruning: quality_budget={quality_budget!r} disagrees with the controller's "
                                 f"budget {self.controller.budget!r}; pass one of them (or the same value)")
        if budget_metric != "loss" and self.controller.budget is None:
            raise ValueError(f"ControlPruning: budget_metric={budget_metric!r} needs a quality_budget "
                             "(e.g. quality_budget=0.003 for 0.3 points of error)")
        if isinstance(importance, Importance):
            self.importance = importance
        elif isinstance(importance, str):
            if importance == "auto":
                importance = "taylor" if self.controller.budget is not None else "trajectory"
            self.importance = build_importance(importance, **dict(importance_kwargs or {}))
        else:
            raise TypeError(f"ControlPruning: `importance` must be a name or an Importance, got {importance!r}")
        self.every_n_steps, self.start_step = every_n_steps, start_step
        self.min_width, self.round_to, self.probe_batches = min_width, round_to, probe_batches
        self.confirm_batches = confirm_batches
        self.ignored_layers = list(ignored_layers)
        bad = [x for x in self.ignored_layers if not isinstance(x, (str, type))]
        if bad:
            raise TypeError(f"ControlPruning: `ignored_layers` takes module names or types, got {bad!r}")
        self.group_limits = dict(group_limits or {})
        for key, value in self.group_limits.items():
            if not isinstance(key, (str, type)):
                raise TypeError(f"ControlPruning: `group_limits` keys are names or module types, got {key!r}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ControlPruning: `group_limits[{key!r}]` must be an integer >= 1, got {value!r}")
        self.prune_embeddings = bool(prune_embeddings)
        self.convert_attention = bool(convert_attention)
        self.loop = ControlLoop(self.controller, self.importance, self.controller.target, min_width=min_width,
                                round_to=round_to, probe_batches=probe_batches, cost=cost,
                                cost_kwargs=dict(cost_kwargs or {}) if measure else None,
                                sense_budget=sense_budget, persistence_prior=persistence_prior,
                                **({"error_fn": error_fn} if error_fn is not None else {}))
        self.target = self.loop.target  # the dense baseline's setpoint is dense, whatever it was built with
        self._last_step = -1
        self._tracked = False  # the importance opened the current optimizer step (closed after it)
        self._refresh = False
        self._rollback: dict[str, Any] | None = None  # CompreSSM rollback mode: the event awaiting validation
        self._warned_shadow = False
        self._model: weakref.ref | None = None  # the model this callback's state belongs to
        self._train_loss: list[Any] = []  # the budget sensor's training channel: losses since the last interval
        self._train_since = 0  # ... from this optimizer step on
        self.compile_watch = CompileWatch()  # torch.compile: re-specialise after each surgery, count the cost

    # the loop's state, under the names users and reports read
    groups = property(lambda self: self.loop.groups)
    skipped = property(lambda self: self.loop.skipped)
    dense_widths = property(lambda self: self.loop.dense_widths)
    ledger = property(lambda self: self.loop.ledger)
    trace = property(lambda self: self.loop.trace)
    history = property(lambda self: self.loop.history)

    def widths(self, pl_module: nn.Module) -> dict[str, int]:
        return self.loop.widths(pl_module)

    # ----------------------------------------------------------------------------------- set-up
    @property
    def state_key(self) -> str:
        return self._generate_state_key(controller=type(self.controller).__name__, target=self.target)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._refuse_fit(trainer, pl_module)  # before anything is touched
        built_late = is_overridden("configure_model", pl_module)  # layers that exist only after every setup hook
        if stage == "fit" and built_late and not is_overridden("setup", pl_module):
            # build them now, in the contexts Lightning uses (the hook is idempotent by Lightning's contract; its
            # own WeightAveraging does the same). A module with its own `setup` may build from what that sets:
            # its layers are left to Lightning and discovered on the first batch
            with trainer.strategy.tensor_init_context(), trainer.strategy.model_sharded_context(), \
                    trainer.precision_plugin.module_init_context():
                pl_module.configure_model()
            built_late = False
        if self.convert_attention and not self.groups:  # before the optimizer exists and any checkpoint loads
            converted = convert_multihead_attention_(pl_module)
            if converted:
                rank_zero_info(f"ControlPruning: nn.MultiheadAttention -> PrunableMultiheadAttention in {converted}")
        install_checkpoint_hooks(trainer)  # any stage: validate/test(ckpt_path=...) must rebuild too
        if stage != "fit":
            return
        self._model = weakref.ref(pl_module)
        self.compile_watch.install()
        self.compile_watch.compiled = self.compile_watch.compiled or is_compiled(pl_module)
        strategy = trainer.strategy
        self.loop.reduce_mean = lambda x: float(strategy.reduce(torch.tensor(float(x)), reduce_op="mean"))
        self.loop.world_size = trainer.world_size
        if isinstance(strategy, PruningStrategy):
            self.loop.flop_view = strategy.flop_view
        if self.loop.round_to == AUTO:  # the model is not on its device yet: the trainer's device and precision
            self.loop.round_to = auto_round_to(strategy.root_device.type, precision_dtype(trainer.precision))
            rank_zero_info(f"ControlPruning: round_to='auto' -> {self.loop.round_to} "
                           f"({strategy.root_device.type}, {trainer.precision})")
        self.loop.cost_context = trainer.precision_plugin.forward_context  # the cost model times autocast steps
        materialized = not built_late and all(not p.is_meta for p in pl_module.parameters())  # else: first batch
        if pl_module.example_input_array is not None and not self.groups and materialized:
            with self._eager(pl_module):
                self._discover(pl_module, pl_module.example_input_array)

    def _refuse_fit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Raise for a fit this callback cannot run: another model than the one its state belongs to, a strategy
        that cannot re-wrap a cut model, Lightning's mask pruning beside a controller that cuts."""
        if self._model is not None and self._model() is not pl_module:
            raise ValueError(f"ControlPruning: this callback already pruned another model "
                             f"({type(self._model()).__name__ if self._model() is not None else 'freed'}); its groups, "
                             f"schedule and ledger belong to that run. Create a new ControlPruning for each model "
                             f"(a resume restores its state from the checkpoint: ckpt_path=...)")
        cuts = self.controller.name != "none"
        require_pruning_strategy(trainer.strategy, trainer.world_size, cuts=cuts)
        masking = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, ModelPruning)]
        if cuts and masking:  # it re-parametrises `weight` as weight_orig * weight_mask: a cut would fight its hook
            raise ValueError(f"ControlPruning cannot cut a model that {masking[0]} (Lightning's mask pruning) also "
                             "prunes: use one of the two, or ControlPruning(controller='none') to only measure")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.compile_watch.close()

    def _eager(self, pl_module: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """Measurements (probe, FLOPs, tracing) run eagerly: no compilation for their eval/no-grad variants."""
        return eager(pl_module) if self.compile_watch.compiled else contextlib.nullcontext()

    @torch.no_grad()
    def _network_call(self, pl_module: L.LightningModule, batch: Any) -> CallInputs:
        """The call ``training_step`` makes to its network on ``batch`` (recorded in eval mode)."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            call = capture_network_call(pl_module, lambda: self.loop.loss_fn(pl_module, batch))
        finally:
            pl_module.train(was_training)
        if call is None:
            raise ValueError(f"ControlPruning: {type(pl_module).__name__}'s loss on the first batch called no "
                             "module with parameters; set `example_input_array` or define `compute_loss(batch)`")
        return call

    def _discover(self, pl_module: L.LightningModule, example: Any) -> None:
        with self.loop.flop_view(pl_module):  # FSDP2: trace plain stand-ins of the shards
            self.loop.discover(pl_module, example, self.ignored_layers, self.group_limits, self.prune_embeddings)
        rows = [f"  {g.name:<24} width {g.width(pl_module):>6}  slices: {', '.join(s.module + ':' + s.kind for s in g.slices)}"
                for g in self.groups]
        rows += [f"  {n:<24} dense: {r}" for n, r in self.skipped]
        rank_zero_info("ControlPruning groups (controlled) and layers left dense:\n" + "\n".join(rows))

    # ------------------------------------------------------------------------------ training hooks
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.compile_watch.clear(pl_module)  # undo "skip" marks of set-up under FlopCounterMode (ModelSummary)
        self.ledger.start_clock()
        self._train_loss, self._train_since = [], trainer.global_step  # a resume starts the channel's mean afresh
        if self.controller.budget is not None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("ControlPruning: a quality_budget is judged at the end of training; give the "
                                 "Trainer a finite schedule (max_epochs or max_steps)")
            self.loop.start_budget(int(total), self.every_n_steps, metric=self.budget_metric)
        if not self.loop.held_out and (self.probe_data == "val" or (self.probe_data == "auto" and self.loop.estimator)):
            self._hold_out(trainer, pl_module)

    def _hold_out(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the first validation batches as the probe (``probe_data``); "auto" falls back to training ones."""
        loaders = trainer.val_dataloaders
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        confirm = self.confirm_batches if self.loop.estimator is not None else 0  # checks a budget's cuts
        batches = list(itertools.islice(loaders, self.probe_batches + confirm)) if loaders is not None else []
        try:
            if not batches:
                raise ValueError("the trainer has no validation batches (no val_dataloader, or limit_val_batches=0)")
            if confirm and len(batches) < self.probe_batches + confirm:
                rank_zero_warn(f"ControlPruning: confirm_batches={confirm}, but the validation data has only "
                               f"{max(len(batches) - self.probe_batches, 0)} batches beyond the {self.probe_batches} "
                               "probe batches: the sized cuts are checked on those")
            with self._eager(pl_module):
                self.loop.set_held_out(pl_module, batches[:self.probe_batches], batches[self.probe_batches:])
        except ValueError as err:
            if self.probe_data == "val":
                raise ValueError(f"ControlPruning: probe_data='val': {err}") from err
            rank_zero_warn(f"ControlPruning: {err}; the budget sensor reads training batches instead")

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ledger.stop_clock()
        s = self.summary()
        modelled = "" if s["time_fraction"] is None else f", modelled time/step {s['time_fraction']:.3f} of dense"
        rank_zero_info(f"ControlPruning: final FLOPs/step {s['flops_fraction']:.3f} of dense{modelled}, "
                       f"training FLOPs saved {s['train_flops_saved']:.1%}, widths {s['widths']}")

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        with self.ledger.overhead("batch"), self._eager(pl_module):
            self._sense_batch(pl_module, batch)

    def _sense_batch(self, pl_module: L.LightningModule, batch: Any) -> None:
        if not self.groups:
            self._discover(pl_module, self._network_call(pl_module, batch))
        if not self.loop.ready:
            first = not self.loop.probe
            self.loop.add_probe(pl_module, batch)
            self._refresh = self._refresh or first
        if self._refresh:  # first batch, or first batch after a resume
            self.loop.update_saturation(pl_module)
            self._refresh = False
        self.loop.count_batch(pl_module, batch)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # The importance is accumulated only where a decision can use it: from one control interval before
        # `start_step` (each cut restarts it anyway) until no further cut is possible, and not where a budget's next
        # reading cannot come (a backoff's gap, the sensing budget spent until the end).
        self._tracked = self.loop.tracking(trainer.global_step) and \
            trainer.global_step + self.every_n_steps >= self.start_step
        if self._tracked:
            with self.ledger.overhead("importance"):
                self.importance.before_optimizer_step(pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # accumulating gradients: no optimizer step yet
            return
        self._last_step = step
        if self.loop.estimator is not None and self.loop.budget_metric == "loss" and not self.loop.idle:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                self._train_loss.append(loss.detach())
        if self._tracked:  # the step the before-hook opened, closed here
            self._tracked = False
            with self.ledger.overhead("importance"):
                self.importance.after_optimizer_step(pl_module)
        with self.ledger.overhead():
            event = self.controller.due(self._progress(trainer))
            if step >= self.start_step and (event or step % self.every_n_steps == 0) and self.loop.ready:
                unread = "" if event else self.loop.sensing_due(step)
                unread = trainer.strategy.broadcast(unread, src=0)  # every rank reads, or none
                with self._eager(pl_module):
                    if unread and self.controller.budget is not None:  # a budget cuts only on a reading (trial)
                        self.loop.observe_training(step, *self._train_channel(trainer))  # the free channel still
                        self._log(pl_module, self.loop.record_skip(pl_module, step, self._progress(trainer), unread))
                    else:  # a compute target keeps its pace on the last reading
                        self._control(trainer, pl_module, unread)
                if self.controller.budget is not None:  # track the importance only up to a reading (rank 0's answer)
                    expect = self.loop.expect_reading(pl_module, step, trainer.accumulate_grad_batches)
                    self.loop.read_next = trainer.strategy.broadcast(expect, src=0)

    # ------------------------------------------------------------------------------ control step
    @staticmethod
    def _progress(trainer: L.Trainer) -> float:
        return min(1.0, trainer.global_step / max(1, trainer.estimated_stepping_batches))

    def _actuate(self, trainer: L.Trainer, fn: Callable[[nn.Module, Sequence[Any]], None]) -> None:
        """Run a surgery on every rank: through the pruning strategy when distributed, else in place."""
        if isinstance(trainer.strategy, PruningStrategy):
            trainer.strategy.actuate_(fn)
        else:
            fn(trainer.lightning_module, trainer.optimizers)

    def _follow_in_shadows(self, trainer: L.Trainer, keep: Mapping[str, Sequence[int]] | None = None) -> None:
        """Cut the model copies other callbacks keep (weight averaging) like the live model (:mod:`.shadows`)."""
        plan = {name: torch.tensor(idx, dtype=torch.long) for name, idx in (keep or {}).items()}
        for shadow in shadow_models(trainer.callbacks):
            with self.ledger.overhead("surgery"):
                restarted = follow_(shadow, trainer.lightning_module, self.groups, plan)
            if restarted and not self._warned_shadow:
                self._warned_shadow = True
                rank_zero_info(f"ControlPruning: the averaged model copy restarts the average of {len(restarted)} "
                               f"tensors the surgery could not mirror (e.g. {restarted[0]}: grown units, a rollback)")

    def _train_channel(self, trainer: L.Trainer) -> tuple[float | None, float | None, int | None]:
        """The mean training loss since the last interval (averaged over ranks), the learning rate now, and the
        optimizer steps that mean covers."""
        if self.loop.estimator is None:
            return None, None, None
        span = trainer.global_step - self._train_since
        self._train_since = trainer.global_step
        mean = float(torch.stack(self._train_loss).float().mean()) if self._train_loss else math.nan
        self._train_loss = []
        mean = self.loop.reduce_mean(mean)
        lr = trainer.optimizers[0].param_groups[0].get("lr") if trainer.optimizers else None
        return (mean if math.isfinite(mean) else None), (None if lr is None else float(lr)), (span or None)

    def _control(self, trainer: L.Trainer, pl_module: L.LightningModule, unread: str = "") -> None:
        train_loss, lr, span = self._train_channel(trainer)
        obs = self.loop.observe(pl_module, trainer.global_step, self._progress(trainer), train_loss, lr, unread, span)
        plan = self.loop.decide(pl_module, obs, events_allowed=self._rollback is None)
        plan = trainer.strategy.broadcast(plan, src=0)  # rank 0's plan is the one every rank applies
        if plan.keep or plan.grow:
            if plan.snapshot:
                monitor = trainer.callback_metrics.get(self.controller.rollback_monitor)
                self._rollback = {"snapshot": Snapshot.take(pl_module, trainer.optimizers), "step": obs.step,
                                  "before": None if monitor is None else float(monitor)}
            self._actuate(trainer, lambda model, optimizers: self.loop.apply_(model, plan, optimizers))
            self._follow_in_shadows(trainer, plan.keep)
            self.compile_watch.after_surgery(trainer.lightning_module)
        row = self.loop.record(pl_module, obs, plan)
        self._log(pl_module, row)

    def _log(self, pl_module: L.LightningModule, row: Mapping[str, Any]) -> None:
        """One control interval's values: to every logger at this step, and into ``callback_metrics`` (for
        checkpoint monitors and other callbacks). Only the progress bar's goes through ``self.log``: each call costs
        ~1 ms on a CPU (Lightning's result metric), and a value logged off its ``log_every_n_steps`` steps never
        reaches the logger; written directly, every interval does, at a third of the cost."""
        values = {FLOPS_RATIO: float(row["compute"]), SAVED: float(self.ledger.saved), DAMAGE: float(row["damage"]),
                  ACTION: float(row["action"]), PARAMS: float(sum(p.numel() for p in pl_module.parameters()))}
        for key, name in ((FINAL_DAMAGE, "final_damage"), (FINAL_STD, "final_std"), (DAMAGE_STD, "damage_std"),
                          (REFERENCE, "reference"), (BUDGET, "budget")):
            if row.get(name) is not None and math.isfinite(row[name]):
                values[key] = float(row[name])
        pl_module.log(FLOPS_RATIO, values[FLOPS_RATIO], prog_bar=True, on_step=True, on_epoch=False)
        trainer = pl_module.trainer
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        for logger in trainer.loggers if trainer.is_global_zero else ():
            logger.log_metrics(values, step=trainer.global_step)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rollback mode: undo the last SSM event if validation got worse, then stop reducing."""
        pending, ctl = self._rollback, self.controller
        if pending is None or trainer.sanity_checking or ctl.rollback_monitor not in trainer.callback_metrics:
            return
        self._rollback = None
        after = float(trainer.callback_metrics[ctl.rollback_monitor])
        if pending["before"] is None or not ctl.worse(pending["before"], after):
            return  # an event before any validation is accepted unchecked
        self._actuate(trainer, lambda model, optimizers: pending["snapshot"].restore_(model, optimizers))
        self._follow_in_shadows(trainer)
        self.compile_watch.after_surgery(trainer.lightning_module)
        self.loop.record_rollback(pl_module, trainer.global_step, pending["step"], pending["before"], after)
        rank_zero_info(f"ControlPruning: validation {ctl.rollback_monitor} went {pending['before']:.4f} -> {after:.4f}; "
                       f"rolled back the reduction of step {pending['step']} and stopped reducing")

    # ---------------------------------------------------------------------------- state and report
    def summary(self) -> dict[str, Any]:
        """Plain-Python report of the run so far (what train.py writes to summary.json); ``left_dense`` is
        ``{layer: why}`` for every layer discovery left dense."""
        return (self.loop.summary(steps=self._last_step) | {"left_dense": dict(self.skipped)}
                | self.compile_watch.summary())

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CTPRUNE_KEY] = make_spec(pl_module, self.history)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.loop.state_dict() | {"last_step": self._last_step, "compile": self.compile_watch.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loop.load_state_dict(state_dict)
        self._last_step = int(state_dict.get("last_step", -1))
        self.compile_watch.load_state_dict(state_dict.get("compile", {}))
        self._refresh = bool(self.loop.probe)
