"""The contract every layer family implements, and the registry surgery dispatches on.

A :class:`SliceHandler` knows one family of modules (Linear, convolutions, norms, ...). Discovery asks
:func:`claim` which handler claims a module traced by the dependency graph; the plan executor asks
:func:`handler_for` which handler cuts or grows a slice. A handler is stateless; it sees the module and the
:class:`~ctprune_lightning.surgery.slices.Slice` (``kind``, ``block``, ``parts``).

Growth (``grow_``) appends ``n`` units at the end of the unit order and is function-preserving at the
moment it happens: a slice that *produces* the units (role ``"out"``) gets incoming weights drawn by the
:class:`GrowInit`, a slice that *consumes* them (role ``"in"``) gets zero weights, a pass-through slice
(role ``"through"``: norms, depthwise convolutions) gets neutral entries. The consumers' zero weights
receive a gradient at the first step (the new units' activations are non-zero), the producers' at the next.

Example (a handler for your own layer; see the README)::

    @register
    class ScaleHandler(SliceHandler):
        kinds = {"scale": "through"}
        size_attrs = ("dim",)
        def claims(self, module, is_out, ctx): return "scale" if isinstance(module, Scale) else None
        ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
import torch.nn.utils.prune
from torch import Tensor, nn
from torch.optim import Optimizer

GROW_INITS = ("default", "match")
ROLES = ("out", "in", "through")


class ParamSlice(NamedTuple):
    """A parameter of a child ``owner`` (relative name, "" = the module) cut along ``dim``.

    ``units[i]`` is the unit owning index ``i`` along ``dim`` (None: index = unit).
    """

    owner: str
    name: str
    dim: int
    units: Tensor | None


@dataclass(frozen=True)
class Claim:
    """A handler's answer for a traced module: the slice kind and the child parts it cuts."""

    kind: str
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class OwnGroup:
    """A group a handler finds inside one module, independent of the trace (heads, SSM states).

    ``reason``: why it is left dense (None: prunable); ``covers``: child names the group accounts for;
    ``round_to``: widths the layer can run at are multiples of this (None: any width; e.g. a kernel's alignment).
    """

    kind: str
    parts: tuple[str, ...] = ()
    reason: str | None = None
    covers: tuple[str, ...] = ()
    round_to: int | None = None


@dataclass
class ClaimContext:
    """What discovery knows when it asks for a claim (options and the modules' own layouts)."""

    prune_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GrowInit:
    """How the incoming weights of new units are drawn (deterministic: same seed, same draws on every rank).

    ``mode="match"`` (the default): N(0, σ²) with σ the standard deviation of the layer's current weights
    (a trained layer's scale has moved away from its initialisation); the layer type's own distribution when
    the layer has fewer than two weights or none vary.
    ``mode="default"``: the distribution the layer type's own initialisation uses (Linear/Conv:
    U(±1/sqrt(fan_in)); an RNN: U(±1/sqrt(hidden)); an Embedding: N(0, 1); GPT-2's Conv1D: N(0, 0.02²)).

    Measured (``experiments/grow_init.py``: an MLP cut to 1/8 width, grown back, 150 steps, 3 seeds; final
    training loss): ``match`` 0.570 ± 0.056, ``default`` 0.674 ± 0.031, restoring the units' last pruned rows
    0.538 ± 0.028 (needs the pruned weights kept: not offered), zero incoming weights 1.351 (= no growth: the
    new units never train).
    """

    mode: str = "match"
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in GROW_INITS:
            raise ValueError(f"GrowInit: mode={self.mode!r} is not supported; choose one of {GROW_INITS}")
        self.generator = torch.Generator().manual_seed(int(self.seed))

    def uniform(self, like: Tensor, shape: Sequence[int], bound: float) -> Tensor:
        """U(-bound, bound) in ``default`` mode, else N(0, std(like)²); on ``like``'s device and dtype."""
        if self.mode == "match" and like.numel() > 1 and float(like.detach().float().std()) > 0:
            return self.normal(like, shape, float(like.detach().float().std()))
        out = (torch.rand(tuple(shape), generator=self.generator, dtype=torch.float64) * 2 - 1) * bound
        return out.to(device=like.device, dtype=like.dtype)

    def normal(self, like: Tensor, shape: Sequence[int], std: float) -> Tensor:
        """N(0, std²) (``match`` mode: the std of ``like``), on ``like``'s device and dtype."""
        if self.mode == "match" and like.numel() > 1 and float(like.detach().float().std()) > 0:
            std = float(like.detach().float().std())
        out = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float64) * std
        return out.to(device=like.device, dtype=like.dtype)


