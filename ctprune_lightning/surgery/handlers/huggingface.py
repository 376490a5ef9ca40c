"""Hugging Face ``transformers`` families as data (:mod:`ctprune_lightning.surgery.hf`): ``Conv1D`` features
and the heads of GPT-2, Llama-style (a unit = a key/value group) and BERT attention; nothing here imports
``transformers``.

Growth: ``Conv1D`` outputs drawn like GPT-2's init (N(0, 0.02²), zero bias), inputs zero; new heads get q/k/v
rows drawn like the projections' init and zero output-projection inputs.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn
from torch.optim import Optimizer

from .. import hf
from ..optim import grow_parameter_
from .base import Claim, ClaimContext, GrowInit, OwnGroup, ParamSlice, SliceHandler, fan_in_bound, register
from .heads import section_positions

CONV1D_OUT, CONV1D_IN, HF_HEADS = hf.CONV1D_OUT, hf.CONV1D_IN, hf.HF_HEADS
CONV1D_STD = 0.02  # transformers' Conv1D init

def grow_conv1d_out_features_(conv: nn.Module, n: int, optimizers: Sequence[Optimizer], init: GrowInit,
                              positions: Tensor | None = None) -> None:
    """Add ``n`` output features (weight columns N(0, 0.02²), zero bias) at ``positions`` (default: appended)."""
    grow_parameter_(conv, "weight", init.normal(conv.weight, (conv.nx, n), CONV1D_STD), 1, optimizers, positions)
    grow_parameter_(conv, "bias", conv.bias.new_zeros(n), 0, optimizers, positions)
    conv.nf += n

def grow_conv1d_in_features_(conv: nn.Module, n: int, optimizers: Sequence[Optimizer]) -> None:
    """Append ``n`` input features with zero weight rows."""
    grow_parameter_(conv, "weight", conv.weight.new_zeros(n, conv.nf), 0, optimizers)
    conv.nx += n

def grow_hf_heads_(module: nn.Module, n: int, optimizers: Sequence[Optimizer], init: GrowInit) -> None:
    """Append ``n`` heads (Llama-style: key/value groups) with a zero output projection."""
    layout = hf._layout(module)
    n_old, dim = hf.head_count(module, layout), hf.head_dim(module, layout)
    if layout.family == "gpt2":
        grow_conv1d_out_features_(module.c_attn, 3 * n * dim, optimizers, init, section_positions(n_old, n, dim, 3))
        grow_conv1d_in_features_(module.c_proj, n * dim, optimizers)
        module.num_heads, module.split_size = n_old + n, (n_old + n) * dim
        return
    rep = int(module.num_key_value_groups) if layout.family == "llama" else 1
    for part, block in zip(layout.parts, (rep * dim, dim, dim, rep * dim)):
        lin = module.get_submodule(part)
        if part == layout.out:
            grow_parameter_(lin, "weight", lin.weight.new_zeros(lin.out_features, n * block), 1, optimizers)
            lin.in_features += n * block
            continue
        bound = fan_in_bound(lin.in_features)
        grow_parameter_(lin, "weight", init.uniform(lin.weight, (n * block, lin.in_features), bound), 0, optimizers)
        if lin.bias is not None:
            grow_parameter_(lin, "bias", init.uniform(lin.bias, (n * block,), bound), 0, optimizers)
        lin.out_features += n * block
    k = n_old + n
    if layout.family == "bert":
        module.self.num_attention_heads, module.self.all_head_size = k, k * dim
        return
    for attr, value in (("num_heads", k * rep), ("num_attention_heads", k * rep), ("num_key_value_heads", k)):
        if hf._int(module, attr) is not None:
            setattr(module, attr, value)

@register
class HuggingFaceHandler(SliceHandler):
    kinds = {CONV1D_OUT: "out", CONV1D_IN: "in", HF_HEADS: "out"}
    size_attrs = ("nf", "nx", "split_size", "num_attention_heads", "attention_head_size", "all_head_size",
                  "intermediate_size")
    units = {HF_HEADS: "head"}
    priority = 50

    def owns(self, module: nn.Module, kind: str) -> bool:
        return hf.is_conv1d(module) if kind != HF_HEADS else hf.find_hf_head_layout(module) is not None

    def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
        if hf.is_conv1d(module):  # transformers' Conv1D (GPT-2): a Linear with the weight transposed
            return Claim(CONV1D_OUT if is_out else CONV1D_IN)
        if hf.find_hf_head_layout(module) is not None:
            return hf.RESIDUAL_REASON
        return None

    def own_group(self, module: nn.Module) -> OwnGroup | None:
        layout = hf.find_hf_head_layout(module)
        if layout is None:
            return None
        why = hf.check_hf_head_layout(module, layout)
        covers = tuple(n for n, _ in module.named_modules() if n)
        return OwnGroup(HF_HEADS, layout.parts, None if why is None else f"attention heads: {why}", covers)

    def trace_as_layer(self, module: nn.Module) -> tuple[int, int] | None:
        if hf.is_conv1d(module):
            return int(module.nx), int(module.nf)
        layout = hf.find_hf_head_layout(module)
        if layout is None:
            return None
        first = module.get_submodule(layout.qkv[0])
        return int(first.nx if hf.is_conv1d(first) else first.in_features), hf._out(module, layout.out)

    def trace_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if hf.is_conv1d(module):
            return None
        return hf.opaque_output(module, args, kwargs, output)

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        if kind == CONV1D_OUT:
            return int(module.nf)
        if kind == CONV1D_IN:
            return int(module.nx)
        return hf.head_count(module, hf._layout(module))

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        if kind == CONV1D_OUT:
            return [ParamSlice("", "weight", 1, None), ParamSlice("", "bias", 0, None)]
        if kind == CONV1D_IN:
            return [ParamSlice("", "weight", 0, None)]
        return [ParamSlice(*ps) for ps in hf.head_param_slices(module)]

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        fn = {CONV1D_OUT: hf.shrink_conv1d_out_features_, CONV1D_IN: hf.shrink_conv1d_in_features_,
              HF_HEADS: hf.shrink_hf_heads_}[kind]
        fn(module, keep, optimizers)

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        if kind == CONV1D_OUT:
            grow_conv1d_out_features_(module, n, optimizers, init)
        elif kind == CONV1D_IN:
            grow_conv1d_in_features_(module, n, optimizers)
        else:
            grow_hf_heads_(module, n, optimizers, init)

    def scaled_modules(self, module_name: str, kind: str, parts: tuple[str, ...]) -> list[str]:
        if kind != HF_HEADS:
            return [module_name]
        names = [module_name] + [f"{module_name}.{p}" for p in parts]
        parents = {f"{module_name}.{p.rpartition('.')[0]}" for p in parts if "." in p}  # BERT: `self` runs the SDPA
        return names + sorted(parents)
