"""Read a LightningModule as it is: the loss it computes, and the call it makes to its network.

ControlPruning needs two things from a module it has never seen:

* a **loss on a batch** (for the probe and for FLOP counting): ``module.compute_loss(batch)`` when the
  module defines it, else the module's own ``training_step(batch, 0)`` run with its logging silenced
  and its torchmetrics states restored afterwards, so any batch structure and any loss work;
* the **inputs its network really receives**, to trace the coupled layers: the outermost module call
  made while that loss runs (``self(x)``, ``self.model(input_ids=..., attention_mask=...)``, ...),
  recorded by forward pre-hooks with keyword arguments.

Example::

    loss = step_loss(model, batch)                                # a scalar Tensor
    call = capture_network_call(model, lambda: step_loss(model, batch))
    call.path, call.kwargs.keys()                                 # ("model", {"input_ids", "labels"})
    out = call(model)                                             # runs model.get_submodule("model")(...)
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

log = logging.getLogger(__name__)

__all__ = ["CallInputs", "as_call", "batch_size", "batch_statistics", "capture_network_call", "silenced", "step_error",
           "step_loss"]


@dataclass
class CallInputs:
    """One call of a submodule: ``model.get_submodule(path)(*args, **kwargs)`` (``path=""``: the model)."""

    path: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __call__(self, model: nn.Module) -> Any:
        return model.get_submodule(self.path)(*self.args, **self.kwargs)


def batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor in a batch of any structure (1 when it holds none)."""
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor) and t.dim() > 0]
    if not leaves and isinstance(batch, Mapping):  # e.g. a BatchEncoding pytree does not open
        leaves = [t for t in batch.values() if isinstance(t, Tensor) and t.dim() > 0]
    return int(leaves[0].shape[0]) if leaves else 1


def _metrics(model: nn.Module) -> list[Any]:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return []
    return [m for m in model.modules() if isinstance(m, Metric)]


@contextlib.contextmanager
def silenced(model: nn.Module) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing, and every torchmetrics state is restored on exit."""
    saved = []
    for m in _metrics(model):
        states = {a: copy.deepcopy(getattr(m, a)) for a in m._defaults}
        saved.append((m, states, m._update_count, m._computed))
    patched = {name: model.__dict__.get(name) for name in ("log", "log_dict")}
    model.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    model.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, value in patched.items():
            if value is None:
                model.__dict__.pop(name, None)
            else:
                setattr(model, name, value)
        for m, states, count, computed in saved:
            for a, v in states.items():
                setattr(m, a, v)
            m._update_count, m._computed = count, computed


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the batch's own statistics, their running statistics untouched.

    In eval mode a BatchNorm layer uses running statistics that lag the weights (early in training, and
    for the layers after a cut, whose inputs changed). A probe read this way measures the function of
    the current weights. Each layer runs in train mode with ``momentum=0`` (its running estimate is
    left as it was) and its ``num_batches_tracked`` is restored on exit.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            tracked = None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
            saved.append((m, m.training, m.momentum, tracked))
            m.train(True)
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, training, momentum, tracked in saved:
            m.train(training)
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def step_loss(model: nn.Module, batch: Any) -> Tensor:
    """The module's own loss on ``batch``: ``compute_loss(batch)``, else its ``training_step`` output."""
    if hasattr(model, "compute_loss"):
        return model.compute_loss(batch)
    if not hasattr(model, "training_step"):
        raise TypeError(f"ControlPruning needs a loss: {type(model).__name__} has neither `compute_loss(batch)` "
                        "nor `training_step`")
    if not getattr(model, "automatic_optimization", True):
        raise TypeError(f"{type(model).__name__} uses manual optimization, so its training_step steps the "
                        "optimizer itself: give it a `compute_loss(batch) -> Tensor` for ControlPruning's probe")
    with silenced(model):
        out = model.training_step(batch, 0)
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"ControlPruning reads the loss from {type(model).__name__}.training_step, which returned "
                        f"{type(out).__name__} (needs a scalar Tensor or a dict with 'loss'); define "
                        "`compute_loss(batch) -> Tensor` instead")
    return loss.reshape(())


def step_error(model: nn.Module, batch: Any) -> Tensor:
    """The error rate on ``batch`` (fraction of wrong predictions): ``compute_error(batch)`` when the module
    defines it, else ``argmax(model(x)) != y`` for a batch ``(x, y, ...)`` with integer labels ``y`` and
    logits of shape ``y.shape + (classes,)`` (classifiers, and language models per token)."""
    if hasattr(model, "compute_error"):
        return model.compute_error(batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor) \
            and not batch[1].is_floating_point():
        logits = model(batch[0])
        if isinstance(logits, Tensor) and logits.shape[:-1] == batch[1].shape:
            return (logits.argmax(-1) != batch[1]).float().mean()
    raise TypeError(f"an error-rate budget needs the error of a batch: {type(model).__name__}'s batches are not "
                    "(inputs, integer labels) with logits per label; define `compute_error(batch) -> Tensor` "
                    "on the module or pass `error_fn=`")


def _detached(value: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, value)


def capture_network_call(model: nn.Module, run: Callable[[], Any]) -> CallInputs | None:
    """Run ``run()`` and return the outermost submodule call it made (the largest, when there are several).

    Returns None when no submodule with parameters was called. The recorded tensors are detached copies.
    """
    names = {m: n for n, m in model.named_modules()}
    calls: list[CallInputs] = []
    depth = [0]

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if depth[0] == 0:
            calls.append(CallInputs(names[module], _detached(args), _detached(kwargs)))
        depth[0] += 1

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        depth[0] -= 1

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in names]
    handles += [m.register_forward_hook(post, with_kwargs=True, always_call=True) for m in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()

    def size(call: CallInputs) -> int:
        return sum(p.numel() for p in model.get_submodule(call.path).parameters())

    calls = [c for c in calls if size(c) > 0]
    if not calls:
        return None
    best = max(calls, key=size)
    others = sorted({c.path for c in calls} - {best.path})
    if others:
        log.info("ControlPruning traces %s (the largest network training_step calls); also called: %s",
                 best.path or type(model).__name__, others)
    return best


def as_call(example: Any) -> CallInputs:
    """``example_input_array`` (a tensor, a tuple of positional inputs or a dict of keyword inputs) as a call."""
    if isinstance(example, CallInputs):
        return example
    if isinstance(example, Mapping):
        return CallInputs("", (), dict(example))
    if isinstance(example, (tuple, list)):
        return CallInputs("", tuple(example), {})
    return CallInputs("", (example,), {})
