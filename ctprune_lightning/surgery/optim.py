"""Keep optimizers consistent across surgery: the one place that swaps a Parameter.

A shrunk (or grown, or re-parametrised) tensor must be a *new* ``nn.Parameter`` (changing
``param.data`` in place breaks autograd's cached accumulators), so every optimizer that held the old
Parameter must hold the new one in the same slot of the same param group, with its state carried
over by a rule: sliced with the kept indices (:func:`replace_parameter_`), re-initialised
(balanced truncation), or dropped (a rollback that reloads the optimizer's own state afterwards).
The LR scheduler is bound to the optimizer, not to parameters, so it keeps its position untouched.

Example::

    new = replace_parameter_(layer, "weight", keep, dim=0, optimizers=trainer.optimizers)
    swap_parameter_(layer, "B_re", data, optimizers, state_fn=lambda state, old, new: {})
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

#: ``state_fn(old_state, old_param, new_param) -> new_state`` says what a swap does to a slot's state.
StateFn = Callable[[dict, Tensor, Tensor], dict]


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


def memory_format(t: Tensor) -> torch.memory_format:
    """The layout ``t`` is dense in: ``channels_last`` (4-D) or ``channels_last_3d`` (5-D) where it is that and not
    the default contiguous layout, else ``contiguous_format``.

    >>> memory_format(torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last))
    torch.channels_last
    """
    for dim, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if t.dim() == dim and not t.is_contiguous() and t.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def swap_in_optimizers_(old: Tensor, new: Tensor, optimizers: Iterable[Optimizer], state_fn: StateFn | None) -> None:
    """Put ``new`` where ``old`` was in every optimizer; its state becomes ``state_fn(state, old, new)``, each
    per-element state tensor in ``new``'s memory format (a slice or a growth of a ``channels_last`` moment is
    not).

    ``state_fn=None`` drops the state (the slot starts fresh, or the caller loads a state dict next).
    """
    fmt = memory_format(new)
    for opt in optimizers:
        for group in opt.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                if p is old:  # identity: `in` would compare tensors elementwise
                    params[i] = new
        if old in opt.state:  # state is keyed by the tensor's hash (its id)
            state = opt.state.pop(old)
            if state_fn is not None:
                opt.state[new] = {k: v.contiguous(memory_format=fmt)
                                  if isinstance(v, Tensor) and v.shape == new.shape else v
                                  for k, v in state_fn(state, old, new).items()}


def swap_parameter_(module: nn.Module, name: str, data: Tensor, optimizers: Iterable[Optimizer] = (),
                    state_fn: StateFn | None = None) -> nn.Parameter:
    """Replace ``module.<name>`` by a new Parameter holding ``data`` (the old dtype, device, memory format --
    a ``channels_last`` convolution stays one -- and ``requires_grad``: frozen stays frozen), in the old
    Parameter's optimizer slots; see :func:`swap_in_optimizers_` for ``state_fn``. The old gradient is dropped."""
    old = getattr(module, name)
    data = data.detach().to(device=old.device, dtype=old.dtype)
    fmt = memory_format(old) if data.dim() == old.dim() else torch.contiguous_format
    new = nn.Parameter(data.clone(memory_format=torch.preserve_format if fmt == torch.contiguous_format else fmt),
                       requires_grad=old.requires_grad)
    swap_in_optimizers_(old, new, optimizers, state_fn)
    setattr(module, name, new)
    return new


def replace_parameter_(
    module: nn.Module, name: str, keep: Tensor, dim: int, optimizers: Iterable[Optimizer] = ()
) -> nn.Parameter:
    """Replace ``module.<name>`` by a new Parameter holding ``index_select(dim, keep)``, optimizer
    state sliced alike (``step`` kept)."""
    old = getattr(module, name)
    keep = keep.to(old.device)
    with torch.no_grad():
        data = old.detach().index_select(dim, keep)
    return swap_parameter_(module, name, data, optimizers, lambda state, o, n: slice_state_(state, o, keep, dim))


def replace_buffer_(module: nn.Module, name: str, keep: Tensor, dim: int = 0) -> None:
    """Slice a buffer (e.g. BatchNorm running statistics) in place of the old one."""
    buf = getattr(module, name)
    if buf is None or buf.dim() == 0:
        return
    module.register_buffer(name, buf.index_select(dim, keep.to(buf.device)).clone())


def optimizer_params(optimizers: Iterable[Optimizer]) -> list[Tensor]:
    """All parameters the optimizers update, in order."""
    return [p for opt in optimizers for g in opt.param_groups for p in g["params"]]


def live_parameters_missing(model: nn.Module, optimizers: Iterable[Any]) -> list[str]:
    """Names of trainable parameters of ``model`` that no optimizer holds (a stale optimizer)."""
    held = {id(p) for p in optimizer_params(optimizers)}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]


def interleave(old: Tensor, fresh: Tensor, dim: int, positions: Tensor | None = None) -> Tensor:
    """``old`` with ``fresh`` inserted along ``dim`` at ``positions`` of the result (default: appended).

    >>> interleave(torch.tensor([1., 2.]), torch.tensor([9.]), 0, torch.tensor([1])).tolist()
    [1.0, 9.0, 2.0]
    """
    size = old.shape[dim] + fresh.shape[dim]
    if positions is None:
        positions = torch.arange(old.shape[dim], size)
    positions = positions.to(old.device)
    new = torch.zeros(size, dtype=torch.bool, device=old.device)
    new[positions] = True
    shape = list(old.shape)
    shape[dim] = size
    out = old.new_empty(shape)
    out.index_copy_(dim, (~new).nonzero().flatten(), old)
    out.index_copy_(dim, positions, fresh.to(device=old.device, dtype=old.dtype))
    return out


def grow_state_(state: dict, old: Tensor, dim: int, positions: Tensor) -> dict:
    """Optimizer state of a grown parameter: old entries kept, new slots zero (a fresh parameter's moments);
    scalars (Adam's ``step``) kept, so every element of the tensor shares one step count."""
    out = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == old.shape and value.dim() > 0:
            shape = list(value.shape)
            shape[dim] = int(positions.numel())
            out[key] = interleave(value, value.new_zeros(shape), dim, positions)
        else:
            out[key] = value
    return out


def grow_parameter_(module: nn.Module, name: str, fresh: Tensor, dim: int, optimizers: Iterable[Optimizer] = (),
                    positions: Tensor | None = None) -> nn.Parameter:
    """Replace ``module.<name>`` by a new Parameter with ``fresh`` inserted along ``dim`` at ``positions``
    (default: appended), in the old Parameter's optimizer slots with the state grown alike
    (:func:`grow_state_`: zero moments for the new slots, ``step`` kept)."""
    old = getattr(module, name)
    if positions is None:
        positions = torch.arange(old.shape[dim], old.shape[dim] + fresh.shape[dim])
    with torch.no_grad():
        data = interleave(old.detach(), fresh, dim, positions)
    return swap_parameter_(module, name, data, optimizers, lambda state, o, n: grow_state_(state, o, dim, positions))


def grow_buffer_(module: nn.Module, name: str, fresh: Tensor, dim: int = 0) -> None:
    """Append ``fresh`` to a buffer along ``dim`` (e.g. BatchNorm running statistics)."""
    buf = getattr(module, name)
    if buf is None or buf.dim() == 0:
        return
    module.register_buffer(name, interleave(buf, fresh, dim))
