"""Shared training plumbing for the experiment models: optimizer + warm-up/cosine LR from hparams.

Example::

    def configure_optimizers(self):
        return configure_optimizer_and_scheduler(self, param_groups=decay_groups(self))
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

__all__ = ["OPTIMIZERS", "SCHEDULERS", "WarmupCosine", "check_optim_args", "configure_optimizer_and_scheduler",
           "decay_groups", "step_log_due"]


OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "none")


def step_log_due(module: L.LightningModule) -> bool:
    """Whether a per-step value logged in this training step is read: on the steps whose logs Lightning writes
    (every ``log_every_n_steps`` optimizer steps, its own rule) and on the last batch of an epoch (so
    ``callback_metrics`` holds the epoch's last value). Each ``self.log`` call costs ~1 ms on a CPU in Lightning
    2.x (its result metric's ``.to(device)``): logging only these steps saves ~7% of a pruned MLP step."""
    trainer = module._trainer
    if trainer is None or trainer.fast_dev_run:
        return True
    n = trainer.log_every_n_steps
    return bool(trainer.is_last_batch) or (n > 0 and (trainer.global_step + 1) % n == 0)


class WarmupCosine:
    """LR multiplier: linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``.

    A callable object (not a lambda) so ``LambdaLR.state_dict()`` saves and restores it.
    ``total_steps=None`` keeps the LR constant after warm-up.
    """

    def __init__(self, warmup_steps: int, total_steps: int | None) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = None if total_steps is None else int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def check_optim_args(optimizer: str, scheduler: str, lr: float, warmup_steps: int) -> None:
    """Raise ``ValueError`` naming the bad value and the allowed ones."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; choose one of {OPTIMIZERS}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not supported; choose one of {SCHEDULERS}")
    if int(warmup_steps) < 0 or float(lr) <= 0:
        raise ValueError(f"need warmup_steps >= 0 and lr > 0; got {warmup_steps=}, {lr=}")


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two param groups: matrices / kernels / embeddings decay, biases and norm scales do not (nanoGPT)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": float(weight_decay)},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def configure_optimizer_and_scheduler(module: L.LightningModule,
                                      param_groups: Iterable[Any] | None = None) -> Any:
    """AdamW or SGD from ``module.hparams`` and, unless ``scheduler='none'``, a per-step warm-up + cosine LR."""
    hp = module.hparams
    params = list(param_groups) if param_groups is not None else module.parameters()
    if hp.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay,
                                                       betas=tuple(hp.get("betas", (0.9, 0.999))))
    else:
        opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    if hp.scheduler == "none":
        return opt
    total = module.trainer.estimated_stepping_batches
    if not math.isfinite(total):
        rank_zero_warn("scheduler='cosine' needs a finite number of steps (set max_epochs or max_steps); "
                       "keeping the LR constant after warm-up.")
        total = None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(hp.warmup_steps, total))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
