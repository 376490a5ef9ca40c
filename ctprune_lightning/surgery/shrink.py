"""Pure, in-place shrink functions: verb + layer + dimension (Torch-Pruning's naming).

Each takes the module, the sorted indices to *keep* along the pruned dimension, and the optimizers
whose state must follow. They produce new, smaller tensors (physical shrinking, never masks).

Example::

    shrink_linear_out_features_(model.fc1, keep, optimizers)
    shrink_linear_in_features_(model.fc2, keep, optimizers)
"""

from __future__ import annotations

from typing import Iterable

from torch import Tensor, nn
from torch.optim import Optimizer

from .optim import replace_buffer_, replace_parameter_

NORM_TYPES = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _check_keep(keep: Tensor, size: int, what: str) -> None:
    if keep.dim() != 1 or keep.numel() == 0:
        raise ValueError(f"{what}: keep must be a non-empty 1-D index tensor, got shape {tuple(keep.shape)}")
    if int(keep.min()) < 0 or int(keep.max()) >= size:
        raise ValueError(f"{what}: keep indices must lie in [0, {size}), got [{int(keep.min())}, {int(keep.max())}]")


def shrink_linear_out_features_(layer: nn.Linear, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the output features ``keep`` of ``layer`` (rows of weight, entries of bias)."""
    _check_keep(keep, layer.out_features, "shrink_linear_out_features_")
    optimizers = list(optimizers)
    replace_parameter_(layer, "weight", keep, 0, optimizers)
    if layer.bias is not None:
        replace_parameter_(layer, "bias", keep, 0, optimizers)
    layer.out_features = int(keep.numel())


def shrink_linear_in_features_(layer: nn.Linear, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the input features ``keep`` of ``layer`` (columns of weight)."""
    _check_keep(keep, layer.in_features, "shrink_linear_in_features_")
    replace_parameter_(layer, "weight", keep, 1, optimizers)
    layer.in_features = int(keep.numel())


def shrink_norm_(norm: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Shrink a LayerNorm over its (single) last dimension, or a BatchNorm's channels."""
    optimizers = list(optimizers)
    if isinstance(norm, nn.LayerNorm):
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"shrink_norm_: LayerNorm over {norm.normalized_shape} is not supported (1-D only)")
        _check_keep(keep, norm.normalized_shape[0], "shrink_norm_")
        norm.normalized_shape = (int(keep.numel()),)
    elif isinstance(norm, nn.modules.batchnorm._BatchNorm):
        _check_keep(keep, norm.num_features, "shrink_norm_")
        norm.num_features = int(keep.numel())
        replace_buffer_(norm, "running_mean", keep)
        replace_buffer_(norm, "running_var", keep)
    else:
        raise TypeError(f"shrink_norm_: unsupported module {type(norm).__name__}; allowed: {[t.__name__ for t in NORM_TYPES]}")
    for name in ("weight", "bias"):
        if getattr(norm, name, None) is not None:
            replace_parameter_(norm, name, keep, 0, optimizers)
