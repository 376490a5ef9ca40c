"""Pruning strategies: apply the same surgery on every rank of a DDP or FSDP2 run, mid-training.

The callback decides a plan on every rank from identical (all-reduced) inputs and broadcasts rank 0's,
so every rank applies the same one. A pruning strategy then runs the surgery with the protocol that
keeps the ranks identical:

1. unwrap: DDP's module as it is; FSDP2 modules are gathered (``full_tensor()``) into plain modules,
   their optimizer moments too;
2. actuate the surgery on the plain module, with the optimizer slots swapped and sliced
   (:mod:`ctprune_lightning.surgery.optim`);
3. agree: every rank reports success or its error through a collective, so a surgery that raises on
   one rank ends the run on every rank with that error, never a hang;
4. re-wrap: a fresh DDP reducer over the new Parameters; FSDP2 ``fully_shard`` again with the same
   policy, the moments re-distributed as DTensors on the new shards;
5. verify: the architecture hash is all-gathered and must be equal on all ranks.

Statistics: DDP gradients are all-reduced before the optimizer step, so the importance accumulators
(computed from synchronised gradients and identical parameters) agree on every rank without another
collective; under FSDP2 the importance reads full tensors (``full_tensor()``, a collective that every
rank runs in the same order). The probe loss is averaged over ranks by the callback.

Example::

    trainer = L.Trainer(strategy="ctprune_ddp", accelerator="cpu", devices=2,
                        callbacks=[ControlPruning(controller="lqr", target=0.3)])
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy, StrategyRegistry
from torch import Tensor, nn

from .surgery.arch import apply_arch_, capture_arch
from .surgery.optim import optimizer_params, swap_in_optimizers_

Surgery = Callable[[nn.Module, Sequence[Any]], None]

__all__ = ["PruningDDPStrategy", "PruningFSDPStrategy", "PruningStrategy", "SurgeryError", "arch_hash",
           "require_pruning_strategy"]


class SurgeryError(RuntimeError):
    """A surgery failed on at least one rank (raised on every rank, naming the ranks and errors)."""


def arch_hash(model: nn.Module) -> str:
    """A short hash of every module's sizes and tensor shapes (equal iff the architectures are)."""
    return hashlib.sha1(json.dumps(capture_arch(model), sort_keys=True).encode()).hexdigest()[:16]


def _all_gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class PruningStrategy:
    """Mixin for Lightning strategies that can change the model's shapes mid-training.

    Subclasses implement :meth:`_unwrap_` (make the LightningModule's Parameters plain, optimizer
    slots included) and :meth:`_rewrap_` (wrap or shard again).
    """

    #: architecture hashes after each surgery, ``[[rank 0, rank 1, ...], ...]`` (for tests and logs)
    surgery_hashes: list[list[str]]

    def actuate_(self, surgery: Surgery) -> None:
        """Run ``surgery(lightning_module, optimizers)`` on every rank under the protocol above."""
        model = self.lightning_module  # type: ignore[attr-defined]
        optimizers = self.optimizers  # type: ignore[attr-defined]
        error: str | None = None
        try:
            self._unwrap_(model, optimizers)
            surgery(model, optimizers)
        except Exception as err:  # noqa: BLE001 - reported to every rank below, then raised
            error = f"{type(err).__name__}: {err}"
        errors = _all_gather(error)
        if any(e is not None for e in errors):
            detail = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None)
            raise SurgeryError(f"ControlPruning: surgery failed ({detail}); the run stops on every rank")
        self._rewrap_(model, optimizers)
        hashes = _all_gather(arch_hash(model))
        if not hasattr(self, "surgery_hashes"):
            self.surgery_hashes = []
        self.surgery_hashes.append(hashes)
        if len(set(hashes)) != 1:
            raise SurgeryError(f"ControlPruning: ranks hold different architectures after a surgery: {hashes}")

    def flop_view(self, model: nn.Module) -> ContextManager[Any]:
        """A context in which ``model`` can be run for FLOP counting on this rank alone."""
        return nullcontext(model)

    def _unwrap_(self, model: nn.Module, optimizers: Sequence[Any]) -> None:
        """Make ``model``'s Parameters plain tensors the surgery can cut (no-op by default)."""

    def _rewrap_(self, model: nn.Module, optimizers: Sequence[Any]) -> None:
        """Wrap or shard ``model`` again after the surgery."""


