"""Shared checks for the architecture tests: zero a unit's contribution, predict sliced tensors, check optimizers."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ctprune_lightning.surgery.groups import ATTN_IN, CONV_IN, HEADS, LINEAR_IN, PrunableGroup
from ctprune_lightning.surgery.optim import optimizer_params
from ctprune_lightning.surgery.shrink import expand_units


@torch.no_grad()
def zero_consumers_(model: nn.Module, group: PrunableGroup, dead: Sequence[int]) -> None:
    """Zero every weight through which units ``dead`` of ``group`` reach the rest of the model."""
    dead_t = torch.as_tensor(list(dead), dtype=torch.long)
    for s in group.slices:
        m = model.get_submodule(s.module)
        if s.kind in (LINEAR_IN, CONV_IN):
            m.weight[:, expand_units(dead_t, s.block)] = 0.0
        elif s.kind == ATTN_IN:
            for q in s.parts[:-1]:
                m.get_submodule(q).weight[:, dead_t] = 0.0
        elif s.kind == HEADS:
            out = m.get_submodule(s.parts[-1])
            dim = out.in_features // group.width(model)
            out.weight[:, expand_units(dead_t, dim)] = 0.0


def random_plan(model: nn.Module, groups: Sequence[PrunableGroup], generator: torch.Generator,
                low: float = 0.3) -> dict[str, Tensor]:
    """Keep a random subset (at least one unit, at least ``low`` of them) of every group."""
    plan = {}
    for g in groups:
        w = g.width(model)
        n = int(torch.randint(max(1, int(low * w)), w + 1, (1,), generator=generator))
        plan[g.name] = torch.randperm(w, generator=generator)[:n].sort().values
    return plan


def selections(model: nn.Module, groups: Sequence[PrunableGroup], plan: Mapping[str, Tensor]
               ) -> dict[int, list[tuple[int, Tensor]]]:
    """``id(param) -> [(dim, kept element indices), ...]`` that ``plan`` implies (computed before the cut)."""
    by_name = {g.name: g for g in groups}
    sel: dict[int, dict[int, Tensor]] = {}
    for name, keep in plan.items():
        for u in by_name[name].unit_slices(model):
            units = u.units if u.units is not None else torch.arange(u.param.shape[u.dim])
            sel.setdefault(id(u.param), {})[u.dim] = torch.nonzero(torch.isin(units, keep)).flatten()
    return {k: sorted(v.items()) for k, v in sel.items()}


def apply_selection(t: Tensor, sel: list[tuple[int, Tensor]]) -> Tensor:
    for dim, idx in sel:
        t = t.index_select(dim, idx)
    return t


def snapshot(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], groups: Sequence[PrunableGroup],
             plan: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, dict, list]]:
    """Every parameter (by name) with a copy of its value, its optimizer state and the slicing the plan implies."""
    sel = selections(model, groups, plan)
    out = {}
    for name, p in model.named_parameters():
        state = {}
        for opt in optimizers:
            state.update({k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()})
        out[name] = (p.detach().clone(), state, sel.get(id(p), []))
    return out


def check_after_cut(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                    before: Mapping[str, tuple[Tensor, dict, list]], trainable_in_optimizer: bool = True) -> None:
    """Values and optimizer moments of every parameter are the old ones, sliced; the optimizers hold the live set."""
    live = dict(model.named_parameters())
    assert set(live) == set(before), "parameters appeared or disappeared"
    in_opt = optimizer_params(optimizers)
    ids = {id(p) for p in in_opt}
    assert len(ids) == len(in_opt), "a parameter is twice in the optimizers"
    for name, p in live.items():
        old, state, sel = before[name]
        torch.testing.assert_close(p.detach(), apply_selection(old, sel), rtol=0, atol=0)
        if p.requires_grad and trainable_in_optimizer:
            assert id(p) in ids, f"live parameter {name} is not in the optimizer"
        new_state = next((opt.state[p] for opt in optimizers if p in opt.state), {})
        assert set(new_state) == set(state), f"{name}: optimizer state keys changed"
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                torch.testing.assert_close(new_state[key], apply_selection(value, sel), rtol=0, atol=0)
            else:
                assert new_state[key] == value if not torch.is_tensor(value) else torch.equal(new_state[key], value)
    live_ids = {id(p) for p in live.values()}
    assert ids <= live_ids, "a dead parameter is still in the optimizer"
    for opt in optimizers:
        assert {id(p) for p in opt.state} <= live_ids, "optimizer state kept for a dead parameter"


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, input_shape: tuple[int, ...], n: int = 3) -> None:
    """``n`` optimizer steps on the mean square of the model's output for random inputs of ``(4, *input_shape)``."""
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(4, *input_shape, generator=g)).pow(2).mean().backward()
        opt.step()
