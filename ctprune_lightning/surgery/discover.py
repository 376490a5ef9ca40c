"""Find the prunable groups of any model, with the reason for every layer left dense.

Torch-Pruning's ``DependencyGraph`` is the coupling oracle (which slices are tied, through residual
additions, flattening, norms). Which slice a traced module contributes, or why it cannot, is asked of the
first slice handler that claims it (:mod:`.handlers`); modules a handler traces as one layer (attention,
recurrent layers) are registered with the tracer as opaque layers, so their input and output widths couple
to the rest without tracing their insides, and groups inside one module (heads, SSM states) come from the
handlers too. Our executor (:mod:`.slices`) does the cutting. Every accepted group is checked by a trial
cut on a copy of the model.

Example::

    groups, skipped = discover_groups(model, model.example_input_array, ignored_layers=["head"],
                                      min_width=8, round_to=8, group_limits={nn.Conv2d: 16, "blocks.0.attn": 2})
"""

from __future__ import annotations

import copy
import logging
import time
import traceback
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..probe import as_call
from .handlers.blocked import block_slices
from .handlers.conv import tile_slices
from .handlers import Claim, ClaimContext, SliceHandler, claim, handlers, role_of, traced_layers
from .shrink import NORM_TYPES
from .slices import PrunableGroup, Slice, apply_plan_, tied_parameters
from .tracing import TRACE_BOUND_MIN_S, hooks_kept, record_calls, time_bound, trace_bound_s

log = logging.getLogger(__name__)

ROOT_TYPES: tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)
OUTPUT_REASON = "output layer (its features leave the model)"
Limits = Mapping["str | type", int]
Candidates = list[tuple[PrunableGroup, "str | None"]]


class DiscoveryError(ValueError):
    """Nothing in the model could be traced: raised before anything changed, naming the module and the cause."""


def _matches(name: str, module: nn.Module, ignored: Sequence[str | type]) -> bool:
    for item in ignored:
        if isinstance(item, type) and isinstance(module, item):
            return True
        if isinstance(item, str) and (name == item or name.startswith(item + ".")):
            return True
    return False