class PruningDDPStrategy(PruningStrategy, DDPStrategy):
    """:class:`~lightning.pytorch.strategies.DDPStrategy` that re-wraps DDP after each surgery.

    Takes DDPStrategy's arguments. The surgery cuts ``ddp.module`` (the LightningModule itself);
    re-wrapping builds a fresh reducer over the new Parameters (DDP's constructor also checks that
    every rank's shapes agree and broadcasts rank 0's values).
    """

    def _rewrap_(self, model: nn.Module, optimizers: Sequence[Any]) -> None:
        if self.model is not model:  # fitting: self.model is the DDP wrapper
            self.model = self._setup_model(model)
            self._register_ddp_hooks()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (("ctprune_ddp", "popen"), ("ctprune_ddp_spawn", "spawn")):
            strategy_registry.register(name, cls, description=f"ctprune pruning DDP ('{start_method}')",
                                       start_method=start_method, override=True)


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _distribute_state(state: dict, old: Tensor, new: Tensor) -> dict:
    """Optimizer state of a full Parameter ``old`` laid out like its sharded successor ``new`` (a DTensor).

    Every rank holds the same full moments, so each takes its own shard without communication.
    """
    from torch.distributed.tensor import distribute_tensor

    return {k: distribute_tensor(v, new.device_mesh, new.placements, src_data_rank=None)
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape == old.shape else v for k, v in state.items()}


