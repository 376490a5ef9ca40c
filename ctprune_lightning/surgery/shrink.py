"""Pure, in-place shrink functions: verb + layer + dimension (Torch-Pruning's naming).

Each takes the module, the sorted indices to *keep* along the pruned dimension, and the optimizers
whose state must follow. They produce new, smaller tensors (physical shrinking, never masks);
``requires_grad`` of every replaced Parameter is preserved (frozen stays frozen).

Example::

    shrink_linear_out_features_(model.fc1, keep, optimizers)
    shrink_linear_in_features_(model.fc2, keep, optimizers)
    shrink_conv_out_channels_(block.conv1, keep, optimizers); shrink_norm_(block.bn1, keep, optimizers)
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .optim import replace_buffer_, replace_parameter_

#: Normalisation layers (the per-channel ones with a feature axis); :func:`shrink_norm_` cuts the two kinds below and
#: GroupNorm (in whole groups).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
#: Normalised over their last (cut: only) dimension, and each channel on its own.
FEATURE_NORMS = (nn.LayerNorm, nn.RMSNorm)
CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
#: Convolutions ctprune cuts here (transposed ones: handlers/transposed.py).
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_keep(keep: Tensor, size: int, what: str) -> None:
    if keep.dim() != 1 or keep.numel() == 0:
        raise ValueError(f"{what}: keep must be a non-empty 1-D index tensor, got shape {tuple(keep.shape)}")
    if int(keep.min()) < 0 or int(keep.max()) >= size:
        raise ValueError(f"{what}: keep indices must lie in [0, {size}), got [{int(keep.min())}, {int(keep.max())}]")


def is_depthwise(conv: nn.Module) -> bool:
    """A depthwise convolution: one filter per channel (``groups == in_channels == out_channels``)."""
    return (isinstance(conv, CONV_TYPES) and conv.groups > 1
            and conv.groups == conv.in_channels == conv.out_channels)


def expand_units(keep: Tensor, block: int) -> Tensor:
    """Unit indices -> element indices when each unit owns ``block`` consecutive elements.

    >>> expand_units(torch.tensor([0, 2]), 3).tolist()
    [0, 1, 2, 6, 7, 8]
    """
    if block == 1:
        return keep
    return (keep[:, None] * block + torch.arange(block, device=keep.device)).flatten()


def _shrink_outputs_(module: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer], size_attr: str) -> None:
    """Rows of ``weight`` (and entries of ``bias``) along dim 0; ``size_attr`` records the new size."""
    optimizers = list(optimizers)
    replace_parameter_(module, "weight", keep, 0, optimizers)
    if module.bias is not None:
        replace_parameter_(module, "bias", keep, 0, optimizers)
    setattr(module, size_attr, int(keep.numel()))


def _shrink_inputs_(module: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer], size_attr: str) -> None:
    """Columns of ``weight`` along dim 1; ``size_attr`` records the new size."""
    replace_parameter_(module, "weight", keep, 1, optimizers)
    setattr(module, size_attr, int(keep.numel()))


def shrink_linear_out_features_(layer: nn.Linear, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the output features ``keep`` of ``layer`` (rows of weight, entries of bias)."""
    _check_keep(keep, layer.out_features, "shrink_linear_out_features_")
    _shrink_outputs_(layer, keep, optimizers, "out_features")


def shrink_linear_in_features_(layer: nn.Linear, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the input features ``keep`` of ``layer`` (columns of weight)."""
    _check_keep(keep, layer.in_features, "shrink_linear_in_features_")
    _shrink_inputs_(layer, keep, optimizers, "in_features")


def _check_conv(conv: nn.Module, what: str) -> None:
    if not isinstance(conv, CONV_TYPES):
        allowed = [t.__name__ for t in CONV_TYPES]
        raise TypeError(f"{what}: unsupported module {type(conv).__name__}; allowed: {allowed}")
    if conv.groups != 1:
        raise ValueError(f"{what}: grouped/depthwise convolution (groups={conv.groups}) is not supported here "
                         "(a depthwise one: shrink_depthwise_conv_channels_)")


def shrink_conv_out_channels_(conv: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the output channels ``keep`` of a Conv1d/2d/3d with ``groups=1`` (filters and bias)."""
    _check_conv(conv, "shrink_conv_out_channels_")
    _check_keep(keep, conv.out_channels, "shrink_conv_out_channels_")
    _shrink_outputs_(conv, keep, optimizers, "out_channels")


def shrink_conv_in_channels_(conv: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the input channels ``keep`` of a Conv1d/2d/3d with ``groups=1`` (weight dim 1)."""
    _check_conv(conv, "shrink_conv_in_channels_")
    _check_keep(keep, conv.in_channels, "shrink_conv_in_channels_")
    _shrink_inputs_(conv, keep, optimizers, "in_channels")


def shrink_depthwise_conv_channels_(conv: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the channels ``keep`` of a depthwise convolution (its filters, bias and ``groups``)."""
    if not is_depthwise(conv):
        raise ValueError(f"shrink_depthwise_conv_channels_: expected a depthwise Conv1d/2d/3d (groups == in_channels "
                         f"== out_channels), got {conv!r}")
    _check_keep(keep, conv.out_channels, "shrink_depthwise_conv_channels_")
    _shrink_outputs_(conv, keep, optimizers, "out_channels")
    conv.in_channels = conv.groups = int(keep.numel())


def shrink_embedding_dim_(embedding: nn.Embedding, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the embedding dimensions ``keep`` (weight dim 1); the vocabulary is never cut."""
    _check_keep(keep, embedding.embedding_dim, "shrink_embedding_dim_")
    replace_parameter_(embedding, "weight", keep, 1, optimizers)
    embedding.embedding_dim = int(keep.numel())


def shrink_norm_(norm: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Shrink a LayerNorm or RMSNorm over its (single) last dimension, a BatchNorm's or InstanceNorm's channels, or
    a GroupNorm's channels in whole groups (its ``num_groups`` follows; one group: any channels)."""
    optimizers = list(optimizers)
    if isinstance(norm, nn.GroupNorm):
        _check_keep(keep, norm.num_channels, "shrink_norm_")
        per = norm.num_channels // norm.num_groups
        if norm.num_groups > 1:
            whole = keep.numel() % per == 0 and torch.equal(keep, expand_units(keep[::per] // per, per))
            if not whole:
                raise ValueError(f"shrink_norm_: a GroupNorm of {norm.num_groups} groups of {per} channels is cut in "
                                 f"whole groups; keep must be whole groups of {per} consecutive channels")
            norm.num_groups = int(keep.numel()) // per
        norm.num_channels = int(keep.numel())
    elif isinstance(norm, FEATURE_NORMS):
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"shrink_norm_: {type(norm).__name__} over {norm.normalized_shape} is not supported "
                             "(1-D only)")
        _check_keep(keep, norm.normalized_shape[0], "shrink_norm_")
        norm.normalized_shape = (int(keep.numel()),)
    elif isinstance(norm, CHANNEL_NORMS):
        _check_keep(keep, norm.num_features, "shrink_norm_")
        norm.num_features = int(keep.numel())
        replace_buffer_(norm, "running_mean", keep)
        replace_buffer_(norm, "running_var", keep)
    else:
        raise TypeError(f"shrink_norm_: unsupported module {type(norm).__name__}; allowed: LayerNorm, RMSNorm, "
                        "BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, GroupNorm")
    for name in ("weight", "bias"):
        if getattr(norm, name, None) is not None:
            replace_parameter_(norm, name, keep, 0, optimizers)
