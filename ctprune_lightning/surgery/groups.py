"""Find the groups of tensor slices that must shrink together, and apply a plan to them.

Torch-Pruning's ``DependencyGraph`` is the coupling oracle (which slices are tied); our own executor
(:mod:`.shrink`, :mod:`.attention`) does the cutting so Parameters and optimizer state stay correct.

A group is named after the layer whose outputs it prunes (e.g. ``"net.1"``, or an attention module for
its heads); a unit is one output feature / channel / head of that layer with every slice coupled to it
(norm entries, input columns or channels of the consumers).

This module is the stable import path; the parts live in :mod:`.slices` (data types, executor) and
:mod:`.discover` (discovery).

Example::

    groups, skipped = discover_groups(model, model.example_input_array)
    apply_plan_(model, groups, {"net.1": torch.tensor([0, 3, 5])}, trainer.optimizers)
    apply_plan_(model, groups, {}, trainer.optimizers, grow={"net.1": 2})   # 3 -> 5 units, same outputs
"""

from __future__ import annotations

from .discover import discover_groups, resolve_limit
from .handlers import GrowInit
from .slices import (ATTN_IN, ATTN_OUT, CONV_IN, CONV_OUT, DEPTHWISE, EMBEDDING_DIM, HEADS, LINEAR_IN, LINEAR_OUT,
                     NORM, SSM_STATE, PrunableGroup, Slice, UnitSlice, apply_plan_, arch_spec, tied_parameters)

__all__ = [
    "ATTN_IN", "ATTN_OUT", "CONV_IN", "CONV_OUT", "DEPTHWISE", "EMBEDDING_DIM", "GrowInit", "HEADS", "LINEAR_IN",
    "LINEAR_OUT", "NORM", "SSM_STATE", "PrunableGroup", "Slice", "UnitSlice", "apply_plan_", "arch_spec",
    "discover_groups", "resolve_limit", "tied_parameters",
]
