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

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

#: ``state_fn(old_state, old_param, new_param) -> new_state`` says what a swap does to a slot's state.
StateFn = Callable[[dict, Tensor, Tensor], dict]


#: State keys holding a statistic of the parameter reduced over one dimension (removed from its shape), where the
#: shape alone cannot say which (a square weight): transformers' Adafactor keeps its factored second moment so.
REDUCED_OVER = {"exp_avg_sq_row": -1, "exp_avg_sq_col": -2}


def _same_rank(value: Tensor, old: Tensor) -> bool:
    """``value`` has ``old``'s rank and ``old``'s size or 1 along every dimension (Adam's moments; Adafactor's
    ``row_var``/``col_var`` in torch); one element next to a larger parameter is a scalar (``step`` of shape (1,))."""
    return (value.dim() == old.dim() > 0 and (value.numel() > 1 or old.numel() == 1)
            and all(v in (o, 1) for v, o in zip(value.shape, old.shape)))


def _reduced_over(key: str, value: Tensor, old: Tensor) -> int | None:
    """The dimension of ``old`` that ``value`` is a statistic over (``old``'s shape with it removed), or None; a key
    in :data:`REDUCED_OVER` says which where the shape fits several."""
    if value.dim() != old.dim() - 1 or value.dim() == 0:
        return None
    fits = [j for j in range(old.dim()) if tuple(value.shape) == tuple(old.shape[:j]) + tuple(old.shape[j + 1:])]
    hint = REDUCED_OVER.get(key)
    if hint is not None and hint % old.dim() in fits:
        return hint % old.dim()
    return fits[0] if len(fits) == 1 else None


def state_axis(key: str, value: Any, old: Tensor, dim: int) -> int | None:
    """The axis of an optimizer state value that is cut or grown with ``old`` along ``dim``, or None where the value
    is kept as it is: a scalar (``step``), a statistic reduced over ``dim`` (size 1 there, or that dimension
    removed, as transformers' Adafactor keeps ``exp_avg_sq_row``/``_col``)."""
    if not isinstance(value, Tensor):
        return None
    if _same_rank(value, old):
        return dim if value.shape[dim] == old.shape[dim] else None
    reduced = _reduced_over(key, value, old)
    if reduced is None or reduced == dim:
        return None
    return dim if dim < reduced else dim - 1


def uncarried(state: dict, old: Tensor) -> str | None:
    """The first key of a slot's state that no rule of :func:`state_axis` can cut or grow with ``old`` (a tensor of
    another shape, e.g. a Shampoo preconditioner or a block-quantised 8-bit moment, or a container of tensors, e.g.
    LBFGS's history), or None."""
    for key, value in state.items():
        if isinstance(value, Tensor):
            if value.numel() > 1 and not _same_rank(value, old) and _reduced_over(key, value, old) is None:
                return key
        elif isinstance(value, (list, tuple, dict)):
            items = value.values() if isinstance(value, dict) else value
            if any(isinstance(v, Tensor) and v.numel() > 1 for v in items):
                return key
    return None


def slice_state_(state: dict, old: Tensor, keep: Tensor, dim: int) -> dict:
    """Slice every per-element state tensor (Adam moments, SGD momentum, Adafactor's factored second moments...)
    like the parameter (:func:`state_axis`); scalars (e.g. Adam's ``step``) and statistics reduced over ``dim`` are
    kept as they are."""
    out = {}
    for key, value in state.items():
        axis = state_axis(key, value, old, dim)
        out[key] = value if axis is None else value.index_select(axis, keep.to(value.device)).clone()
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

    ``state_fn=None`` drops the state (the slot starts fresh, or the caller loads a state dict next). Where the
    shape changes, state that no per-element rule can carry restarts instead of going stale, with a warning: a
    slot holding :func:`uncarried` state, and a flat vector over all of an optimizer's parameters kept in a
    param group's first slot (LBFGS's direction and history).
    """
    fmt = memory_format(new)
    reshaped = old.shape != new.shape
    for opt in optimizers:
        held = False
        for group in opt.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                if p is old:  # identity: `in` would compare tensors elementwise
                    params[i] = new
                    held = True
        if old in opt.state:  # state is keyed by the tensor's hash (its id)
            state = opt.state.pop(old)
            key = uncarried(state, old) if reshaped and state_fn is not None else None
            if key is not None:
                _restart_warning(opt, key, "of a shape the parameter's cut cannot follow")
            elif state_fn is not None:
                opt.state[new] = {k: v.contiguous(memory_format=fmt)
                                  if isinstance(v, Tensor) and v.shape == new.shape else v
                                  for k, v in state_fn(state, old, new).items()}
        if held and reshaped:
            _restart_flat_state_(opt, old.numel() - new.numel())


def _restart_flat_state_(opt: Optimizer, removed: int) -> None:
    """Drop a slot holding a flat vector over all of ``opt``'s parameters as they were before a swap that took
    ``removed`` elements away (negative: added): LBFGS keeps its search direction and curvature history so, in
    its first parameter's slot. Only the first slot of each param group is read (a swap must not cost a pass
    over every slot); the total is summed only when that slot holds a vector longer than its parameter."""
    for group in opt.param_groups:
        first = group["params"][0] if group["params"] else None
        state = opt.state.get(first) if first is not None else None
        for key, value in (state or {}).items():
            items = value if isinstance(value, (list, tuple)) else [value]
            longer = [v for v in items if isinstance(v, Tensor) and v.dim() == 1 and v.numel() > first.numel()]
            if longer and any(v.numel() == _total(opt) + removed for v in longer):
                del opt.state[first]
                _restart_warning(opt, key, "a flat vector over all its parameters")
                break
    if getattr(opt, "_numel_cache", None) is not None:  # torch LBFGS caches its parameters' total size
        opt._numel_cache = None


def _total(opt: Optimizer) -> int:
    return sum(p.numel() for group in opt.param_groups for p in group["params"])


def _restart_warning(opt: Optimizer, key: str, what: str) -> None:
    warnings.warn(f"{type(opt).__name__}'s optimizer state {key!r} is {what}: it restarts at each surgery "
                  "that changes a parameter's shape", stacklevel=3)


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
    """Optimizer state of a grown parameter: old entries kept, new slots zero (a fresh parameter's moments) in
    every per-element tensor (:func:`state_axis`); scalars (Adam's ``step``) kept, so every element of the tensor
    shares one step count."""
    out = {}
    for key, value in state.items():
        axis = state_axis(key, value, old, dim)
        if axis is None:
            out[key] = value
        else:
            shape = list(value.shape)
            shape[axis] = int(positions.numel())
            out[key] = interleave(value, value.new_zeros(shape), axis, positions)
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
