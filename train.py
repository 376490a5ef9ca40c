"""Hydra entry point: compose -> instantiate -> fit -> test -> summary.

    python train.py controller=lqr                      # Fashion-MNIST MLP, W&B (offline w/o key) + CSV
    python train.py debug=fast controller=pid           # seconds: synthetic data, tiny MLP, CSV only
    python train.py experiment=mlp_fmnist_lqr
    python train.py -m controller=none,gmp,lqr seed=0,1 # multirun sweep
    python train.py ckpt_path=outputs/.../checkpoints/last.ckpt trainer.max_epochs=10   # resume
    python train.py controller=none architecture_from=outputs/.../checkpoints/last.ckpt  # that net, from scratch
    python train.py compile=true compile_options.fullgraph=true   # torch.compile, re-specialised per surgery

Writes ``<run dir>/summary.json`` (see ``ctprune_lightning.summary.SUMMARY_KEYS``) and prints the
summary table. Bad configs exit non-zero: Hydra lists the options of an unknown group choice, and
value errors raised by our constructors propagate (Hydra prints them).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from ctprune_lightning.checkpoint import shrink_to_checkpoint_
from ctprune_lightning.compiled import compile_module_
from ctprune_lightning.summary import SUMMARY_KEYS, format_summary, write_summary

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def hydra_choice(group: str) -> str | None:
    """The option chosen for a config group (``controller`` -> ``"lqr"``), None outside a Hydra run."""
    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:  # HydraConfig not set (plain compose without return_hydra_config)
        return None


def default_wandb_to_offline(cfg: DictConfig) -> None:
    """Without ``WANDB_API_KEY`` and an explicit ``WANDB_MODE``, log W&B offline (never touch the network)."""
    targets = [str(c.get("_target_", "")) for c in (cfg.get("logger") or {}).values() if c]
    if not any("Wandb" in t for t in targets):
        return
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
        log.info("W&B: no WANDB_API_KEY set; logging offline (upload later with `wandb sync`).")


def instantiate_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    return instantiate(cfg.dataset, _convert_="all")


def instantiate_model(cfg: DictConfig, datamodule: Any) -> L.LightningModule:
    """Instantiate ``cfg.model``, filling ``input_dim``/``num_classes`` left null from the datamodule."""
    overrides: dict[str, Any] = {}
    shape = getattr(datamodule, "input_shape", None)
    if "input_dim" in cfg.model and cfg.model.input_dim is None and shape is not None:
        overrides["input_dim"] = int(math.prod(shape))
    num_classes = getattr(datamodule, "num_classes", None)
    if "num_classes" in cfg.model and cfg.model.num_classes is None and num_classes is not None:
        overrides["num_classes"] = int(num_classes)
    vocab_size = getattr(datamodule, "vocab_size", None)
    if "vocab_size" in cfg.model and cfg.model.vocab_size is None and vocab_size is not None:
        overrides["vocab_size"] = int(vocab_size)
    return instantiate(cfg.model, _convert_="all", **overrides)


def _instantiate_dict(section: DictConfig | None, kind: str) -> list[Any]:
    objs: list[Any] = []
    for name, conf in (section or {}).items():
        if conf is None:
            continue
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            raise ValueError(f"{kind} entry {name!r} needs a `_target_`, got {conf!r}")
        objs.append(instantiate(conf, _convert_="all"))
    return objs


def instantiate_callbacks(cfg: DictConfig) -> list[Callback]:
    return _instantiate_dict(cfg.get("callbacks"), "callbacks")


def instantiate_loggers(cfg: DictConfig) -> list[Logger]:
    return _instantiate_dict(cfg.get("logger"), "logger")


def find_pruning_callback(callbacks: list[Any]) -> Any | None:
    """The ControlPruning callback (duck-typed: it has ``summary()``), or None."""
    for cb in callbacks:
        if type(cb).__name__ == "ControlPruning" and callable(getattr(cb, "summary", None)):
            return cb
    return None


def _num_params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def build_summary(
    cfg: DictConfig,
    callback: Any | None,
    test_metrics: dict[str, Any],
    fit_time_s: float,
    steps: int,
    params: tuple[int, int],
) -> dict[str, Any]:
    """Assemble the run summary: the callback's own ``summary()`` plus what train.py measured.

    Without a ControlPruning callback the pruning fields stay ``None`` and ``controller`` says so.
    """
    summary: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)
    summary["trace"] = []
    if callback is None:
        summary["controller"] = "none (no ControlPruning callback)"
    else:  # the callback's report; the controller under its short name (hydra's choice, else its `name`)
        summary.update(callback.summary())
        summary["controller"] = hydra_choice("controller") or getattr(
            callback.controller, "name", summary["controller"]
        )
    summary.update(
        seed=cfg.get("seed"),
        test_acc=test_metrics.get("test/acc"),
        test_loss=test_metrics.get("test/loss"),
        fit_time_s=fit_time_s,
        steps=steps,
        dense_params=params[0],
        params=params[1],
    )
    return summary


TRACE_COLUMNS = ("step", "compute", "action", "requested", "damage", "damage_std", "final_damage", "final_std",
                 "reference", "rho", "budget", "reason")


def log_summary(loggers: list[Logger], summary: dict[str, Any], step: int) -> None:
    """Log the summary's scalars (``summary/<key>``) to every logger; W&B also gets them in the run summary
    and the control trace as a table (``ctprune/trace``: one row per control interval, with the reason the
    controller held back)."""
    scalars = {
        f"summary/{k}": float(v)
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for key, width in (summary.get("widths") or {}).items():
        scalars[f"summary/width/{key}"] = float(width)
    for lg in loggers:
        lg.log_metrics(scalars, step=step)
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.summary.update(dict(scalars))
            if summary.get("trace"):
                rows = [[row.get(c) for c in TRACE_COLUMNS] for row in summary["trace"]]
                lg.log_table(key="ctprune/trace", columns=list(TRACE_COLUMNS), data=rows)
        lg.save()


def train(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run one training job from a composed config; return the summary (also written to output_dir)."""
    L.seed_everything(cfg.seed, workers=True)
    default_wandb_to_offline(cfg)

    datamodule = instantiate_datamodule(cfg)
    model = instantiate_model(cfg, datamodule)
    callbacks = instantiate_callbacks(cfg)
    loggers = instantiate_loggers(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    hparams = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(hparams)

    if cfg.get("architecture_from"):  # the pruned architecture of an earlier run, trained from scratch
        spec = shrink_to_checkpoint_(model, cfg.architecture_from)
        log.info("architecture of %s (%d surgeries), fresh weights", cfg.architecture_from, len(spec.get("history", [])))
    dense_params = _num_params(model)
    if cfg.get("compile"):  # nn.Module.compile: names and checkpoints unchanged; ControlPruning resets per surgery
        torch.compiler.reset()  # a multirun's earlier jobs must not use up this model's recompile budget
        compile_module_(model, **dict(cfg.get("compile_options") or {}))
    cuda = torch.cuda.is_available() and str(cfg.trainer.get("accelerator", "")) in ("gpu", "cuda", "auto")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_time_s = time.perf_counter() - start
    peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None  # of the fit (not the test)

    test_metrics: dict[str, Any] = {}
    if cfg.get("run_test", True):
        results = trainer.test(model, datamodule=datamodule, verbose=False)
        test_metrics = dict(results[0]) if results else {}

    summary = build_summary(
        cfg,
        find_pruning_callback(callbacks),
        test_metrics,
        fit_time_s,
        trainer.global_step,
        (dense_params, _num_params(model)),
    )
    summary["run_dir"] = str(output_dir)
    summary["peak_memory_mb"] = peak_memory_mb
    log_summary(loggers, summary, trainer.global_step)  # loggers write on rank 0 only
    if trainer.is_global_zero:  # every rank holds the same summary (same plan, all-reduced metrics)
        path = write_summary(summary, Path(output_dir) / "summary.json")
        print(format_summary(summary))
        log.info("summary written to %s", path)
    return summary


def finish_wandb(ok: bool) -> None:
    """Close the W&B run if one was opened (multirun jobs share one process)."""
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=0 if ok else 1)


def close_process_group() -> None:
    """End a distributed run cleanly (gloo's threads abort the interpreter at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    ok = False
    try:
        train(cfg, HydraConfig.get().runtime.output_dir)
        ok = True
    finally:
        finish_wandb(ok)
        close_process_group()


if __name__ == "__main__":
    main()
