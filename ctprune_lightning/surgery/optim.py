"""Keep optimizers consistent across surgery.

A shrunk tensor must be a *new* ``nn.Parameter`` (changing ``param.data`` in place breaks autograd's
cached accumulators), so every optimizer that held the old Parameter must hold the new one in the same
slot of the same param group, with its state moved over and sliced with the same indices. The LR
scheduler is bound to the optimizer, not to parameters, so it keeps its position untouched.

Example::

    new = replace_parameter_(layer, "weight", keep, dim=0, optimizers=trainer.optimizers)
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer


def slice_state_(state: dict, old: Tensor, keep: Tensor, dim: int) -> dict:
    """Slice every per-element state tensor (Adam moments, SGD momentum, ...) like the parameter.

    Scalars (e.g. Adam's ``step``) and tensors of another shape are kept as they are.
    """
    out = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == old.shape and value.dim() > 0:
            out[key] = value.index_select(dim, keep.to(value.device)).clone()
        else:
            out[key] = value
    return out


def swap_parameter_in_optimizers_(
    old: nn.Parameter, new: nn.Parameter, keep: Tensor, dim: int, optimizers: Iterable[Optimizer]
) -> None:
    """Put ``new`` where ``old`` was in every optimizer and move its (sliced) state."""
    for opt in optimizers:
        for group in opt.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                if p is old:  # identity: `in` would compare tensors elementwise
                    params[i] = new
        if old in opt.state:  # state is keyed by the tensor's hash (its id)
            opt.state[new] = slice_state_(opt.state.pop(old), old, keep, dim)


def replace_parameter_(
    module: nn.Module, name: str, keep: Tensor, dim: int, optimizers: Iterable[Optimizer] = ()
) -> nn.Parameter:
    """Replace ``module.<name>`` by a new Parameter holding ``index_select(dim, keep)``.

    ``requires_grad`` is preserved (frozen stays frozen); the gradient is dropped.
    """
    old = getattr(module, name)
    keep = keep.to(old.device)
    with torch.no_grad():
        data = old.detach().index_select(dim, keep).clone()
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    swap_parameter_in_optimizers_(old, new, keep, dim, optimizers)
    setattr(module, name, new)
    return new


def replace_buffer_(module: nn.Module, name: str, keep: Tensor, dim: int = 0) -> None:
    """Slice a buffer (e.g. BatchNorm running statistics) in place of the old one."""
    buf = getattr(module, name)
    if buf is None or buf.dim() == 0:
        return
    module.register_buffer(name, buf.index_select(dim, keep.to(buf.device)).clone())


def optimizer_params(optimizers: Iterable[Optimizer]) -> list[Tensor]:
    """All parameters the optimizers update, in order."""
    return [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
