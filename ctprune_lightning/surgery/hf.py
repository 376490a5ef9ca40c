"""Hugging Face ``transformers`` models: GPT-2 (``Conv1D``), Llama-style grouped-query attention, BERT.

Nothing here imports ``transformers``: modules are recognised by duck typing (attribute names and
shapes, as read by the forward code of transformers 5.x), so the core package works without it.

- ``Conv1D`` (GPT-2's ``c_fc``/``c_proj``/``c_attn``, in ``transformers.pytorch_utils``) is a Linear
  with the weight transposed: ``weight`` is ``[nx, nf]`` = [in, out], ``bias`` is ``[nf]``; its forward
  reads ``nf``. Its outputs are cut along weight dim 1, its inputs along dim 0.
- Head layouts (a unit is a head, or under grouped-query attention a key/value group: one k/v head
  with the ``num_key_value_groups`` query heads that read it; Ainslie et al. 2023, "GQA",
  arXiv:2305.13245), with the per-layer attributes kept in step:

  - ``gpt2`` (``GPT2Attention``): ``c_attn`` (Conv1D, [q | k | v], head-major) and ``c_proj``;
    ``num_heads`` and ``split_size`` (its forward splits ``c_attn``'s output by ``split_size``).
  - ``llama`` (``LlamaAttention`` and look-alikes): ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``;
    the forward reads only ``head_dim`` and ``num_key_value_groups``, which do not change;
    ``num_heads``/``num_key_value_heads`` are updated when a module has them.
  - ``bert`` (``BertAttention``): ``self.query/key/value`` and ``output.dense``;
    ``self.num_attention_heads`` and ``self.all_head_size``.

  MLPs need nothing special beyond Conv1D: Llama's gate/up/down and BERT's intermediate/output are
  Linear groups (a Llama MLP's ``intermediate_size`` is synced after a cut). The residual width stays
  dense: the attention modules are traced as opaque layers and refuse it.
  ``head_dim`` never changes. The shared ``model.config`` keeps the dense sizes: it is one object for
  every layer (layers differ after a cut) and these forwards read only per-module attributes; the
  per-layer sizes are in the modules and in the checkpoint's architecture spec (:mod:`.arch`), so
  rebuild a pruned model with ``apply_arch_``/``load_pruned``, not ``from_pretrained``.

Example::

    layout = find_hf_head_layout(model.model.layers[0].self_attn)   # HFHeadLayout('llama', ...)
    shrink_hf_heads_(model.model.layers[0].self_attn, torch.tensor([1]), optimizers)  # 2 kv groups -> 1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .attention import head_rows, head_units
from .optim import replace_parameter_
from .shrink import _check_keep, expand_units

CONV1D_OUT, CONV1D_IN = "conv1d_out", "conv1d_in"
HF_HEADS = "hf_heads"  # heads (or key/value groups) of a Hugging Face attention module
FAMILIES = ("gpt2", "llama", "bert")
RESIDUAL_REASON = ("coupled to the residual width of Hugging Face attention '{}' (its input/output width), which "
                   "cannot be shrunk yet")


@dataclass(frozen=True)
class HFHeadLayout:
    """Which family an attention module follows and its projections: q/k/v part(s), then the output."""

    family: str  # one of FAMILIES
    parts: tuple[str, ...]

    @property
    def qkv(self) -> tuple[str, ...]:
        return self.parts[:-1]

    @property
    def out(self) -> str:
        return self.parts[-1]


def is_conv1d(module: nn.Module) -> bool:
    """A ``transformers`` ``Conv1D``: ``weight`` of shape ``[nx, nf]``, ``nf``/``nx`` ints."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, Tensor) and w.dim() == 2
            and isinstance(getattr(module, "nf", None), int) and isinstance(getattr(module, "nx", None), int)
            and tuple(w.shape) == (module.nx, module.nf))


def _int(module: nn.Module, attr: str) -> int | None:
    v = getattr(module, attr, None)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _linear(module: nn.Module, path: str) -> nn.Linear | None:
    try:
        child = module.get_submodule(path)
    except AttributeError:
        return None
    return child if isinstance(child, nn.Linear) else None


