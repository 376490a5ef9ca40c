"""ctprune_lightning: shrink a network physically while it trains, under feedback control.

Public API::

    from ctprune_lightning import ControlPruning
    trainer = L.Trainer(callbacks=[ControlPruning(controller="lqr", target=0.3)])
"""

from .callback import ControlPruning
from .checkpoint import export_pruned, load_pruned
from .controllers import CONTROLLERS, Controller, Observation, build_controller
from .importance import IMPORTANCES, Importance, build_importance

__version__ = "0.1.0"

__all__ = [
    "CONTROLLERS",
    "IMPORTANCES",
    "ControlPruning",
    "Controller",
    "Importance",
    "Observation",
    "build_controller",
    "build_importance",
    "export_pruned",
    "load_pruned",
]
