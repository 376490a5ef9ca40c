"""Tracing that cannot take a run down: a time bound, hooks restored, and the calls of every submodule.

Torch-Pruning's dependency graph is built by running the model once with hooks. On some models it raises
(a ``torch.cat`` input it cannot size, an index mapping out of range) or its group search does not finish
(an exponential walk over a graph with many concatenations). :func:`time_bound` turns a search that runs
too long into a :class:`TraceTimeout`; :func:`hooks_kept` removes the hooks a failed trace leaves behind;
:func:`record_calls` records how each submodule was called, so discovery can trace block by block
(:func:`~ctprune_lightning.surgery.discover.discover_groups`).

Example::

    with hooks_kept(model), time_bound(trace_bound_s(model)):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..probe import CallInputs, as_call

# Measured on the Hugging Face catalogue (experiments/hf_catalogue.py: 28 families of 2 tiny layers, 2 busy
# CPU cores): a trace and its group search take 0.1-3 s when they finish; the models that hang (Phi, Falcon)
# were still searching after 60 s. The bound is ~3x the slowest finished trace, plus a share per module for
# larger models (a 32-layer Llama has ~360 modules: 11 s; 1000 modules: 30 s); a submodule traced on its
# own gets its share of that, at least TRACE_BOUND_MIN_S. CTPRUNE_TRACE_TIMEOUT_S overrides the bound.
TRACE_BOUND_S = 10.0
TRACE_BOUND_PER_MODULE_S = 0.03
TRACE_BOUND_MIN_S = 2.0
TIMEOUT_ENV = "CTPRUNE_TRACE_TIMEOUT_S"


class TraceTimeout(TimeoutError):
    """The dependency tracer ran past its time bound."""


def trace_bound_s(model: nn.Module) -> float:
    """The time bound of one trace of ``model`` (seconds): see :data:`TRACE_BOUND_S`."""
    env = os.environ.get(TIMEOUT_ENV)
    if env:
        return float(env)
    return max(TRACE_BOUND_S, TRACE_BOUND_PER_MODULE_S * sum(1 for _ in model.modules()))


#: After the bound, :class:`TraceTimeout` is raised again every this many seconds until the block is left, in
#: case code inside it caught the first one (a model's forward with ``except Exception: <fallback>``, an exception
#: ignored in a finaliser the collector ran): a single alarm swallowed so leaves the group search unbounded.
TRACE_REPEAT_S = 1.0


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise :class:`TraceTimeout` inside the block once ``seconds`` have passed, and again every
    :data:`TRACE_REPEAT_S` until the block is left (main thread: a SIGALRM timer, which also interrupts a
    pure-Python loop; elsewhere the block runs unbounded)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    start = time.perf_counter()

    def expire(signum: int, frame: Any) -> None:
        signal.setitimer(signal.ITIMER_REAL, TRACE_REPEAT_S)  # re-armed before raising: the raise may be caught
        raise TraceTimeout(f"the dependency tracer ran past its time bound of {seconds:.0f} s "
                           f"(set {TIMEOUT_ENV} to change it)")

    previous = signal.signal(signal.SIGALRM, expire)
    outer = signal.setitimer(signal.ITIMER_REAL, seconds)[0]  # a timer already running (pytest-timeout, ...)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:  # give the outer timer back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer - (time.perf_counter() - start)))


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks")


@contextlib.contextmanager
def hooks_kept(model: nn.Module) -> Iterator[None]:
    """Remove, on the way out, every module hook added inside the block (a trace that raises leaves its own)."""
    before = {id(m): {d: set(getattr(m, d, {})) for d in _HOOK_DICTS} for m in model.modules()}
    try:
        yield
    finally:
        for m in model.modules():
            for d in _HOOK_DICTS:
                table = getattr(m, d, None)
                if table is not None:
                    for key in set(table) - before.get(id(m), {}).get(d, set()):
                        table.pop(key, None)


def _plain(value: Any) -> Any:
    """A detached copy; a key/value cache object becomes None (a second call would append to it)."""
    if type(value).__name__.endswith("Cache"):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_plain(v) for v in value)
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)


def record_calls(model: nn.Module, example_inputs: Any) -> dict[str, CallInputs]:
    """``{module name: its first call}`` over one eval, no-grad forward of the example (model unchanged)."""
    names = {m: n for n, m in model.named_modules()}
    calls: dict[str, CallInputs] = {}

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        name = names[module]
        if name not in calls:
            calls[name] = CallInputs(name, _plain(args), _plain(kwargs))

    was_training = model.training
    model.eval()
    try:
        with hooks_kept(model), torch.no_grad():
            for m in names:
                m.register_forward_pre_hook(pre, with_kwargs=True)
            as_call(example_inputs)(model)
    finally:
        model.train(was_training)
    return calls