def _check_args(model: nn.Module, ignored_layers: Sequence[Any], min_width: Any, round_to: Any,
                group_limits: Limits | None) -> None:
    if isinstance(min_width, bool) or not isinstance(min_width, int) or min_width < 1:
        raise ValueError(f"discover_groups: `min_width` must be an integer >= 1, got {min_width!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"discover_groups: `round_to` must be None or an integer >= 1, got {round_to!r}")
    bad = [x for x in ignored_layers if not isinstance(x, (str, type))]
    if bad:
        raise TypeError(f"discover_groups: `ignored_layers` takes module names or types, got {bad!r}")
    names = {n for n, _ in model.named_modules()}
    unknown = [x for x in ignored_layers
               if isinstance(x, str) and x not in names and not any(n.startswith(x + ".") for n in names)]
    if unknown:  # a typo would leave the layer it meant to protect prunable
        raise ValueError(f"discover_groups: `ignored_layers` {unknown!r} names no module of {type(model).__name__} "
                         f"(e.g. {sorted(names - {''})[:5]})")
    for key, value in (group_limits or {}).items():
        if not isinstance(key, (str, type)):
            raise TypeError(f"discover_groups: `group_limits` keys are group/module names or types, got {key!r}")
        if isinstance(key, str) and key not in names and not any(n.startswith(key + ".") for n in names):
            raise ValueError(f"discover_groups: `group_limits` key {key!r} names no module of "
                             f"{type(model).__name__} (e.g. {sorted(names - {''})[:5]})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"discover_groups: `group_limits[{key!r}]` must be an integer >= 1 (a minimum width), "
                             f"got {value!r}")


def resolve_limit(name: str, module: nn.Module, group_limits: Limits | None) -> int | None:
    """The per-group minimum width: exact name, else the longest name prefix, else the first matching type."""
    limits = dict(group_limits or {})
    if name in limits:
        return int(limits[name])
    prefixes = [k for k in limits if isinstance(k, str) and name.startswith(k + ".")]
    if prefixes:
        return int(limits[max(prefixes, key=len)])
    return next((int(v) for k, v in limits.items() if isinstance(k, type) and isinstance(module, k)), None)


def _widths_pruner(handler: SliceHandler, through: bool) -> Any:
    """A Torch-Pruning pruner that only reports the widths of a layer the handler traces as one layer.

    ``through``: the layer carries its input channels to its outputs one to one (a pass-through slice), so
    its in and out channels are one coupling (Torch-Pruning couples them when both are the same function).
    """
    import torch_pruning as tp

    class _Widths(tp.pruner.BasePruningFunc):
        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            raise NotImplementedError("ctprune cuts this layer itself")

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:  # distinct: not coupled
            raise NotImplementedError("ctprune cuts this layer itself")

        if through:
            prune_in_channels = prune_out_channels  # noqa: F811 - the intra-layer coupling

        def get_out_channels(self, layer: nn.Module) -> int:
            return handler.trace_as_layer(layer)[1]

        def get_in_channels(self, layer: nn.Module) -> int:
            return handler.trace_as_layer(layer)[0]

    return _Widths()


def _is_through(handler: SliceHandler, module: nn.Module) -> bool:
    found = handler.claims(module, True, ClaimContext(prune_embeddings=True))
    return isinstance(found, Claim) and role_of(found.kind) == "through"


def _display(module: nn.Module, name: str) -> str:
    """A producer's name: a module with heads of its own is named by its output projection."""
    own = next((g for h in handlers() if (g := h.own_group(module)) is not None), None)
    return f"{name}.{own.parts[-1]}" if own is not None and own.parts else name


def _block(item: Any, width: int, kind: str) -> tuple[int, str | None]:
    """Elements per unit of a traced slice (Linear inputs after a flatten), or a reason to refuse."""
    idxs, roots = list(item.idxs), list(getattr(item, "root_idxs", item.idxs))
    n = len(idxs)
    if n == width and all(int(i) == int(r) for i, r in zip(idxs, roots)):
        return 1, None
    if kind == "linear_in" and n % width == 0:
        k = n // width
        pairs = sorted(zip(map(int, idxs), map(int, roots)))
        if [i for i, _ in pairs] == list(range(n)) and all(r == i // k for i, r in pairs):
            return k, None
    return 0, "partially coupled to '{}' (concat/split/permutation of channels)"


def _trace(model: nn.Module, example_inputs: Any, layers: Mapping[nn.Module, SliceHandler],
           bound_s: float) -> tuple[Any, list]:
    """Torch-Pruning's graph and groups, within ``bound_s`` seconds (else :class:`TraceTimeout`)."""
    import torch_pruning as tp  # heavy import, only when a fit starts

    custom = {type(m): _widths_pruner(h, _is_through(h, m)) for m, h in layers.items()}
    was_training = model.training
    model.eval()
    hooks = [m.register_forward_hook(h.trace_hook, with_kwargs=True) for m, h in layers.items()]
    try:
        with hooks_kept(model), time_bound(bound_s), torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, forward_fn=_forward,
                                                          customized_pruners=custom or None, verbose=False,
                                                          output_transform=_graph_outputs)
            roots = ROOT_TYPES + tuple(custom)  # an attention output group is named after its output projection
            return graph, list(graph.get_all_groups(ignored_layers=[], root_module_types=roots))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)


