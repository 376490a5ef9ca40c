"""Mixture-of-experts FFNs: Hugging Face's fused experts modules (``MixtralExperts``, ``Qwen2MoeExperts``, ...)
as data; nothing here imports ``transformers``.

transformers 5.x keeps all experts of a layer in 3-D Parameters: ``gate_up_proj`` ``[experts, 2·I, hidden]``
(gate rows then up rows; ``is_concatenated=False``: interleaved gate/up pairs; ``is_transposed=True``:
``[experts, hidden, 2·I]``; ``has_gate=False``: ``up_proj`` ``[experts, I, hidden]``), ``down_proj``
``[experts, hidden, I]`` (transposed: ``[experts, I, hidden]``), optional ``<proj>_bias``. A unit is one
intermediate index ``i`` of the expert FFN: its gate and up rows and its down-projection column.

**One group per MoE layer, not one per expert.** A fused 3-D tensor holds one intermediate width for every
expert, so per-expert widths cannot differ: the experts of a layer are cut together, unit ``i`` is index
``i`` in *every* expert, and its importance is summed over the experts (the slices span the expert axis).
The router is not touched: it selects experts, and the number of experts does not change, so routing stays
consistent (the router is reported dense with that reason). A layer whose experts are separate modules
(``nn.ModuleList`` of MLPs) needs nothing from here: each expert's ``Linear`` layers are traced as usual.

Growth: new gate/up rows drawn like the experts' init (N(0, 0.02²); ``match``: the tensor's own std) in every
expert, zero down-projection columns: the output does not change. With the ``grouped_mm`` experts kernel the
new width must stay a multiple of :func:`alignment` (refused otherwise, before anything changes).

The group is internal to the module (:meth:`MoEExpertsHandler.own_group`), like attention heads: the
module's input and output (the residual width) are not part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..optim import grow_parameter_, replace_parameter_
from ..shrink import _check_keep
from .base import Claim, ClaimContext, GrowInit, OwnGroup, ParamSlice, SliceHandler, register
from .heads import section_positions

MOE_FFN = "moe_ffn"
EXPERT_INIT_STD = 0.02  # transformers' init of the fused expert tensors (initializer_range)
ROUTER_REASON = ("MoE router ({}): it selects experts and the number of experts is not cut (each expert's FFN "
                 "width is cut in the experts' own group), so it stays dense and routing stays consistent")


@dataclass(frozen=True)
class ExpertsLayout:
    """Where a fused experts module keeps its units: the in-projection (``gate_up_proj`` or ``up_proj``) and
    the dim of the unit axis in it and in ``down_proj``; ``sections`` = 2 with a gate, 1 without."""

    inp: str
    in_dim: int
    down_dim: int
    sections: int
    concatenated: bool

    def width(self, module: nn.Module) -> int:
        return int(module.down_proj.shape[self.down_dim])

    def in_units(self, width: int) -> Tensor:
        """The unit of each row (along ``in_dim``) of the in-projection."""
        units = torch.arange(width)
        return units.repeat(self.sections) if self.concatenated else units.repeat_interleave(self.sections)

    def in_rows(self, keep: Tensor, width: int) -> Tensor:
        """The in-projection rows of the units ``keep`` (in the same layout)."""
        if self.concatenated:
            return torch.cat([keep + s * width for s in range(self.sections)])
        return (keep[:, None] * self.sections + torch.arange(self.sections, device=keep.device)).flatten()

    def new_rows(self, width: int, n: int) -> Tensor:
        """The in-projection rows ``n`` appended units take in the grown tensor."""
        if self.concatenated:
            return section_positions(width, n, 1, self.sections)
        return torch.arange(width * self.sections, (width + n) * self.sections)


def _param3(module: nn.Module, name: str) -> nn.Parameter | None:
    p = getattr(module, name, None)
    return p if isinstance(p, nn.Parameter) and p.dim() == 3 else None


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a fused experts module (3-D ``down_proj`` and ``gate_up_proj``/``up_proj``), or None."""
    down = _param3(module, "down_proj")
    if down is None:
        return None
    has_gate = _param3(module, "gate_up_proj") is not None
    inp = "gate_up_proj" if has_gate else "up_proj"
    if _param3(module, inp) is None:
        return None
    transposed = bool(getattr(module, "is_transposed", False))
    return ExpertsLayout(inp, 2 if transposed else 1, 1 if transposed else 2, 2 if has_gate else 1,
                         bool(getattr(module, "is_concatenated", True)))


def experts_refusal(module: nn.Module, layout: ExpertsLayout) -> str | None:
    """Why a fused experts module's FFN width cannot be cut (shapes that do not fit the layout), or None."""
    inp, down = getattr(module, layout.inp), module.down_proj
    width = layout.width(module)
    if inp.shape[0] != down.shape[0]:
        return f"{layout.inp} has {inp.shape[0]} experts, down_proj {down.shape[0]}"
    if inp.shape[layout.in_dim] != layout.sections * width:
        return (f"{layout.inp} has {inp.shape[layout.in_dim]} rows along dim {layout.in_dim}, expected "
                f"{layout.sections} x {width} (the intermediate width of down_proj)")
    bias = getattr(module, f"{layout.inp}_bias", None)
    if isinstance(bias, Tensor) and bias.shape[-1] != layout.sections * width:
        return f"{layout.inp}_bias has {bias.shape[-1]} entries, expected {layout.sections * width}"
    return None


