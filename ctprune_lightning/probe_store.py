"""The batches the control loop measures on, and the one way it reads them.

The training probe (the first training batches) sizes the FLOP count and, without a held-out set, the
loss; the held-out probe (the first validation batches, :meth:`ProbeStore.set_held_out`) is what a
quality budget is judged on. A reading is the mean of ``fn(model, batch)`` over the batches in eval mode,
averaged over ranks; with ``batch_stats`` BatchNorm reads the batch's own statistics
(:func:`~ctprune_lightning.probe.batch_statistics`), so a cut's jump is the change of the function and
not the lag of the running statistics.

Example::

    store = ProbeStore(size=2, loss_fn=step_loss, error_fn=step_error)
    store.add(model, batch)              # the first training batches
    store.set_held_out(model, val[:2])   # optional
    store.loss(model)                    # the held-out batches when kept, else the training ones
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from .probe import batch_size, batch_statistics

LossFn = Callable[[nn.Module, Any], Tensor]

__all__ = ["LossFn", "ProbeStore"]


def _identity(x: float) -> float:
    return x


def detached(batch: Any) -> Any:
    """A copy of ``batch`` that training does not change (kept as a probe)."""
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


def _cpu(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.cpu())


class ProbeStore:
    """Kept probe batches and their readings (see the module docstring).

    Args:
        size: training batches to keep.
        loss_fn / error_fn: ``fn(model, batch) -> scalar``: the loss, and the error rate of an error budget.
        reduce_mean: averages a float over ranks (identity on one process).
    """

    def __init__(self, size: int, loss_fn: LossFn, error_fn: LossFn,
                 reduce_mean: Callable[[float], float] = _identity) -> None:
        self.size, self.loss_fn, self.error_fn, self.reduce_mean = size, loss_fn, error_fn, reduce_mean
        self.train: list[Any] = []
        self.held_out: list[Any] = []
        self.confirm: list[Any] = []  # more held-out batches: a sized cut is read on them before it is made
        self.metric = "loss"  # what a reading is: "loss", or "error" (the error rate)
        self.batch_stats = False  # BatchNorm reads the probe's batch statistics (the budget sensor's reading)
        self.samples_read = 0  # samples forwarded by every reading so far (what the sensing cost in compute)
        self.last_batches: list[float] = []  # this rank's per-batch values of the last :meth:`loss`

    @property
    def ready(self) -> bool:
        return len(self.train) >= self.size

    @property
    def fn(self) -> LossFn:
        """What a reading measures: the error rate for an error budget, else the loss."""
        return self.error_fn if self.metric == "error" else self.loss_fn

    def add(self, model: nn.Module, batch: Any) -> bool:
        """Keep ``batch`` while fewer than ``size`` are kept; True when it is the first."""
        if self.ready:
            return False
        kept = detached(batch)
        if not self.train and self.metric == "error" and not self.held_out:
            self.check_readable(model, kept, "training")  # before the first step, not mid-run
        self.train.append(kept)
        return len(self.train) == 1

    def set_held_out(self, model: nn.Module, batches: Sequence[Any], confirm: Sequence[Any] = ()) -> None:
        """Read these (validation) batches instead of training ones, and keep ``confirm`` (more of them) for
        :meth:`confirm_loss`; ``ValueError`` naming the cause when the reading fails on them (nothing is kept)."""
        kept = [detached(b) for b in batches]
        if not kept:
            raise ValueError("ProbeStore.set_held_out: no batches given")
        self.check_readable(model, kept[0], "validation")
        self.held_out, self.confirm = kept, [detached(b) for b in confirm]

    def check_readable(self, model: nn.Module, batch: Any, kind: str) -> None:
        """Raise ``ValueError`` naming the cause when the reading's function fails on ``batch``."""
        try:
            self.mean(model, [batch], self.fn)
        except Exception as err:  # any user loss may fail on a batch it was not written for
            raise ValueError(f"the probe fails on a {kind} batch ({type(err).__name__}: {err})") from err

    @staticmethod
    def on(model: nn.Module, batch: Any) -> Any:
        """``batch`` on ``model``'s device."""
        device = next(model.parameters()).device
        return apply_to_collection(batch, Tensor, lambda t: t.to(device))

    @torch.no_grad()
    def values(self, model: nn.Module, batches: Sequence[Any], fn: LossFn) -> list[float]:
        """``fn`` on each of ``batches`` in eval mode on this rank (batch statistics when ``batch_stats``)."""
        was_training = model.training
        model.eval()
        try:
            with batch_statistics(model) if self.batch_stats else nullcontext():
                values = [float(fn(model, self.on(model, b))) for b in batches]
            self.samples_read += sum(batch_size(b) for b in batches)
        finally:
            model.train(was_training)
        return values

    def mean(self, model: nn.Module, batches: Sequence[Any], fn: LossFn) -> float:
        """Mean of :meth:`values` (this rank)."""
        values = self.values(model, batches, fn)
        return sum(values) / len(values)

    def loss(self, model: nn.Module) -> float:
        """The reading: on the held-out batches when kept, else the training ones, averaged over ranks (this
        rank's per-batch values are kept in :attr:`last_batches`: a jump's error is read from their spread)."""
        batches = self.held_out or self.train
        self.last_batches = self.values(model, batches, self.fn)
        value = self.reduce_mean(sum(self.last_batches) / len(self.last_batches))
        if self.metric == "error":  # half a sample: a log-space sensor needs a positive reading
            value = max(value, 0.5 / max(1, sum(batch_size(b) for b in batches)))
        return value

    def read(self, model: nn.Module, batches: Sequence[Any]) -> float:
        """The reading on ``batches``, averaged over ranks."""
        return self.reduce_mean(self.mean(model, batches, self.fn))

    def confirm_loss(self, model: nn.Module) -> float:
        """The reading on the :attr:`confirm` batches (a sized cut's check, apart from the batches the trial selected
        it on)."""
        return self.read(model, self.confirm)

    def train_loss(self, model: nn.Module) -> float:
        """The same reading on the training batches (the sensor's second channel)."""
        return self.read(model, self.train)

    def state_dict(self) -> dict[str, Any]:
        return {"probe": [_cpu(b) for b in self.train], "held_out": [_cpu(b) for b in self.held_out],
                "confirm": [_cpu(b) for b in self.confirm]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train = list(state.get("probe", []))
        self.held_out = list(state.get("held_out", []))
        self.confirm = list(state.get("confirm", []))
