"""ctprune_lightning: shrink a network physically while it trains, under feedback control.

Public API::

    from ctprune_lightning import ControlPruning
    trainer = L.Trainer(callbacks=[ControlPruning(controller="lqr", target=0.3)])
    trainer = L.Trainer(strategy="ctprune_ddp", devices=2, callbacks=[ControlPruning(...)])   # or "ctprune_fsdp"
"""

from .callback import (ACTION, BUDGET, DAMAGE, DAMAGE_STD, FINAL_DAMAGE, FINAL_STD, FLOPS_RATIO, PARAMS, REFERENCE,
                       SAVED, ControlPruning)
from .checkpoint import CheckpointError, export_pruned, load_pruned
from .controllers import CONTROLLERS, Controller, Observation, build_controller
from .importance import IMPORTANCES, Importance, build_importance
from .loop import ControlLoop, Plan
from .strategy import PruningDDPStrategy, PruningFSDPStrategy, PruningStrategy, SurgeryError
from .surgery.arch import ArchSpecError

__version__ = "0.1.0"

__all__ = [
    "ACTION",
    "BUDGET",
    "CONTROLLERS",
    "DAMAGE",
    "DAMAGE_STD",
    "FINAL_DAMAGE",
    "FINAL_STD",
    "FLOPS_RATIO",
    "IMPORTANCES",
    "PARAMS",
    "REFERENCE",
    "SAVED",
    "ArchSpecError",
    "CheckpointError",
    "ControlLoop",
    "ControlPruning",
    "Controller",
    "Importance",
    "Observation",
    "Plan",
    "PruningDDPStrategy",
    "PruningFSDPStrategy",
    "PruningStrategy",
    "SurgeryError",
    "build_controller",
    "build_importance",
    "export_pruned",
    "load_pruned",
]