def alignment(module: nn.Module) -> int | None:
    """The intermediate widths a fused experts module can run at are multiples of this (None: any width).

    transformers' default experts implementation (``grouped_mm``) calls a kernel that needs every stride of
    its operands to be a multiple of 16 bytes (the down-projection rows hold ``I`` elements): ``I`` must be a
    multiple of 16 / element size (fp32: 4, bf16: 8; read at discovery). The ``eager`` implementation (a
    loop over experts) runs at any width.
    """
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    if impl == "eager":
        return None
    return max(1, 16 // module.down_proj.element_size())


def is_router(module: nn.Module) -> bool:
    """A top-k router of a MoE layer (``MixtralTopKRouter``, ...): a ``[experts, hidden]`` weight."""
    w = getattr(module, "weight", None)
    n = getattr(module, "num_experts", None)
    return (type(module).__name__.endswith("Router") and isinstance(w, nn.Parameter) and w.dim() == 2
            and isinstance(n, int) and w.shape[0] == n)


def shrink_experts_ffn_(module: nn.Module, keep: Tensor, optimizers: Sequence[Optimizer] = ()) -> None:
    """Keep the intermediate units ``keep`` in every expert (optimizer state sliced alike)."""
    layout = experts_layout(module)
    width = layout.width(module)
    _check_keep(keep, width, "shrink_experts_ffn_")
    rows = layout.in_rows(keep, width)
    replace_parameter_(module, layout.inp, rows, layout.in_dim, optimizers)
    if isinstance(getattr(module, f"{layout.inp}_bias", None), nn.Parameter):
        replace_parameter_(module, f"{layout.inp}_bias", rows, 1, optimizers)
    replace_parameter_(module, "down_proj", keep, layout.down_dim, optimizers)
    module.intermediate_dim = int(keep.numel())


def grow_experts_ffn_(module: nn.Module, n: int, optimizers: Sequence[Optimizer], init: GrowInit) -> None:
    """Append ``n`` intermediate units to every expert: gate/up rows drawn, zero down-projection columns."""
    layout = experts_layout(module)
    width = layout.width(module)
    align = alignment(module)
    if align and (width + n) % align:  # before anything changes: the kernel would fail at the next forward
        raise ValueError(f"grow_experts_ffn_: {width} + {n} units is not a multiple of {align}, which the grouped_mm "
                         "experts kernel needs (16-byte strides); grow by a multiple of the group's round_to")
    rows = layout.new_rows(width, n)
    inp = getattr(module, layout.inp)
    shape = list(inp.shape)
    shape[layout.in_dim] = int(rows.numel())
    grow_parameter_(module, layout.inp, init.normal(inp, shape, EXPERT_INIT_STD), layout.in_dim, optimizers, rows)
    bias = getattr(module, f"{layout.inp}_bias", None)
    if isinstance(bias, nn.Parameter):
        grow_parameter_(module, f"{layout.inp}_bias", bias.new_zeros(bias.shape[0], rows.numel()), 1, optimizers,
                        rows)
    down = module.down_proj
    shape = list(down.shape)
    shape[layout.down_dim] = n
    grow_parameter_(module, "down_proj", down.new_zeros(shape), layout.down_dim, optimizers)
    module.intermediate_dim = width + n


@register
class MoEExpertsHandler(SliceHandler):
    kinds = {MOE_FFN: "out"}
    size_attrs = ("intermediate_dim",)
    priority = 50

    def owns(self, module: nn.Module, kind: str) -> bool:
        return experts_layout(module) is not None

    def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
        if experts_layout(module) is not None:
            return ("coupled to the input/output (residual) width of MoE experts '{}', which cannot be shrunk "
                    "yet (their FFN width can)")
        if is_router(module):
            return ROUTER_REASON.format("'{}'")
        return None

    def own_group(self, module: nn.Module) -> OwnGroup | None:
        if is_router(module):
            return OwnGroup(MOE_FFN, (), ROUTER_REASON.format(type(module).__name__))
        layout = experts_layout(module)
        if layout is None:
            return None
        why = experts_refusal(module, layout)
        return OwnGroup(MOE_FFN, (), None if why is None else f"MoE experts: {why}", round_to=alignment(module))

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        return experts_layout(module).width(module)

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        layout = experts_layout(module)
        units = layout.in_units(layout.width(module))
        out = [ParamSlice("", layout.inp, layout.in_dim, units)]
        if isinstance(getattr(module, f"{layout.inp}_bias", None), nn.Parameter):
            out.append(ParamSlice("", f"{layout.inp}_bias", 1, units))
        return out + [ParamSlice("", "down_proj", layout.down_dim, None)]

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        shrink_experts_ffn_(module, keep, optimizers)

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        grow_experts_ffn_(module, n, optimizers, init)