def find_hf_head_layout(module: nn.Module) -> HFHeadLayout | None:
    """The layout of a GPT-2, Llama-style or BERT attention module, or None."""
    if (is_conv1d(getattr(module, "c_attn", nn.Identity())) and is_conv1d(getattr(module, "c_proj", nn.Identity()))
            and all(_int(module, a) is not None for a in ("num_heads", "head_dim", "split_size"))):
        return HFHeadLayout("gpt2", ("c_attn", "c_proj"))
    if (all(_linear(module, p) is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and _int(module, "head_dim") is not None and _int(module, "num_key_value_groups") is not None):
        return HFHeadLayout("llama", ("q_proj", "k_proj", "v_proj", "o_proj"))
    inner = getattr(module, "self", None)
    if (isinstance(inner, nn.Module) and _linear(module, "output.dense") is not None
            and all(_linear(inner, p) is not None for p in ("query", "key", "value"))
            and all(_int(inner, a) is not None for a in ("num_attention_heads", "attention_head_size",
                                                         "all_head_size"))):
        return HFHeadLayout("bert", ("self.query", "self.key", "self.value", "output.dense"))
    return None


def _out(module: nn.Module, path: str) -> int:
    m = module.get_submodule(path)
    return int(m.nf if is_conv1d(m) else m.out_features)


def head_dim(module: nn.Module, layout: HFHeadLayout) -> int:
    """Width of one head."""
    return int(module.self.attention_head_size if layout.family == "bert" else module.head_dim)


def head_count(module: nn.Module, layout: HFHeadLayout) -> int:
    """Number of units: heads (GPT-2, BERT) or key/value groups (Llama-style)."""
    if layout.family == "gpt2":
        return int(module.num_heads)
    if layout.family == "bert":
        return int(module.self.num_attention_heads)
    return _out(module, "k_proj") // int(module.head_dim)


def check_hf_head_layout(module: nn.Module, layout: HFHeadLayout) -> str | None:
    """Why the heads of ``module`` cannot be cut (shapes and attributes disagree), or None."""
    dim, n = head_dim(module, layout), head_count(module, layout)
    if layout.family == "gpt2":
        if getattr(module, "is_cross_attention", False) or hasattr(module, "q_attn"):
            return "GPT-2 cross-attention (separate q_attn, c_attn holds only k|v) is not supported"
        split, c_attn, c_proj = int(module.split_size), module.c_attn.nf, module.c_proj.nx
        if not (split == n * dim and c_attn == 3 * split and c_proj == split):
            return (f"c_attn width {c_attn}, c_proj inputs {c_proj} and split_size {split} do not match "
                    f"num_heads={n} of head_dim {dim}")
        return None
    if layout.family == "bert":
        inner = module.self
        if getattr(module, "is_cross_attention", False):
            return "BERT cross-attention is not supported"
        widths = [_out(module, p) for p in layout.qkv] + [module.get_submodule(layout.out).in_features]
        if widths != [n * dim] * 4 or int(inner.all_head_size) != n * dim:
            return (f"query/key/value widths and output.dense inputs {widths} (all_head_size "
                    f"{inner.all_head_size}) do not match num_attention_heads={n} of size {dim}")
        return None
    if _int(module, "hidden_size") is not None:  # transformers < 4.48 reshapes the output to hidden_size
        return (f"{type(module).__name__} has an int `hidden_size` (older transformers reshape the attention output "
                "to it), so its heads cannot be cut; upgrade transformers")
    q, k, v, o = (_out(module, "q_proj"), _out(module, "k_proj"), _out(module, "v_proj"),
                  module.o_proj.in_features)
    rep = int(module.num_key_value_groups)
    if k % dim or v != k or q != k * rep or o != q:
        return (f"q/k/v widths {[q, k, v]} and o_proj inputs {o} do not match head_dim={dim} with "
                f"num_key_value_groups={rep}")
    for attr, want in (("num_heads", n * rep), ("num_attention_heads", n * rep), ("num_key_value_heads", n)):
        have = _int(module, attr)
        if have is not None and have != want:
            return f"{attr}={have} disagrees with the projections ({want})"
    return None


def head_param_slices(module: nn.Module) -> list[tuple[str, str, int, Tensor]]:
    """``(child, parameter, dim, head of every index)`` for each tensor a head cut slices (child "" = the module)."""
    layout = _layout(module)
    n, dim = head_count(module, layout), head_dim(module, layout)
    if layout.family == "gpt2":
        units = head_units(n, dim, fused=True)
        return [("c_attn", "weight", 1, units), ("c_attn", "bias", 0, units),
                ("c_proj", "weight", 0, head_units(n, dim, fused=False))]
    q_block = dim * (int(module.num_key_value_groups) if layout.family == "llama" else 1)
    q_units, kv_units = torch.arange(n).repeat_interleave(q_block), torch.arange(n).repeat_interleave(dim)
    out: list[tuple[str, str, int, Tensor]] = []
    for part, units in zip(layout.qkv, (q_units, kv_units, kv_units)):
        out += [(part, "weight", 0, units), (part, "bias", 0, units)]
    return out + [(layout.out, "weight", 1, q_units)]


def _layout(module: nn.Module) -> HFHeadLayout:
    layout = find_hf_head_layout(module)
    if layout is None:
        raise TypeError(f"{type(module).__name__} is not a Hugging Face attention module of a known family "
                        f"{FAMILIES} (GPT-2 c_attn/c_proj Conv1D, Llama q/k/v/o_proj, BERT self.query/key/value)")
    return layout


def shrink_conv1d_out_features_(conv: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the output features ``keep`` of a ``Conv1D`` (weight columns, bias entries, ``nf``)."""
    if not is_conv1d(conv):
        raise TypeError(f"shrink_conv1d_out_features_: expected a transformers Conv1D, got {type(conv).__name__}")
    _check_keep(keep, conv.nf, "shrink_conv1d_out_features_")
    optimizers = list(optimizers)
    replace_parameter_(conv, "weight", keep, 1, optimizers)
    replace_parameter_(conv, "bias", keep, 0, optimizers)
    conv.nf = int(keep.numel())


def shrink_conv1d_in_features_(conv: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the input features ``keep`` of a ``Conv1D`` (weight rows, ``nx``)."""
    if not is_conv1d(conv):
        raise TypeError(f"shrink_conv1d_in_features_: expected a transformers Conv1D, got {type(conv).__name__}")
    _check_keep(keep, conv.nx, "shrink_conv1d_in_features_")
    replace_parameter_(conv, "weight", keep, 0, optimizers)
    conv.nx = int(keep.numel())


def shrink_hf_heads_(attn: nn.Module, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the heads (Llama-style: key/value groups) ``keep``; per-layer attributes follow."""
    layout = _layout(attn)
    reason = check_hf_head_layout(attn, layout)
    if reason:
        raise ValueError(f"shrink_hf_heads_: {reason}")
    n, dim = head_count(attn, layout), head_dim(attn, layout)
    _check_keep(keep, n, "shrink_hf_heads_")
    optimizers, k = list(optimizers), int(keep.numel())
    if layout.family == "gpt2":
        shrink_conv1d_out_features_(attn.c_attn, head_rows(keep, n, dim, fused=True), optimizers)
        shrink_conv1d_in_features_(attn.c_proj, expand_units(keep, dim), optimizers)
        attn.num_heads, attn.split_size = k, k * dim
        return
    rep = int(attn.num_key_value_groups) if layout.family == "llama" else 1
    for part, block in zip(layout.parts, (rep * dim, dim, dim, rep * dim)):
        linear = attn.get_submodule(part)
        rows = expand_units(keep, block)
        if part == layout.out:
            replace_parameter_(linear, "weight", rows, 1, optimizers)
            linear.in_features = int(rows.numel())
            continue
        replace_parameter_(linear, "weight", rows, 0, optimizers)
        if linear.bias is not None:
            replace_parameter_(linear, "bias", rows, 0, optimizers)
        linear.out_features = int(rows.numel())
    if layout.family == "bert":
        attn.self.num_attention_heads, attn.self.all_head_size = k, k * dim
        return
    for attr, value in (("num_heads", k * rep), ("num_attention_heads", k * rep), ("num_key_value_heads", k)):
        if _int(attn, attr) is not None:
            setattr(attn, attr, value)


def sync_sizes_(model: nn.Module) -> None:
    """Per-layer bookkeeping the shrink functions cannot see: a Llama-style MLP's ``intermediate_size``."""
    for m in model.modules():
        down = getattr(m, "down_proj", None)
        if _int(m, "intermediate_size") is not None and isinstance(down, nn.Linear):
            m.intermediate_size = int(down.in_features)


def opaque_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """While tracing, a Hugging Face attention module outputs a copy of its input (same width).

    Torch-Pruning walks the autograd graph *through* a customized layer; the insides of these modules
    (rotary ``cat``, q/k/v ``split``, cache updates) confuse its index mapping, and their widths are
    handled by the handler anyway. A copy keeps the only coupling that matters: residual in -> residual out.
    """
    x = args[0] if args else kwargs.get("hidden_states")
    first = output[0] if isinstance(output, tuple) else output
    if not isinstance(x, Tensor) or not isinstance(first, Tensor) or x.shape != first.shape:
        return None
    return (x.clone(), *output[1:]) if isinstance(output, tuple) else x.clone()
