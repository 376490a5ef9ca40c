"""``torch.compile`` across surgeries: re-specialise after each shape change, count what it costs.

Dynamo treats parameter shapes as static, so every surgery of a compiled module invalidates its
guards and the next call recompiles. Each recompile adds a cache entry to the compiled frame; past
``torch._dynamo.config.recompile_limit`` (8 per frame) Dynamo silently runs the frame eagerly, or
raises ``FailOnRecompileLimitHit`` under ``fullgraph=True``. :class:`CompileWatch` clears Dynamo's
code caches after each surgery (the old architecture's entries can never match again), so a frame
holds only the current architecture's variants and every surgery costs one fresh, static recompile.
It also counts the compilations and their time (Dynamo's compile callbacks, backward included).

Example::

    model.compile(fullgraph=True)            # nn.Module.compile: parameter names and checkpoints unchanged
    trainer = L.Trainer(callbacks=[ControlPruning(...)])   # the callback resets and counts by itself
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["COMPILE_KEYS", "CompileWatch", "compile_module_", "eager", "is_compiled"]

#: Summary keys reported by :meth:`CompileWatch.summary`.
COMPILE_KEYS = ("compiled", "compile_count", "compile_recompiles", "compile_time_s", "compile_resets")

COMPILE_OPTIONS = ("backend", "mode", "fullgraph", "dynamic", "options")


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule runs through ``torch.compile``.

    Recognises ``module.compile()`` (``nn.Module.compile``), an ``OptimizedModule`` child
    (``self.net = torch.compile(net)``) and Lightning's ``trainer.fit(torch.compile(model))``
    (``_compiler_ctx``).
    """
    from torch._dynamo.eval_frame import OptimizedModule

    if getattr(module, "_compiler_ctx", None) is not None:
        return True
    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in module.modules())


def compile_module_(module: nn.Module, **options: Any) -> nn.Module:
    """Compile ``module`` in place with ``nn.Module.compile`` (names, state dict and checkpoints unchanged).

    ``options``: ``backend``, ``mode``, ``fullgraph``, ``dynamic``, ``options`` of ``torch.compile``;
    ``None`` values are left at torch's defaults.
    """
    unknown = sorted(set(options) - set(COMPILE_OPTIONS))
    if unknown:
        raise ValueError(f"compile_module_: unknown option(s) {unknown}; allowed: {', '.join(COMPILE_OPTIONS)}")
    kwargs = {k: v for k, v in options.items() if v is not None}
    if "mode" in kwargs and "options" in kwargs:
        raise ValueError("compile_module_: pass `mode` or `options`, not both (torch.compile accepts one)")
    module.compile(**kwargs)
    return module


@contextlib.contextmanager
def eager(module: nn.Module | None = None) -> Iterator[None]:
    """Run ``module`` (and any compiled callable) eagerly inside the block: probes, FLOP counting, tracing.

    ``module.compile()``'d modules are called through their plain ``_call_impl`` (Dynamo never sees the
    frames: a frame first met under a dispatch mode such as ``FlopCounterMode`` would otherwise be marked
    "skip" and stay eager after the block); everything else runs under ``set_stance("force_eager")``.
    """
    stashed = []
    if module is not None:
        for m in module.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                stashed.append((m, m._compiled_call_impl))
                m._compiled_call_impl = None
    set_stance = getattr(torch.compiler, "set_stance", None)
    try:
        with set_stance("force_eager") if set_stance is not None else contextlib.nullcontext():
            yield
    finally:
        for m, fn in stashed:
            m._compiled_call_impl = fn


def _reset_code_caches() -> None:
    reset = getattr(torch._dynamo, "reset_code_caches", None)
    if reset is not None:
        reset()
    else:  # older torch: the whole Dynamo state (drops callbacks too; CompileWatch re-registers)
        torch.compiler.reset()


class CompileWatch:
    """Counts Dynamo compilations and their time; clears the code caches after each surgery.

    ``install()`` registers Dynamo compile callbacks (a no-op counter when nothing is compiled);
    ``after_surgery(module)`` resets the caches when ``module`` is compiled; ``summary()`` reports
    ``compile_count`` (every compilation: frames and lazily compiled backward graphs),
    ``compile_recompiles`` (those after the first surgery), ``compile_time_s`` and ``compile_resets``.
    """

    def __init__(self) -> None:
        self.count = 0
        self.recompiles = 0
        self.time_s = 0.0
        self.resets = 0
        self.compiled = False
        self._start: float | None = None
        self._installed = False

    # Dynamo's callback API passes a CallbackArgs on recent torch and nothing on older ones.
    def _on_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def _on_end(self, *args: Any) -> None:
        if self._start is not None:
            self.time_s += time.perf_counter() - self._start
            self._start = None
        self.count += 1
        if self.resets:
            self.recompiles += 1

    def _handler(self) -> Any:
        from torch._dynamo.callback import callback_handler

        return callback_handler

    def install(self) -> CompileWatch:
        """Start counting (idempotent)."""
        handler = self._handler()
        if self._on_start not in handler.start_callbacks:
            handler.register_start_callback(self._on_start)
            handler.register_end_callback(self._on_end)
        self._installed = True
        return self

    def close(self) -> None:
        """Stop counting."""
        handler = self._handler()
        for callbacks, fn in ((handler.start_callbacks, self._on_start), (handler.end_callbacks, self._on_end)):
            if fn in callbacks:
                callbacks.remove(fn)
        self._installed = False

    def after_surgery(self, module: nn.Module) -> bool:
        """After a shape change of ``module``: drop the stale compiled code if it is compiled; return whether.

        ``compiled`` (set by :meth:`clear` or the caller) counts too: inside :func:`eager` the module looks plain.
        """
        if not (self.compiled or is_compiled(module)):
            return False
        self.compiled = True
        _reset_code_caches()
        if self._installed:
            self.install()  # re-register if a full reset dropped the callbacks
        self.resets += 1
        return True

    def clear(self, module: nn.Module) -> bool:
        """Before training: drop code state set up so far if ``module`` is compiled; return whether.

        A frame Dynamo first meets under a dispatch mode is marked "skip" for good; Lightning's
        ``ModelSummary`` runs ``example_input_array`` under ``FlopCounterMode`` at ``on_fit_start``, which
        would leave a ``module.compile()``'d model eager for the whole fit.
        """
        if not (self.compiled or is_compiled(module)):
            return False
        self.compiled = True
        _reset_code_caches()
        if self._installed:
            self.install()
        return True

    def summary(self) -> dict[str, Any]:
        return {"compiled": self.compiled, "compile_count": self.count, "compile_recompiles": self.recompiles,
                "compile_time_s": self.time_s, "compile_resets": self.resets}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.summary())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state.get("compile_count", 0))
        self.recompiles = int(state.get("compile_recompiles", 0))
        self.time_s = float(state.get("compile_time_s", 0.0))
        self.resets = int(state.get("compile_resets", 0))
        self.compiled = bool(state.get("compiled", False))


@contextlib.contextmanager
def watching(watch: CompileWatch) -> Iterator[CompileWatch]:
    """``with watching(CompileWatch()) as w:`` counts compilations inside the block only."""
    watch.install()
    try:
        yield watch
    finally:
        watch.close()