def fan_in_bound(fan_in: int) -> float:
    """The bound of ``nn.Linear``/``nn.ConvNd``'s default init (kaiming-uniform, a=sqrt(5)) for weight and bias."""
    return 1.0 / math.sqrt(max(1, int(fan_in)))


class SliceHandler:
    """One layer family: claim a module, read its width, list its unit slices, shrink it, grow it.

    Subclasses set ``kinds`` (``{kind: role}``; role ``"out"`` produces the units, ``"in"`` consumes them,
    ``"through"`` passes them on) and ``size_attrs`` (integer attributes the checkpoint records), and
    override the methods. ``units`` names one unit of a group led by a slice of a kind (head, state; default
    channel).
    """

    kinds: ClassVar[dict[str, str]] = {}
    size_attrs: ClassVar[tuple[str, ...]] = ()
    units: ClassVar[dict[str, str]] = {}  # what one unit of a group led by a slice of a kind is (default "channel")
    priority: ClassVar[int] = 100  # asked in descending priority; built-in families sit below 100

    def owns(self, module: nn.Module, kind: str) -> bool:
        """Whether this handler executes slices of ``kind`` on ``module`` (several families may share a kind)."""
        return kind in self.kinds

    def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
        """A traced module's slice: a :class:`Claim`, a refusal reason (``{}`` stands for the module's name),
        or None (not this family)."""
        return None

    def own_group(self, module: nn.Module) -> OwnGroup | None:
        """A group inside ``module`` alone (heads, states), or None."""
        return None

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        raise NotImplementedError

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        """Every parameter slice with the unit of each index (empty: the unit owns no slice, e.g. SSM states)."""
        raise NotImplementedError

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        raise NotImplementedError

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        """Append ``n`` units (see the module docstring for what the new weights are)."""
        raise NotImplementedError(f"{type(self).__name__} cannot grow {kind!r} slices")

    def grow_refusal(self, module: nn.Module, kind: str) -> str | None:
        """Why this slice cannot grow function-preservingly (checked before anything changes), or None."""
        return None

    def scaled_modules(self, module_name: str, kind: str, parts: tuple[str, ...]) -> list[str]:
        """Modules whose own FLOPs scale linearly with this slice's width."""
        return [module_name]

    def trace_as_layer(self, module: nn.Module) -> tuple[int, int] | None:
        """``(in width, out width)`` when the dependency tracer must treat ``module`` as one opaque layer."""
        return None

    def trace_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """While tracing, a forward hook on modules traced as layers (None: the output is kept)."""
        return None


REGISTRY: list[SliceHandler] = []


def register(cls: type[SliceHandler]) -> type[SliceHandler]:
    """Class decorator: add a handler to the registry. Handlers are asked in descending ``priority``, the
    later registered first among equals, so a user's handler (default 100) wins over the built-in families."""
    if not (isinstance(cls, type) and issubclass(cls, SliceHandler)):
        raise TypeError(f"register: expected a SliceHandler subclass, got {cls!r}")
    bad = {k: r for k, r in cls.kinds.items() if r not in ROLES}
    if bad:
        raise ValueError(f"register: {cls.__name__}.kinds has roles {bad}; allowed: {ROLES}")
    REGISTRY[:] = [h for h in REGISTRY if type(h).__qualname__ != cls.__qualname__ or type(h).__module__ != cls.__module__]
    REGISTRY.insert(0, cls())
    REGISTRY.sort(key=lambda h: -h.priority)  # stable: among equals the newest stays first
    return cls


