"""Recurrent layers (``nn.GRU``, ``nn.LSTM``, ``nn.RNN``): hidden units, and the input features.

A hidden unit owns its rows of every gate in every layer's ``weight_ih``/``weight_hh``/biases, its column
of ``weight_hh`` and of the next layer's ``weight_ih``, and its feature of the output sequence. The tracer
cannot follow the fused recurrent op, so the layer is traced as one opaque layer (input width in, hidden
width out). Bidirectional layers and LSTM projections (``proj_size``) are refused.

Growth: new rows drawn like the layer's init (U(±1/sqrt(hidden))), zero columns where the new units feed
old ones (recurrence, next layer, consumers): the output does not change.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..optim import grow_parameter_, replace_parameter_
from ..shrink import _check_keep
from .base import Claim, ClaimContext, GrowInit, ParamSlice, SliceHandler, register, stand_in
from .heads import section_positions

RNN_HIDDEN, RNN_IN = "rnn_hidden", "rnn_in"
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _gates(rnn: nn.RNNBase) -> int:
    return GATES[rnn.mode]


def _refusal(rnn: nn.RNNBase) -> str | None:
    if rnn.bidirectional:
        return "bidirectional"
    if getattr(rnn, "proj_size", 0):
        return f"LSTM with proj_size={rnn.proj_size}"
    return None


def _params(rnn: nn.RNNBase, layer: int) -> list[str]:
    return [n for n in (f"weight_ih_l{layer}", f"weight_hh_l{layer}", f"bias_ih_l{layer}", f"bias_hh_l{layer}")
            if getattr(rnn, n, None) is not None]


def shrink_rnn_hidden_(rnn: nn.RNNBase, keep: Tensor, optimizers: Sequence[Optimizer] = ()) -> None:
    """Keep only the hidden units ``keep`` in every layer of ``rnn``."""
    h, g = int(rnn.hidden_size), _gates(rnn)
    _check_keep(keep, h, "shrink_rnn_hidden_")
    rows = torch.cat([keep + i * h for i in range(g)])
    for layer in range(rnn.num_layers):
        for name in _params(rnn, layer):
            replace_parameter_(rnn, name, rows, 0, optimizers)
        replace_parameter_(rnn, f"weight_hh_l{layer}", keep, 1, optimizers)
        if layer > 0:
            replace_parameter_(rnn, f"weight_ih_l{layer}", keep, 1, optimizers)
    rnn.hidden_size = int(keep.numel())
    rnn.flatten_parameters()


def grow_rnn_hidden_(rnn: nn.RNNBase, n: int, optimizers: Sequence[Optimizer], init: GrowInit) -> None:
    """Append ``n`` hidden units to every layer (rows drawn like the init, zero outgoing columns)."""
    h, g = int(rnn.hidden_size), _gates(rnn)
    rows = section_positions(h, n, 1, g)
    bound = 1.0 / math.sqrt(h + n)
    for layer in range(rnn.num_layers):
        for name in _params(rnn, layer):
            p = getattr(rnn, name)
            grow_parameter_(rnn, name, init.uniform(p, (rows.numel(), *p.shape[1:]), bound), 0, optimizers, rows)
    for layer in range(rnn.num_layers):
        names = [f"weight_hh_l{layer}"] + ([f"weight_ih_l{layer}"] if layer > 0 else [])
        for name in names:
            p = getattr(rnn, name)
            grow_parameter_(rnn, name, p.new_zeros(p.shape[0], n), 1, optimizers)
    rnn.hidden_size = h + n
    rnn.flatten_parameters()


@register
class RNNHandler(SliceHandler):
    kinds = {RNN_HIDDEN: "out", RNN_IN: "in"}
    size_attrs = ("input_size", "hidden_size")
    priority = 10

    def owns(self, module: nn.Module, kind: str) -> bool:
        return isinstance(module, nn.RNNBase)

    def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
        if not isinstance(module, nn.RNNBase):
            return None
        why = _refusal(module)
        if why:
            return f"coupled to {type(module).__name__} '{{}}' ({why}: not supported)"
        return Claim(RNN_HIDDEN if is_out else RNN_IN)

    def trace_as_layer(self, module: nn.Module) -> tuple[int, int] | None:
        if not isinstance(module, nn.RNNBase):
            return None
        return int(module.input_size), int(module.hidden_size) * (2 if module.bidirectional else 1)

    def trace_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """A stand-in output of the hidden width whose autograd node leads straight to the input."""
        out = stand_in(args[0] if args else kwargs.get("input"), self.trace_as_layer(module)[1])
        return None if out is None or not isinstance(output, tuple) else (out, output[1])

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        return int(module.hidden_size if kind == RNN_HIDDEN else module.input_size)

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        if kind == RNN_IN:
            return [ParamSlice("", "weight_ih_l0", 1, None)]
        units = torch.arange(int(module.hidden_size)).repeat(_gates(module))
        out = []
        for layer in range(module.num_layers):
            out += [ParamSlice("", name, 0, units) for name in _params(module, layer)]
            out.append(ParamSlice("", f"weight_hh_l{layer}", 1, None))
            if layer > 0:
                out.append(ParamSlice("", f"weight_ih_l{layer}", 1, None))
        return out

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        if kind == RNN_HIDDEN:
            shrink_rnn_hidden_(module, keep, optimizers)
            return
        _check_keep(keep, int(module.input_size), "shrink_rnn_in_features_")
        replace_parameter_(module, "weight_ih_l0", keep, 1, optimizers)
        module.input_size = int(keep.numel())
        module.flatten_parameters()

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        if kind == RNN_HIDDEN:
            grow_rnn_hidden_(module, n, optimizers, init)
            return
        w = module.weight_ih_l0
        grow_parameter_(module, "weight_ih_l0", w.new_zeros(w.shape[0], n), 1, optimizers)
        module.input_size += n
        module.flatten_parameters()