def _graph_outputs(out: Any) -> list[torch.Tensor]:
    """The output tensors to trace from (a ``ModelOutput`` also holds caches and None)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.grad_fn is not None else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _graph_outputs(o)]
    return []


def _group_name(producer: Slice) -> str:
    """A channel group is named after its first producer; an attention output by its projection."""
    return f"{producer.module}.{producer.parts[-1]}" if producer.parts else producer.module


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    """A tensor, a tuple (positional), a dict (keyword inputs) or a :class:`~ctprune_lightning.probe.CallInputs`
    (a call of one submodule, e.g. the network a LightningModule's ``training_step`` calls)."""
    return as_call(example_inputs)(model)


def _tie_reason(model: nn.Module, group: PrunableGroup, ties: Mapping[int, list[tuple[str, str]]]) -> str | None:
    """Tied Parameters must be cut alike in every owner, or the group is refused."""
    uses: dict[int, list[tuple[str, int]]] = {}
    for u in group.unit_slices(model):
        if id(u.param) in ties:
            uses.setdefault(id(u.param), []).append((u.name, u.dim))
    for pid, used in uses.items():
        owners = [f"{m}.{a}" for m, a in ties[pid]]
        missing = sorted(set(owners) - {n for n, _ in used})
        if missing:
            return (f"tied weights: {owners} are one Parameter, but this group cuts only "
                    f"{sorted({n for n, _ in used})} and not {missing}; left dense")
        dims = sorted({d for _, d in used})
        if len(dims) > 1:
            return f"tied weights: {owners} are one Parameter, but this group cuts it along dims {dims}; left dense"
    return None


def _tp_candidates(graph: Any, tp_groups: list, names: Mapping[nn.Module, str], order: Mapping[str, int],
                   pnames: Mapping[int, str], ctx: ClaimContext, round_to: int | None) -> tuple[Candidates, set[str]]:
    """Torch-Pruning's groups as ours, each with the reason it is refused (None: prunable)."""
    candidates: Candidates = []
    covered: set[str] = set()
    modules = {n: m for m, n in names.items()}
    for tp_group in tp_groups:
        width = int(graph.get_out_channels(tp_group.items[0].dep.target.module))
        slices: list[Slice] = []
        producers: list[tuple[int, str]] = []
        reason = None
        for item in tp_group.items:
            module = item.dep.target.module
            if isinstance(module, nn.Parameter):
                reason = reason or (f"coupled to a bare nn.Parameter '{pnames.get(id(module), '?')}' outside any "
                                    "supported layer (cannot be cut)")
                continue
            if module not in names:  # Torch-Pruning's pseudo-modules for element-wise ops, reshapes, ...
                continue
            covered.add(names[module])
            is_out = getattr(item.dep.handler, "__name__", "") == "prune_out_channels"
            found, why = claim(module, is_out, ctx)
            if is_out and not isinstance(module, NORM_TYPES) and (found is None or role_of(found.kind) != "through"):
                producers.append((order[names[module]], _display(module, names[module])))
            block, why_block = (0, None) if found is None else _block(item, width, found.kind)
            if why or why_block:
                reason = reason or (why or why_block).format(names[module])
                continue
            slices.append(Slice(names[module], found.kind, block, found.parts))
        slices = list(dict.fromkeys(slices))
        slices, why_tiled = tile_slices(slices, modules)  # channels tied to a grouped convolution's groups
        slices, why_blocked = block_slices(slices, modules)  # ... or in blocks, to a GroupNorm's groups
        reason = reason or why_tiled or why_blocked
        name = min(producers)[1] if producers else names.get(tp_group.items[0].dep.target.module, "?")
        first = next((s for s in slices if s.role == "out" and _group_name(s) == name), None)
        if first is not None:  # the named producer leads: the group's width is read from it
            slices.remove(first)
            slices.insert(0, first)
        if reason is None and not any(s.role == "in" for s in slices):
            reason = OUTPUT_REASON
        candidates.append((PrunableGroup(name, tuple(slices), round_to=round_to), reason))

    return candidates, covered


def _cause(err: BaseException) -> str:
    """An exception in a line: its type, message and the innermost function (``index_mapping.py update_...``)."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" in {frames[-1].filename.rsplit('/', 1)[-1]} {frames[-1].name}" if frames else ""
    return f"{type(err).__name__}{where}: {' '.join(str(err).split())[:160]}"


def _traced_candidates(model: nn.Module, example_inputs: Any, layers: Mapping[nn.Module, SliceHandler],
                       names: Mapping[nn.Module, str], order: Mapping[str, int], pnames: Mapping[int, str],
                       ctx: ClaimContext, round_to: int | None
                       ) -> tuple[Candidates, set[str], dict[str, str], list[str]]:
    """Candidates from one trace of the whole model, or, when that raises or runs past its bound, from a trace
    of each submodule on its own (block by block, descending into a submodule that fails too); a layer no
    trace reaches is left dense with the cause. Returns ``(candidates, covered names, {layer: reason}, names of
    the submodules traced on their own)``."""
    bound = trace_bound_s(model)
    try:
        return (*_tp_candidates(*_trace(model, example_inputs, layers, bound), names, order, pnames, ctx, round_to),
                {}, [])
    except Exception as err:  # noqa: BLE001 - any failure of the tracer degrades to tracing block by block
        cause = _cause(err)
    root = as_call(example_inputs).path
    label = f"{type(model).__name__}" + (f" ('{root}')" if root else "")
    log.warning("discover_groups: the dependency graph of %s failed (%s); tracing it block by block", label, cause)
    try:
        calls = record_calls(model, example_inputs)
    except Exception as err:  # noqa: BLE001 - the model's own forward fails on the example
        raise DiscoveryError(f"discover_groups: {label} could not be traced ({cause}) and its forward on the example "
                             f"fails ({_cause(err)}); nothing was changed") from err
    candidates: Candidates = []
    covered: set[str] = set()
    dense: dict[str, str] = {}
    traced: list[str] = []
    failed: list[tuple[str, str]] = []
    failed_types: dict[type, str] = {}  # blocks of one type fail alike (a ModuleList of identical layers)
    deadline = time.monotonic() + 2 * bound
    total = sum(1 for _ in model.modules())

    def descend(name: str) -> None:
        module = model.get_submodule(name)
        if not any(True for _ in module.parameters()):
            return
        why = None if name in calls else "not called by the example forward"
        if name != root and name in calls:
            if type(module) in failed_types:
                why = f"another {type(module).__name__} failed: {failed_types[type(module)]}"
            elif time.monotonic() > deadline:
                why = f"discovery's time budget ({2 * bound:.0f} s) was spent before this module was traced"
            else:
                share = bound * sum(1 for _ in module.modules()) / total  # its share of the model's bound
                try:
                    found, cov = _tp_candidates(*_trace(model, calls[name], layers, max(TRACE_BOUND_MIN_S, share)),
                                                names, order, pnames, ctx, round_to)
                except Exception as err:  # noqa: BLE001 - descend into the children
                    why = failed_types[type(module)] = _cause(err)
                    failed.append((name, why))
                else:
                    leave = (f"its features leave '{name}', traced on its own because the whole model could not be "
                             f"({cause})")
                    candidates.extend((g, leave if r == OUTPUT_REASON else r) for g, r in found)
                    covered.update(cov)
                    traced.append(name)
                    return
        children = [f"{name}.{c}" if name else c for c, _ in module.named_children()]
        if children and name in calls and name == root:
            why = None
        if any(True for _ in module.parameters(recurse=False)) or not children:
            dense[name] = (f"left dense: the dependency graph failed on the whole model ({cause})"
                           + (f" and on '{name}' ({why})" if why else ""))
        for child in children:
            descend(child)

    descend(root)
    if not traced:
        where = "; ".join(f"'{n}': {w}" for n, w in failed[:3])
        raise DiscoveryError(f"discover_groups: nothing in {label} could be traced: the whole model failed ({cause})"
                             + (f", and so did its submodules ({where})" if where else "") + "; nothing was changed")
    log.warning("discover_groups: traced %d submodules of %s on their own (%s ...); %d left dense",
                len(traced), label, ", ".join(traced[:3]), len(dense))
    return candidates, covered, dense, traced


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer (``LlamaRMSNorm``, ``T5LayerNorm``, ...): its name says so, its own tensors are 1-D."""
    own = list(module.parameters(recurse=False))
    return "Norm" in type(module).__name__ and bool(own) and all(p.dim() <= 1 for p in own)


def _trial_cuts(model: nn.Module, example_inputs: Any, groups: list[PrunableGroup]) -> dict[str, str]:
    """Cut one unit of every group on a copy and run a forward; failures refuse the group."""
    failures: dict[str, str] = {}
    try:
        work = copy.deepcopy(model)
    except Exception as err:  # noqa: BLE001 - a model that cannot be copied is simply not checked
        log.debug("discover_groups: no trial cuts (%s: %s)", type(err).__name__, err)
        return failures
    work.eval()
    for g in groups:
        width = g.width(work)
        step = max(1, g.round_to or 1)  # a width the layer can run at (a kernel's alignment)
        if width < 2:
            continue
        try:
            apply_plan_(work, [g], {g.name: torch.arange(width - step if width > step else width - 1)})
            with torch.no_grad():
                _forward(work, example_inputs)
        except Exception as err:  # noqa: BLE001 - any failure means the coupling is not what we think
            failures[g.name] = f"a trial cut failed ({type(err).__name__}: {str(err)[:160]}); left dense"
            work = copy.deepcopy(model).eval()
    return failures


def discover_groups(
    model: nn.Module,
    example_inputs: object,
    ignored_layers: Sequence[str | type] = (),
    min_width: int = 1,
    *,
    round_to: int | None = None,
    group_limits: Limits | None = None,
    prune_embeddings: bool = False,
    validate: bool = True,
) -> tuple[list[PrunableGroup], list[tuple[str, str]]]:
    """Return the prunable groups and ``(layer, reason)`` for each layer left dense.

    Args:
        ignored_layers: module names (a name also covers its submodules) or module types never cut;
            a group that touches one is refused.
        min_width: channel groups at or below this width are left dense (heads: see ``group_limits``).
        round_to: stored on channel groups (the planner keeps their widths multiples of it); heads are
            never rounded.
        group_limits: ``{group name, name prefix or module type: minimum width}``; the exact name wins,
            then the longest prefix, then the first type that matches the group's first layer. A head
            group's width is its number of heads (default minimum 1).
        prune_embeddings: also cut embedding dimensions (the residual width of a transformer). The
            vocabulary and the output layer are never cut.
        validate: check each group with a trial cut and forward on a copy of the model.

    The model is traced once in eval mode (no BatchNorm statistics change).
    """
    _check_args(model, ignored_layers, min_width, round_to, group_limits)
    names: dict[nn.Module, str] = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    ignored = {n for m, n in names.items() if n and _matches(n, m, ignored_layers)}
    layers = traced_layers(model)
    ctx = ClaimContext(prune_embeddings=prune_embeddings)
    pnames = {id(p): n for n, p in model.named_parameters()}
    ties = tied_parameters(model)
    candidates, covered, skipped, alone = _traced_candidates(model, example_inputs, layers, names, order, pnames, ctx,
                                                      round_to)

    for h in handlers():  # groups inside one module: heads, SSM states (or why they are left dense)
        for module, name in names.items():
            own = h.own_group(module) if name else None
            if own is None:
                continue
            covered.update({name} | {f"{name}.{c}" for c in own.covers})
            if not own.parts and own.reason is not None:  # nothing to cut at all (nn.MultiheadAttention)
                skipped[name] = own.reason
                continue
            candidates.append((PrunableGroup(name, (Slice(name, own.kind, 1, own.parts),), round_to=own.round_to or 1),
                               own.reason))

    groups: list[PrunableGroup] = []
    for group, reason in candidates:
        if group.name in skipped or any(g.name == group.name for g in groups):
            continue
        touched = [s.module for s in group.slices] + [f"{s.module}.{p}" for s in group.slices for p in s.parts]
        if reason is None and group.name in ignored:
            reason = "ignored"
        elif reason is None and any(t in ignored for t in touched):
            reason = f"coupled to ignored layer '{next(t for t in touched if t in ignored)}'"
        if reason is None:
            # a group's own limit: from group_limits, else 1 head; channel groups otherwise follow min_width
            own = resolve_limit(group.name, model.get_submodule(group.name), group_limits)
            if own is None and group.unit == "head":
                own = 1
            limit, source = (min_width, "min_width") if own is None else (own, "limit")
            width = group.width(model)
            if width <= limit:
                what = f"{width} heads" if group.unit == "head" else f"width {width}"
                reason = f"too small ({what} <= {source} {limit})"
            group = PrunableGroup(group.name, group.slices, own, group.round_to)
        reason = reason or _tie_reason(model, group, ties)
        if reason:
            skipped[group.name] = reason
        else:
            groups.append(group)

    if validate and groups:
        failures = _trial_cuts(model, example_inputs, groups)
        skipped.update(failures)
        groups = [g for g in groups if g.name not in failures]

    in_groups = {s.module for g in groups for s in g.slices} | {f"{s.module}.{p}" for g in groups for s in g.slices
                                                                 for p in s.parts}
    for m, n in names.items():
        if (n and n not in in_groups and n not in skipped and n not in covered
                and any(True for _ in m.parameters(recurse=False))
                and not any(n.startswith(s + ".") for s in skipped)):
            block = next((a for a in alone if n.startswith(a + ".")), None)
            skipped[n] = (f"coupled only to the input of '{block}', which was traced on its own (its input width is "
                          "set outside it)" if block is not None
                          else "not coupled" if isinstance(m, ROOT_TYPES + tuple({type(t) for t in layers}))
                          else f"{type(m).__name__} normalises a width that is not cut (nothing to slice)"
                          if _is_norm(m) else f"unsupported layer type {type(m).__name__}")
    return (sorted(groups, key=lambda g: order[g.name]),
            sorted(skipped.items(), key=lambda kv: order.get(kv[0], -1)))
