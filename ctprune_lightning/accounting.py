"""Training-compute accounting: FLOPs per training step, cumulative and saved FLOPs, wall-clock.

FLOPs of one training step (forward + backward) are counted with ``torch.utils.flop_counter`` on the
example batch, once per architecture (cached by its spec). Per-module counts let the callback predict
the FLOPs of a candidate width assignment before cutting (a Linear's cost scales with in × out).

Example::

    meter = FlopMeter(loss_fn)
    total, per_module = meter.measure(model, batch, key=arch_spec(model, groups))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def count_training_flops(
    model: nn.Module, batch: object, loss_fn: Callable[[nn.Module, object], Tensor]
) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward + backward of ``loss_fn(model, batch)``; also per module (qualified name).

    Gradients are taken with ``torch.autograd.grad`` so no ``.grad`` is touched, in eval mode so no
    BatchNorm statistic moves.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            loss = loss_fn(model, batch)
            if params and loss.requires_grad:
                torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.train(was_training)
    root = type(model).__name__
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name.startswith(root + "."):
            per_module[name[len(root) + 1 :]] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


@dataclass
class FlopMeter:
    """Caches the per-step FLOPs of each architecture the run visits."""

    loss_fn: Callable[[nn.Module, object], Tensor]
    cache: dict[Hashable, tuple[int, dict[str, int]]] = field(default_factory=dict)

    def measure(self, model: nn.Module, batch: object, key: Hashable) -> tuple[int, dict[str, int]]:
        if key not in self.cache:
            self.cache[key] = count_training_flops(model, batch, self.loss_fn)
        return self.cache[key]


@dataclass
class ComputeLedger:
    """Cumulative training FLOPs against a dense run of the same schedule, and wall-clock."""

    dense_step_flops: int = 0
    train_flops: float = 0.0
    dense_train_flops: float = 0.0
    batches: int = 0
    train_time_s: float = 0.0
    _t0: float | None = None

    def add_batch(self, step_flops: int, scale: float = 1.0) -> None:
        """One forward/backward at the current architecture (``scale`` = batch size / probe size)."""
        self.train_flops += step_flops * scale
        self.dense_train_flops += self.dense_step_flops * scale
        self.batches += 1

    @property
    def saved(self) -> float:
        return 1.0 - self.train_flops / self.dense_train_flops if self.dense_train_flops else 0.0

    def start_clock(self) -> None:
        self._t0 = time.perf_counter()

    def stop_clock(self) -> None:
        if self._t0 is not None:
            self.train_time_s += time.perf_counter() - self._t0
            self._t0 = None

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("dense_step_flops", "train_flops", "dense_train_flops", "batches", "train_time_s")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.state_dict().items():
            setattr(self, k, type(v)(state.get(k, v)))
