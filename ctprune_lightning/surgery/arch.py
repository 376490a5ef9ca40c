"""The architecture as plain shapes: capture it, check it against a model, rebuild a model to it.

A spec maps qualified module names to their size attributes (those the slice handlers name,
:func:`~ctprune_lightning.surgery.handlers.size_attrs`) and the shapes of their own tensors::

    {"net.1": {"in_features": 784, "out_features": 424,
               "shapes": {"weight": [424, 784], "bias": [424]}}}

Rebuilding sets the attributes and replaces every tensor whose shape differs by a new (zero) tensor
of the recorded shape -- shrinking or *growing* the module -- so that ``load_state_dict`` can then fill
in the values. Everything is validated first: a bad spec raises :class:`ArchSpecError` and leaves the
model untouched.

Example::

    spec = capture_arch(model, ["net.1", "net.3"])
    apply_arch_(fresh_model, spec)            # fresh_model now has model's widths
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .handlers import size_attrs
from .optim import memory_format


class ArchSpecError(ValueError):
    """A spec or checkpoint that does not fit the model (or is not a spec at all)."""


def _size(value: Any) -> int | list[int] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
        return int(value[0]) if len(value) == 1 else [int(v) for v in value]
    return None


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p for n, p in module.named_parameters(recurse=False) if p is not None}
    out.update({n: b for n, b in module.named_buffers(recurse=False) if b is not None})
    return out


def capture_arch(model: nn.Module, module_names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Plain-Python spec of the named modules (default: every module that owns a tensor or has a size).

    Modules with a size attribute but no tensor of their own (an attention block's ``n_head``) are
    recorded too, so a rebuild restores their bookkeeping.
    """
    if module_names is None:
        module_names = [n for n, m in model.named_modules()
                        if _tensors(m) or any(_size(getattr(m, a, None)) is not None for a in size_attrs())]
    spec: dict[str, dict[str, Any]] = {}
    for name in module_names:
        module = model.get_submodule(name)
        entry: dict[str, Any] = {}
        for attr in size_attrs():
            size = _size(getattr(module, attr, None))
            if size is not None:
                entry[attr] = size
        entry["shapes"] = {n: [int(d) for d in t.shape] for n, t in _tensors(module).items()}
        spec[name] = entry
    return spec


def check_arch(model: nn.Module, spec: Mapping[str, Any], source: str = "spec") -> None:
    """Raise :class:`ArchSpecError` (naming ``source``) unless ``spec`` can be applied to ``model``."""
    if not isinstance(spec, Mapping):
        raise ArchSpecError(f"{source}: the architecture spec must be a mapping, got {type(spec).__name__}")
    modules = dict(model.named_modules())
    for name, entry in spec.items():
        if name not in modules:
            known = [n for n in modules if n][:12]
            raise ArchSpecError(f"{source}: the spec names module '{name}', which {type(model).__name__} does not "
                                f"have (it has e.g. {known}); is the checkpoint from a different model?")
        if not isinstance(entry, Mapping):
            raise ArchSpecError(f"{source}: the entry of module '{name}' must be a mapping, got {entry!r}")
        module, own = modules[name], _tensors(modules[name])
        for attr, value in entry.items():
            if attr == "shapes":
                for tname, shape in value.items():
                    if tname not in own:
                        raise ArchSpecError(f"{source}: module '{name}' ({type(module).__name__}) has no tensor "
                                            f"'{tname}'; it has {sorted(own)}")
                    if len(shape) != own[tname].dim():
                        raise ArchSpecError(f"{source}: '{name}.{tname}' has {own[tname].dim()} dims, the spec "
                                            f"says {shape}")
            elif attr not in size_attrs() or not hasattr(module, attr):
                raise ArchSpecError(f"{source}: module '{name}' ({type(module).__name__}) has no size "
                                    f"attribute '{attr}'")
            elif _size(value) is None:
                raise ArchSpecError(f"{source}: '{name}.{attr}' must be an int, got {value!r}")


def expected_shapes(model: nn.Module, spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes ``model`` will have once ``spec`` is applied."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, entry in spec.items():
        for tname, shape in entry.get("shapes", {}).items():
            key = f"{name}.{tname}" if name else tname
            if key in shapes:  # non-persistent buffers (e.g. rotary inv_freq) are not in a state dict
                shapes[key] = tuple(int(d) for d in shape)
    return shapes


def check_state_dict(model: nn.Module, spec: Mapping[str, Any], state_dict: Mapping[str, Any],
                     source: str = "checkpoint", strict: bool = True) -> None:
    """Raise unless ``state_dict`` loads into ``model`` rebuilt to ``spec`` (keys and shapes)."""
    shapes = expected_shapes(model, spec)
    missing = sorted(set(shapes) - set(state_dict)) if strict else []
    unexpected = sorted(set(state_dict) - set(shapes)) if strict else []
    wrong = sorted(k for k, v in state_dict.items()
                   if k in shapes and hasattr(v, "shape") and tuple(v.shape) != shapes[k])
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label} {keys[:5]}{' ...' if len(keys) > 5 else ''}" for label, keys in
                           (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
                           if keys)
        raise ArchSpecError(f"{source}: its weights do not fit {type(model).__name__} ({detail}); "
                            "is the checkpoint from a different model?")


def apply_arch_(model: nn.Module, spec: Mapping[str, Any], source: str = "spec") -> None:
    """Rebuild ``model`` in place to the spec's sizes (shrinking or growing modules).

    New tensors are zero-filled placeholders (load the weights afterwards); ``requires_grad`` is kept.
    """
    check_arch(model, spec, source)
    # children first: a parent's size attribute may be derived from (and checked against) its children
    for name, entry in sorted(spec.items(), key=lambda kv: -kv[0].count(".") - bool(kv[0])):
        module = model.get_submodule(name)
        own = _tensors(module)
        for attr, value in entry.items():
            if attr == "shapes":
                continue
            current = getattr(module, attr)
            setattr(module, attr, (int(value),) if isinstance(current, tuple) and isinstance(value, int)
                    else tuple(value) if isinstance(current, tuple) else int(value))
        for tname, shape in entry.get("shapes", {}).items():
            old = own[tname]
            if list(old.shape) == list(shape):
                continue
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            if new.dim() == old.dim():  # a channels_last convolution stays one
                new = new.contiguous(memory_format=memory_format(old))
            if isinstance(old, nn.Parameter):
                setattr(module, tname, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module.register_buffer(tname, new)
