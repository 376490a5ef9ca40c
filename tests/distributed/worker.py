"""One training run for the distributed tests: ``python worker.py --strategy ddp|fsdp|single --out DIR``.

Lightning's launcher starts the second rank by running this same command line again. Every rank
writes ``DIR/rank<r>.json``: after each surgery the architecture hash, a digest of every parameter and
optimizer moment (FSDP2: of the gathered full tensors), and the training losses; rank 0 also writes
``DIR/summary.json`` and, with ``--save-every``, checkpoints under ``DIR/ckpt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ctprune_lightning import ControlPruning, PruningDDPStrategy, PruningFSDPStrategy
from ctprune_lightning.models import MLPClassifier
from ctprune_lightning.loop import Plan
from ctprune_lightning.strategy import arch_hash

GLOBAL_BATCH = 32


class Data(L.LightningDataModule):
    """Separable Gaussian classes, in a fixed order (so a 2-rank run sees the single run's global batches)."""

    def __init__(self, batch_size: int, n: int = 192, dim: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        centers = 3.0 * torch.randn(10, dim, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        self.ds = TensorDataset(centers[y] + torch.randn(n, dim, generator=g), y)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        # in order on every rank: rank r takes samples r, r + world, ... of each global batch
        sampler = DistributedSampler(self.ds, shuffle=False) if dist.is_initialized() else None
        return DataLoader(self.ds, batch_size=self.batch_size, shuffle=False, sampler=sampler)

    def val_dataloader(self) -> DataLoader:  # each rank its own samples: the probe loss must be averaged
        sampler = DistributedSampler(self.ds, shuffle=False) if dist.is_initialized() else None
        return DataLoader(self.ds, batch_size=self.batch_size, shuffle=False, sampler=sampler)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def digest(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[float]]:
    """Sum and sum of squares of every parameter and of its Adam moments (full tensors)."""
    out = {}
    for name, p in model.named_parameters():
        full = _full(p.detach()).double()
        out[name] = [float(full.sum()), float(full.pow(2).sum())]
        for key, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                m = _full(v).double()
                out[f"{name}:{key}"] = [float(m.sum()), float(m.pow(2).sum())]
    return out


class Recorder(L.Callback):
    """After every surgery (architecture hash changed): hash, digests; every step: the training loss."""

    def __init__(self, fail_rank: int) -> None:
        self.events: list[dict] = []
        self.losses: list[float] = []
        self.fail_rank = fail_rank
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        h = arch_hash(pl_module)
        if h != self._last:
            self._last = h
            self.events.append({"step": trainer.global_step, "hash": h,
                                "digest": digest(pl_module, trainer.optimizers[0]),
                                "widths": {n: m.out_features for n, m in pl_module.named_modules()
                                           if isinstance(m, nn.Linear)},
                                # FSDP2: (local, global) element counts of each parameter's shard
                                "shards": {n: [p.to_local().numel(), p.numel()] for n, p in pl_module.named_parameters()
                                           if hasattr(p, "to_local")}})

    def setup(self, trainer, pl_module, stage):
        cb = next(c for c in trainer.callbacks if isinstance(c, ControlPruning))
        if trainer.global_rank == self.fail_rank:
            original = cb.loop.apply_

            def failing(*args, **kwargs):
                original(*args, **kwargs)
                raise RuntimeError(f"planted failure on rank {trainer.global_rank}")

            cb.loop.apply_ = failing


class Grower(L.Callback):
    """At one optimizer step, grow ``net.1`` by ``units`` through the loop's actuator (every rank)."""

    def __init__(self, step: int, units: int) -> None:
        self.step, self.units = step, units

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step or not self.units:
            return
        cb = next(c for c in trainer.callbacks if isinstance(c, ControlPruning))
        plan = Plan(step=self.step, widths=cb.loop.widths(pl_module), grow={"net.1": self.units})
        cb._actuate(trainer, lambda model, optimizers: cb.loop.apply_(model, plan, optimizers))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["single", "ddp", "fsdp"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=4, help="6 optimizer steps each")
    ap.add_argument("--ckpt-path", default=None)
    ap.add_argument("--save", type=int, default=0, help="1: a checkpoint at the end of every epoch (6 steps)")
    ap.add_argument("--sharded", type=int, default=1, help="FSDP: 1 = distributed checkpoint, 0 = one file")
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--budget", type=float, default=0.0, help="> 0: the quality-budget loop (lqr), held-out probe")
    ap.add_argument("--grow", type=int, default=0, help="> 0: add this many units to net.1 at step 10")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    L.seed_everything(0)
    devices = 1 if args.strategy == "single" else 2
    strategy = {"single": "auto", "ddp": PruningDDPStrategy(),
                "fsdp": PruningFSDPStrategy(shard_modules=[nn.Linear], save_distributed_checkpoint=bool(args.sharded))}[
        args.strategy]
    model = MLPClassifier(input_dim=32, hidden=(64, 64), num_classes=10, lr=3e-3, scheduler="none")
    if args.budget:
        # 24 steps: a cut must repay its sizing within a few steps, so no cap on how fast the loop may cut
        pruning = ControlPruning(controller="lqr", target=0.1, quality_budget=args.budget, every_n_steps=2, round_to=4,
                                 importance="magnitude", probe_data="val", controller_kwargs={"max_rate": 100.0})
    else:
        pruning = ControlPruning(controller="gmp", target=0.3, every_n_steps=4, round_to=4, importance="magnitude",
                                 controller_kwargs={"start": 0.0, "end": 0.5})
    recorder = Recorder(args.fail_rank)
    callbacks: list = [pruning, Grower(10, args.grow), recorder]
    if args.save:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_epochs=1, save_top_k=-1,
                                                             filename="step{step}", auto_insert_metric_name=False))
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=devices, strategy=strategy,
                        logger=False, enable_checkpointing=bool(args.save), enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2 if args.budget else 0, num_sanity_val_steps=0,
                        use_distributed_sampler=False,
                        callbacks=callbacks)
    trainer.fit(model, datamodule=Data(GLOBAL_BATCH // devices), ckpt_path=args.ckpt_path)
    rank = trainer.global_rank
    hashes = getattr(trainer.strategy, "surgery_hashes", [])
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "events": recorder.events, "losses": recorder.losses, "surgery_hashes": hashes,
        "final": digest(model, trainer.optimizers[0]), "summary": pruning.summary() | {"trace": []},
        "world_size": trainer.world_size, "pid": os.getpid(), "held_out": len(pruning.loop.held_out),
        "budget_trace": [[r["step"], r["final_damage"], r["action"]] for r in pruning.trace if "final_damage" in r]}))
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(pruning.summary()))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Every record is written and the group destroyed: leave without the interpreter's teardown, where a loaded
    # 2-core machine saw a two-rank FSDP worker abort twice in one suite ("terminate called without an active
    # exception", rc -6, a C++ thread torn down at exit; never reproduced in 13 isolated runs of the same tests).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
