"""Discovery degrades instead of crashing or hanging (issue 17).

A tracer failure on the whole model falls back to tracing block by block; a group search that runs past
its bound is interrupted the same way; a layer no trace reaches is left dense with the cause; when nothing
can be traced at all, a :class:`DiscoveryError` names the module and the cause and nothing is changed.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch
from torch import nn

from ctprune_lightning.surgery import discover
from ctprune_lightning.surgery.discover import DiscoveryError, discover_groups
from ctprune_lightning.surgery.tracing import TRACE_REPEAT_S, TraceTimeout, hooks_kept, record_calls, time_bound


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.blocks, self.out = nn.Linear(8, 16), nn.ModuleList([Block(), Block()]), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def _failing_on(paths: set[str], error: Exception):
    real = discover._trace

    def trace(model, example, layers, bound_s):
        if discover.as_call(example).path in paths:
            raise error
        return real(model, example, layers, bound_s)

    return trace


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_tracer_crash_on_the_whole_model_falls_back_to_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = Net(), torch.randn(3, 8)
    monkeypatch.setattr(discover, "_trace", _failing_on({""}, TypeError("unsupported operand")))
    groups, skipped = discover_groups(model, x)
    assert {g.name for g in groups} == {"blocks.0.up", "blocks.1.up"}
    reasons = dict(skipped)
    assert "TypeError" in reasons["blocks.0.down"] and "traced on its own" in reasons["blocks.0.down"]
    assert reasons["out"] and reasons["inp"]
    assert all(r for r in reasons.values())
    assert model.training and _hooks(model) == 0


def test_a_failing_block_is_descended_into_and_its_siblings_of_the_type_are_not_retried(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = Net(), torch.randn(3, 8)
    seen: list[str] = []
    real = _failing_on({"", "blocks.0"}, IndexError("list index out of range"))

    def trace(model, example, layers, bound_s):
        seen.append(discover.as_call(example).path)
        return real(model, example, layers, bound_s)

    monkeypatch.setattr(discover, "_trace", trace)
    groups, skipped = discover_groups(model, x)
    assert groups == []  # the blocks' MLPs are only coupled inside a block
    assert "blocks.1" not in seen and "blocks.1.up" in seen  # same type as the failed block: its children
    assert "IndexError" in dict(skipped)["blocks.1.up"]


def test_a_group_search_past_its_bound_is_interrupted_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_pruning as tp

    real = tp.DependencyGraph.get_all_groups
    root = {}

    def slow(self, *args, **kwargs):
        if not root:  # the first search (the whole model) never finishes
            root["hung"] = True
            while True:
                time.sleep(0.01)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "get_all_groups", slow)
    monkeypatch.setenv("CTPRUNE_TRACE_TIMEOUT_S", "1")
    model, x = Net(), torch.randn(3, 8)
    start = time.perf_counter()
    groups, skipped = discover_groups(model, x)
    assert time.perf_counter() - start < 30
    assert {g.name for g in groups} == {"blocks.0.up", "blocks.1.up"}
    assert "TraceTimeout" in dict(skipped)["blocks.0.down"]
    assert _hooks(model) == 0


def test_nothing_traceable_raises_before_anything_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = Net(), torch.randn(3, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(discover, "_trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(DiscoveryError, match=r"nothing in Net could be traced.*RuntimeError.*boom"):
        discover_groups(model, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and _hooks(model) == 0


def test_time_bound_interrupts_a_python_loop_and_restores_the_outer_timer() -> None:
    with pytest.raises(TraceTimeout):
        with time_bound(0.2):
            while True:
                pass
    with time_bound(5):
        pass


def test_time_bound_raises_again_when_code_inside_swallowed_the_first_timeout() -> None:
    """A forward with ``except Exception: <fallback>`` (or a finaliser's ignored exception) may eat the alarm: the
    block is still left, within a repeat, and no timer or handler is left behind."""
    handler, outer = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)[0]  # pytest-timeout's
    caught = 0
    start = time.perf_counter()
    with pytest.raises(TraceTimeout):
        with time_bound(0.2):
            try:
                while True:
                    pass
            except Exception:  # noqa: BLE001 - the model's own fallback, catching everything
                caught += 1
            while True:  # ... which then runs on: unbounded but for the repeat
                pass
    assert caught == 1 and time.perf_counter() - start < 0.2 + 3 * TRACE_REPEAT_S
    left = signal.getitimer(signal.ITIMER_REAL)[0]  # the outer timer, not our repeat, with what is left of it
    assert (left == 0.0 if outer == 0.0 else 0.0 < left <= outer - 1.0) and signal.getsignal(signal.SIGALRM) is handler


def test_hooks_kept_removes_hooks_left_by_a_failing_trace_and_record_calls_sees_every_block() -> None:
    model = Net()
    with pytest.raises(RuntimeError):
        with hooks_kept(model):
            model.out.register_forward_hook(lambda *a: None)
            raise RuntimeError("trace failed")
    assert _hooks(model) == 0
    calls = record_calls(model, torch.randn(2, 8))
    assert {"", "inp", "blocks.0", "blocks.1.down", "out"} <= set(calls) and "blocks" not in calls
    assert calls["blocks.1"].args[0].shape == (2, 16)


def test_parametrized_layers_are_left_dense_with_the_reason_and_the_rest_is_cut() -> None:
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 12), nn.ReLU(), spectral_norm(nn.Linear(12, 4)))
    groups, skipped = discover_groups(model, torch.zeros(2, 8))
    reasons = dict(skipped)
    assert [g.name for g in groups] == ["2"]  # reads from the parametrized 0 and feeds the plain 4: cut
    assert reasons["0"].startswith("0's weight is parametrized (WeightNorm")
    assert "remove the parametrization" in reasons["0"]
    assert reasons["4"].startswith("6's weight is parametrized (SpectralNorm")  # feeds it: its inputs cannot go


def test_a_layer_masked_by_torch_prune_is_left_dense_with_the_reason() -> None:
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.5)  # weight = weight_orig * weight_mask, before each forward
    groups, skipped = discover_groups(model, torch.zeros(2, 8))
    assert [g.name for g in groups] == ["2"]  # before: the cut raised "cannot assign 'torch.FloatTensor' as parameter"
    assert dict(skipped)["0"].startswith("0's weight is masked by torch.nn.utils.prune (L1Unstructured)")
