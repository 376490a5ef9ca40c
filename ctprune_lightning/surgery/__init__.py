"""Physical surgery: find coupled groups, shrink tensors, keep optimizer state consistent."""

from .attention import (MHA_REASON, HeadLayout, find_head_layout, shrink_attention_heads_,
                        shrink_attention_in_features_, shrink_attention_out_features_)
from .groups import GrowInit, PrunableGroup, Slice, UnitSlice, apply_plan_, arch_spec, discover_groups
from .handlers import SliceHandler, register
from .mha import PrunableMultiheadAttention, convert_multihead_attention_, shrink_mha_heads_
from .optim import grow_parameter_, replace_parameter_, slice_state_
from .shrink import (shrink_conv_in_channels_, shrink_conv_out_channels_, shrink_embedding_dim_,
                     shrink_linear_in_features_, shrink_linear_out_features_, shrink_norm_)

__all__ = [
    "MHA_REASON",
    "GrowInit",
    "HeadLayout",
    "PrunableGroup",
    "PrunableMultiheadAttention",
    "Slice",
    "SliceHandler",
    "UnitSlice",
    "apply_plan_",
    "arch_spec",
    "convert_multihead_attention_",
    "discover_groups",
    "find_head_layout",
    "grow_parameter_",
    "register",
    "replace_parameter_",
    "shrink_attention_heads_",
    "shrink_attention_in_features_",
    "shrink_attention_out_features_",
    "shrink_conv_in_channels_",
    "shrink_conv_out_channels_",
    "shrink_embedding_dim_",
    "shrink_linear_in_features_",
    "shrink_linear_out_features_",
    "shrink_mha_heads_",
    "shrink_norm_",
    "slice_state_",
]