class PruningFSDPStrategy(PruningStrategy, ModelParallelStrategy):
    """FSDP2 (``fully_shard``) data parallelism that can shrink the model mid-training.

    Extends :class:`~lightning.pytorch.strategies.ModelParallelStrategy` (its arguments; by default
    ``tensor_parallel_size=1`` and every process does data parallelism) and applies ``fully_shard``
    itself, so that it can shard again after each surgery: each module whose type or qualified name
    is in ``shard_modules`` (e.g. transformer blocks) is its own FSDP unit, then every top-level child
    of the LightningModule that holds parameters. A ``configure_model`` hook is optional and must not
    apply ``fully_shard`` itself.

    Checkpoints: ``save_distributed_checkpoint=True`` (default) writes the sharded
    ``torch.distributed.checkpoint`` folder, ``False`` one full file; both resume under this
    strategy (the model is rebuilt to the checkpoint's shapes before the shards load) and both load
    on one process with :func:`ctprune_lightning.load_pruned`.
    """

    def __init__(self, shard_modules: Iterable[type | str] = (), data_parallel_size: Any = "auto",
                 tensor_parallel_size: Any = 1, **kwargs: Any) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)
        self.shard_modules = list(shard_modules)
        bad = [m for m in self.shard_modules if not isinstance(m, (type, str))]
        if bad:
            raise TypeError(f"PruningFSDPStrategy: `shard_modules` takes module types or names, got {bad!r}")
        self._templates: dict[str, nn.Module] = {}  # unsharded, meta-device copies of each FSDP root
        self._plain: dict[str, dict[str, nn.Parameter]] = {}  # during a surgery: each root's plain Parameters

    #: :meth:`load_checkpoint` rebuilds the model to the checkpoint's shapes before the shards load
    rebuilds_from_checkpoint = True

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and self._tensor_parallel_size != "auto":
            # every process not used for tensor parallelism does data parallelism
            self._data_parallel_size = max(1, self.num_nodes * self.num_processes // int(self._tensor_parallel_size))
        ModelParallelStrategy.setup_environment(self)

    # ------------------------------------------------------------------------------ sharding
    def _mesh(self) -> Any:
        return self.device_mesh["data_parallel"]

    def _is_unit(self, name: str, module: nn.Module) -> bool:
        return any((isinstance(k, type) and isinstance(module, k)) or (isinstance(k, str) and name == k)
                   for k in self.shard_modules)

    def _roots(self, model: nn.Module) -> list[str]:
        return [n for n, c in model.named_children() if any(True for _ in c.parameters())]

    def _shard_(self, model: nn.Module, roots: Sequence[str]) -> None:
        from torch.distributed.fsdp import fully_shard

        for root in roots:
            child = model.get_submodule(root)
            for name, sub in reversed(list(child.named_modules())):  # innermost units first
                if name and self._is_unit(f"{root}.{name}", sub):
                    fully_shard(sub, mesh=self._mesh())
            fully_shard(child, mesh=self._mesh())

    def setup(self, trainer: Any) -> None:
        from torch.distributed.tensor import DTensor

        model = self.model
        if not self._templates:  # first setup (fit, or test/validate alone); a later one finds it sharded
            if any(isinstance(p, DTensor) for p in model.parameters()):
                raise TypeError("PruningFSDPStrategy applies fully_shard itself (so it can shard again after a "
                                "surgery): remove fully_shard from configure_model() and name the modules to "
                                "shard as units in PruningFSDPStrategy(shard_modules=[MyBlock, 'blocks.0', ...])")
            own = [n for n, p in model.named_parameters(recurse=False) if p.requires_grad]
            if own:  # they would be neither sharded nor gradient-synchronised
                raise TypeError(f"PruningFSDPStrategy shards the LightningModule's children; its own trainable "
                                f"parameters {own} would stay unsynchronised: move them into a submodule")
            model.to(self.root_device)
            roots = self._roots(model)
            self._templates = {r: copy.deepcopy(model.get_submodule(r)).to("meta") for r in roots}
            self._shard_(model, roots)
            self.lightning_module.configure_model = lambda: None  # sharded: nothing left for the hook to do
        ModelParallelStrategy.setup(self, trainer)

    @contextmanager
    def flop_view(self, model: nn.Module) -> Iterator[nn.Module]:
        """Plain, uninitialised copies of the FSDP roots (same shapes) stand in while FLOPs are counted:
        counting needs no collective, and autograd sees ordinary leaves."""
        sharded = {root: model.get_submodule(root) for root in self._templates}
        try:
            for root, template in self._templates.items():
                plain = copy.deepcopy(template)
                apply_arch_(plain, capture_arch(sharded[root]), f"FSDP root '{root}'")
                model.register_module(root, plain.to_empty(device=self.root_device))
            yield model
        finally:
            for root, module in sharded.items():
                model.register_module(root, module)

    # ------------------------------------------------------------------------------ surgery protocol
    def _unwrap_(self, model: nn.Module, optimizers: Sequence[Any]) -> None:
        """Gather every FSDP root into a plain module (weights and optimizer moments in full)."""
        self._plain = {}
        for root, template in self._templates.items():
            sharded = model.get_submodule(root)
            plain = copy.deepcopy(template)
            apply_arch_(plain, capture_arch(sharded), f"FSDP root '{root}'")
            plain = plain.to_empty(device=self.root_device)
            with torch.no_grad():
                plain.load_state_dict({k: _full(v) for k, v in sharded.state_dict().items()})
            new_params = dict(plain.named_parameters())
            for name, old in sharded.named_parameters():
                swap_in_optimizers_(old, new_params[name], optimizers,
                                    lambda state, o, n: {k: _full(v) for k, v in state.items()})
            model.register_module(root, plain)
            self._plain[root] = new_params

    def _rewrap_(self, model: nn.Module, optimizers: Sequence[Any]) -> None:
        """Shard the plain roots again; moments re-distributed on the new shards."""
        held = {id(p) for p in optimizer_params(optimizers)}
        before: dict[str, dict[str, nn.Parameter]] = {}
        for root in self._templates:
            plain = model.get_submodule(root)
            params = dict(plain.named_parameters())
            for name, p in params.items():  # a rebuild that set Parameters directly (apply_arch_)
                old = self._plain.get(root, {}).get(name)
                if old is not None and old is not p and id(old) in held and id(p) not in held:
                    swap_in_optimizers_(old, p, optimizers, state_fn=None)
            before[root] = params
        self._shard_(model, list(self._templates))
        for root, params in before.items():
            sharded = dict(model.get_submodule(root).named_parameters())
            for name, p in params.items():
                swap_in_optimizers_(p, sharded[name], optimizers, _distribute_state)
        self._plain = {}

    # ------------------------------------------------------------------------------ checkpoints
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Rebuild the model to the checkpoint's shapes on every rank, then load the shards into it."""
        from .checkpoint import read_checkpoint_spec

        path = Path(self.broadcast(checkpoint_path))
        spec = read_checkpoint_spec(path)
        if spec is not None:
            arch = spec["arch"]
            self.actuate_(lambda model, optimizers: apply_arch_(model, arch, str(path)))
        return ModelParallelStrategy.load_checkpoint(self, path, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """The shards were loaded by :meth:`load_checkpoint` (after the rebuild)."""

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("ctprune_fsdp", cls, description="ctprune pruning FSDP2 (fully_shard)",
                                   override=True)


PruningDDPStrategy.register_strategies(StrategyRegistry)
PruningFSDPStrategy.register_strategies(StrategyRegistry)


def require_pruning_strategy(strategy: Strategy, world_size: int, cuts: bool = True) -> None:
    """Raise at ``setup`` when a strategy wraps the model in a way that cannot re-wrap after a cut: any multi-process
    run but ours, and, where the controller ever ``cuts``, DDP, FSDP or DeepSpeed even in one process (their wrapper
    holds the old Parameters: DDP's reducer then waits for gradients that never come)."""
    if isinstance(strategy, PruningStrategy):
        return
    name = type(strategy).__name__
    wraps = isinstance(strategy, (DDPStrategy, ModelParallelStrategy)) or "FSDP" in name or "DeepSpeed" in name
    if world_size <= 1 and not (wraps and cuts):
        return
    if isinstance(strategy, DDPStrategy):
        use = '"ctprune_ddp" (or PruningDDPStrategy(...))'
    elif isinstance(strategy, ModelParallelStrategy) or "FSDP" in name:
        use = '"ctprune_fsdp" (or PruningFSDPStrategy(...))'
    else:
        use = '"ctprune_ddp" or "ctprune_fsdp"'
    raise RuntimeError(f"ControlPruning cannot shrink a model under {name} with world_size={world_size}: the "
                       f"wrapper would keep the old Parameters. Use strategy={use}.")