def handlers() -> list[SliceHandler]:
    """The registered handlers, in the order they are asked."""
    return list(REGISTRY)


def claim(module: nn.Module, is_out: bool, ctx: ClaimContext) -> tuple[Claim | None, str | None]:
    """The first handler's claim on ``module`` as ``(claim, None)``, or ``(None, reason)``. A module with a
    parametrized tensor (``torch.nn.utils.parametrize``: weight or spectral norm) is refused: slicing its originals
    would rescale the weights it keeps."""
    plists = getattr(module, "parametrizations", None)
    if isinstance(plists, nn.ModuleDict) and len(plists):
        kinds = sorted({type(p).__name__.lstrip("_") for plist in plists.values() for p in plist})
        return None, (f"{{}}'s {', '.join(plists)} is parametrized ({', '.join(kinds)}, torch.nn.utils.parametrize) "
                      "and cannot be cut; remove the parametrization to prune it")
    masks = [h for h in module._forward_pre_hooks.values() if isinstance(h, torch.nn.utils.prune.BasePruningMethod)]
    if masks:  # `weight` is recomputed from `weight_orig * weight_mask` before every forward
        names = sorted({str(getattr(h, "_tensor_name", "?")) for h in masks})
        return None, (f"{{}}'s {', '.join(names)} is masked by torch.nn.utils.prune ({type(masks[0]).__name__}) and "
                      "cannot be cut; torch.nn.utils.prune.remove(module, name) makes the mask permanent")
    for h in REGISTRY:
        answer = h.claims(module, is_out, ctx)
        if isinstance(answer, Claim):
            return answer, None
        if isinstance(answer, str):
            return None, answer
    return None, f"coupled to {type(module).__name__} '{{}}', which cannot be shrunk yet"


def handler_for(module: nn.Module, kind: str) -> SliceHandler:
    """The handler that executes slices of ``kind`` on ``module``."""
    for h in REGISTRY:
        if kind in h.kinds and h.owns(module, kind):
            return h
    raise ValueError(f"unknown slice kind {kind!r} for {type(module).__name__}; known: {all_kinds()}")


def handler_of_kind(kind: str) -> SliceHandler:
    """The first handler that knows ``kind`` (for what does not depend on the module)."""
    for h in REGISTRY:
        if kind in h.kinds:
            return h
    raise ValueError(f"unknown slice kind {kind!r}; known: {all_kinds()}")


def all_kinds() -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for h in reversed(REGISTRY) for k in h.kinds))


def kinds_with_role(role: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for h in reversed(REGISTRY) for k, r in h.kinds.items() if r == role))


def role_of(kind: str) -> str:
    return handler_of_kind(kind).kinds[kind]


def unit_of(kind: str) -> str:
    """What one unit of a group led by a slice of ``kind`` is."""
    return next((h.units.get(kind, "channel") for h in REGISTRY if kind in h.kinds), "channel")


def size_attrs() -> tuple[str, ...]:
    """Every size attribute a registered handler records (the checkpoint's architecture spec)."""
    return tuple(dict.fromkeys(a for h in reversed(REGISTRY) for a in h.size_attrs))


def traced_layers(model: nn.Module) -> dict[nn.Module, SliceHandler]:
    """Modules of ``model`` that some handler traces as one opaque layer."""
    out: dict[nn.Module, SliceHandler] = {}
    for m in model.modules():
        h = next((h for h in REGISTRY if h.trace_as_layer(m) is not None), None)
        if h is not None:
            out[m] = h
    return out


def stand_in(x: Any, width: int) -> Tensor | None:
    """For a ``trace_hook``: an output of ``width`` features whose autograd node leads straight to the input
    ``x`` (feature ``i`` reads input feature ``i mod in``), so the tracer sees the layer as one opaque node."""
    if not isinstance(x, Tensor):
        return None
    return x.index_select(-1, torch.arange(int(width), device=x.device) % x.shape[-1])
