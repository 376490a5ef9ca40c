"""Physical surgery: find coupled groups, shrink tensors, keep optimizer state consistent."""

from .groups import PrunableGroup, Slice, apply_plan_, arch_spec, discover_groups
from .optim import replace_parameter_, slice_state_
from .shrink import shrink_linear_in_features_, shrink_linear_out_features_, shrink_norm_

__all__ = [
    "PrunableGroup",
    "Slice",
    "apply_plan_",
    "arch_spec",
    "discover_groups",
    "replace_parameter_",
    "shrink_linear_in_features_",
    "shrink_linear_out_features_",
    "shrink_norm_",
    "slice_state_",
]
