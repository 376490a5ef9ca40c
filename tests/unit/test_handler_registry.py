"""A layer type the package does not know, made prunable and growable by a handler defined in this file."""

from __future__ import annotations

from typing import Any, Sequence

import pytest
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ctprune_lightning.surgery import apply_plan_, discover_groups
from ctprune_lightning.surgery.arch import apply_arch_, capture_arch
from ctprune_lightning.surgery.handlers import (REGISTRY, Claim, ClaimContext, GrowInit, ParamSlice, SliceHandler,
                                                register, stand_in)
from ctprune_lightning.surgery.optim import grow_parameter_, live_parameters_missing, replace_parameter_


class Gain(nn.Module):
    """y = x * gain + shift, per feature (the tracer cannot follow it: bare Parameters in a product)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.gain, self.shift = nn.Parameter(torch.rand(features) + 0.5), nn.Parameter(torch.randn(features))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain + self.shift


@pytest.fixture
def gain_handler() -> Any:
    before = list(REGISTRY)

    @register
    class GainHandler(SliceHandler):
        kinds = {"gain": "through"}
        size_attrs = ("features",)

        def owns(self, module: nn.Module, kind: str) -> bool:
            return isinstance(module, Gain)

        def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
            return Claim("gain") if isinstance(module, Gain) else None

        def trace_as_layer(self, module: nn.Module) -> tuple[int, int] | None:
            return (module.features, module.features) if isinstance(module, Gain) else None

        def trace_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return stand_in(args[0], module.features)

        def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
            return module.features

        def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
            return [ParamSlice("", "gain", 0, None), ParamSlice("", "shift", 0, None)]

        def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                    optimizers: Sequence[Optimizer]) -> None:
            for name in ("gain", "shift"):
                replace_parameter_(module, name, keep, 0, optimizers)
            module.features = int(keep.numel())

        def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
                  optimizers: Sequence[Optimizer], init: GrowInit) -> None:
            grow_parameter_(module, "gain", module.gain.new_ones(n), 0, optimizers)
            grow_parameter_(module, "shift", module.shift.new_zeros(n), 0, optimizers)
            module.features += n

    yield GainHandler
    REGISTRY[:] = before


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), Gain(12), nn.ReLU(), nn.Linear(12, 3))


def test_without_a_handler_the_layer_is_refused_with_a_reason() -> None:
    groups, skipped = discover_groups(_model(), torch.randn(4, 5))
    assert groups == [] and "0" in dict(skipped)


def test_a_handler_registered_in_a_test_file_is_discovered_pruned_and_grown(gain_handler: Any) -> None:
    model = _model()
    x = torch.randn(16, 5)
    groups, skipped = discover_groups(model, x)
    (group,) = groups
    assert [(s.module, s.kind) for s in group.slices] == [("0", "linear_out"), ("1", "gain"), ("3", "linear_in")]
    assert capture_arch(model)["1"]["features"] == 12  # its size attribute is in the checkpoint's spec
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(x).square().mean().backward()
    opt.step()
    apply_plan_(model, groups, {"0": torch.tensor([0, 2, 3, 7, 11])}, [opt])
    assert (model[0].out_features, model[1].features, model[3].in_features) == (5, 5, 5)
    with torch.no_grad():
        ref = model(x)
    apply_plan_(model, groups, {}, [opt], grow={"0": 4})
    assert (model[0].out_features, model[1].features, model[3].in_features) == (9, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-7)
    assert live_parameters_missing(model, [opt]) == [] and opt.state[model[1].gain]["exp_avg"].shape == (9,)
    fresh = _model()
    apply_arch_(fresh, capture_arch(model))
    fresh.load_state_dict(model.state_dict())
    assert fresh[1].features == 9 and torch.equal(fresh(x), model(x))
