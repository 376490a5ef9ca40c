"""Find the prunable groups of any model, with the reason for every layer left dense.

Torch-Pruning's ``DependencyGraph`` is the coupling oracle (which slices are tied, through residual
additions, flattening, norms); head-structured attention modules (:mod:`.attention`) are registered
with it as opaque layers, so it couples their input and output widths to the residual stream without
tracing their insides, and their heads become groups of their own. Our executor (:mod:`.slices`) does
the cutting. Every accepted group is checked by a trial cut on a copy of the model.

Example::

    groups, skipped = discover_groups(model, model.example_input_array, ignored_layers=["head"],
                                      min_width=8, round_to=8, group_limits={nn.Conv2d: 16, "blocks.0.attn": 2})
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..probe import as_call
from . import attention as attn
from . import mha as pmha
from . import hf
from .balanced import is_lru_layer
from .slices import (ATTN_IN, ATTN_OUT, CONV_IN, CONV_OUT, EMBEDDING_DIM, HEADS, IN_KINDS, LINEAR_IN, LINEAR_OUT,
                     NORM, OUT_KINDS, SSM_STATE, PrunableGroup, Slice, apply_plan_, tied_parameters)

log = logging.getLogger(__name__)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
ROOT_TYPES: tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)
Limits = Mapping["str | type", int]


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


def _black_box_pruner() -> Any:
    """A Torch-Pruning pruner that only reports widths: attention modules are traced as single layers."""
    import torch_pruning as tp

    class _AttentionWidths(tp.pruner.BasePruningFunc):
        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            raise NotImplementedError("ctprune cuts attention modules itself")

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            raise NotImplementedError("ctprune cuts attention modules itself")

        def get_out_channels(self, layer: nn.Module) -> int:
            return getattr(layer, attn.find_head_layout(layer).out).out_features

        def get_in_channels(self, layer: nn.Module) -> int:
            return getattr(layer, attn.find_head_layout(layer).qkv[0]).in_features

    return _AttentionWidths()


def _slice_kind(module: nn.Module, is_out: bool, layouts: Mapping[nn.Module, attn.HeadLayout],
                prune_embeddings: bool) -> tuple[str | None, tuple[str, ...], str | None]:
    """(kind, parts, None) for a supported slice, else (None, (), reason with a ``{}`` for the name)."""
    if isinstance(module, nn.Linear):
        return (LINEAR_OUT if is_out else LINEAR_IN), (), None
    if isinstance(module, nn.modules.conv._ConvNd):
        if not isinstance(module, CONV_TYPES):
            return None, (), f"coupled to {type(module).__name__} '{{}}' (transposed convolutions are not supported)"
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels == module.out_channels else "grouped"
            return None, (), (f"coupled to {kind} convolution '{{}}' (groups={module.groups}): its channels are tied "
                              "to their group, which is not supported")
        return (CONV_OUT if is_out else CONV_IN), (), None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return NORM, (), None
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            return None, (), f"coupled to LayerNorm '{{}}' over {tuple(module.normalized_shape)} (1-D only)"
        return NORM, (), None
    if isinstance(module, nn.Embedding):
        if not prune_embeddings:
            return None, (), ("embedding dimension of '{}' (vocabulary and embedding widths are never cut unless "
                              "prune_embeddings=True)")
        return EMBEDDING_DIM, (), None
    if hf.is_conv1d(module):  # transformers' Conv1D (GPT-2): a Linear with the weight transposed
        return (hf.CONV1D_OUT if is_out else hf.CONV1D_IN), (), None
    if hf.find_hf_head_layout(module) is not None:
        return None, (), hf.RESIDUAL_REASON
    if module in layouts:
        return (ATTN_OUT if is_out else ATTN_IN), layouts[module].parts, None
    if isinstance(module, pmha.PrunableMultiheadAttention):  # its residual (embed_dim) side
        why = pmha.embed_refusal(module)
        return ((ATTN_OUT if is_out else ATTN_IN), pmha.MHA_PARTS, None) if why is None else (
            None, (), f"coupled to the residual width of attention '{{}}' ({why})")
    if isinstance(module, nn.MultiheadAttention):
        return None, (), ("coupled to nn.MultiheadAttention '{}', whose embed_dim ties its input, q/k/v and output "
                          "widths (not supported; convert_multihead_attention_ makes it prunable)")
    return None, (), f"coupled to {type(module).__name__} '{{}}', which cannot be shrunk yet"


def _block(item: Any, width: int, kind: str) -> tuple[int, str | None]:
    """Elements per unit of a traced slice (Linear inputs after a flatten), or a reason to refuse."""
    idxs, roots = list(item.idxs), list(getattr(item, "root_idxs", item.idxs))
    n = len(idxs)
    if n == width and all(int(i) == int(r) for i, r in zip(idxs, roots)):
        return 1, None
    if kind == LINEAR_IN and n % width == 0:
        k = n // width
        pairs = sorted(zip(map(int, idxs), map(int, roots)))
        if [i for i, _ in pairs] == list(range(n)) and all(r == i // k for i, r in pairs):
            return k, None
    return 0, "partially coupled to '{}' (concat/split/permutation of channels)"


def _trace(model: nn.Module, example_inputs: Any, layouts: Mapping[nn.Module, attn.HeadLayout]) -> tuple[Any, list]:
    import torch_pruning as tp  # heavy import, only when a fit starts

    custom = {type(m): _black_box_pruner() for m in layouts}
    custom.update(pmha.customized_pruners(model))  # PrunableMultiheadAttention, traced as one layer
    custom.update(hf.customized_pruners(model))  # Conv1D and Hugging Face attention modules
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), hf.opaque_attention(model), pmha.traced_as_one_layer(model):
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, forward_fn=_forward,
                                                          customized_pruners=custom or None, verbose=False,
                                                          output_transform=_graph_outputs)
        roots = ROOT_TYPES + tuple(custom)  # an attention output group is named after its output projection
        return graph, list(graph.get_all_groups(ignored_layers=[], root_module_types=roots))
    finally:
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
    return f"{producer.module}.{producer.parts[-1]}" if producer.kind == ATTN_OUT else producer.module


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
        if width < 2:
            continue
        try:
            apply_plan_(work, [g], {g.name: torch.arange(width - 1)})
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
    layouts = {m: lay for m in names if (lay := attn.find_head_layout(m)) is not None}
    hf_layouts = {m: lay for m in names if (lay := hf.find_hf_head_layout(m)) is not None}
    layouts = {m: lay for m, lay in layouts.items() if m not in hf_layouts}
    graph, tp_groups = _trace(model, example_inputs, layouts)
    pnames = {id(p): n for n, p in model.named_parameters()}
    ties = tied_parameters(model)

    candidates: list[tuple[PrunableGroup, str | None]] = []
    covered: set[str] = set()
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
            if is_out and not isinstance(module, NORM_TYPES):
                lay = layouts.get(module) or hf_layouts.get(module)  # an attention output: its projection
                display = f"{names[module]}.{lay.out}" if lay is not None else names[module]
                display += ".out_proj" if isinstance(module, pmha.PrunableMultiheadAttention) else ""
                producers.append((order[names[module]], display))
            kind, parts, why = _slice_kind(module, is_out, layouts, prune_embeddings)
            block, why_block = (0, None) if kind is None else _block(item, width, kind)
            if why or why_block:
                reason = reason or (why or why_block).format(names[module])
                continue
            slices.append(Slice(names[module], kind, block, parts))
        slices = list(dict.fromkeys(slices))
        name = min(producers)[1] if producers else names.get(tp_group.items[0].dep.target.module, "?")
        first = next((s for s in slices if s.kind in OUT_KINDS and _group_name(s) == name), None)
        if first is not None:  # the named producer leads: the group's width is read from it
            slices.remove(first)
            slices.insert(0, first)
        if reason is None and not any(s.kind in IN_KINDS for s in slices):
            reason = "output layer (its features leave the model)"
        candidates.append((PrunableGroup(name, tuple(slices), round_to=round_to), reason))

    skipped: dict[str, str] = {}
    for module, layout in layouts.items():
        name = names[module]
        covered.update({name} | {f"{name}.{p}" for p in layout.parts})
        why = attn.check_head_layout(module, layout)
        group = PrunableGroup(name, (Slice(name, HEADS, 1, layout.parts),), round_to=1)
        candidates.append((group, None if why is None else f"attention heads: {why}"))
    for module, layout in hf_layouts.items():  # GPT-2, Llama-style (a unit = a key/value group), BERT
        name = names[module]
        covered.update({name} | {n for n in order if n.startswith(name + ".")})
        why = hf.check_hf_head_layout(module, layout)
        group = PrunableGroup(name, (Slice(name, hf.HF_HEADS, 1, layout.parts),), round_to=1)
        candidates.append((group, None if why is None else f"attention heads: {why}"))
    for module, name in names.items():  # a converted nn.MultiheadAttention: one head group (mha.py)
        if isinstance(module, pmha.PrunableMultiheadAttention):
            covered.update({name, f"{name}.out_proj"})
            candidates.append((PrunableGroup(name, (Slice(name, HEADS, 1, pmha.MHA_PARTS),), round_to=1), None))
    for module, name in names.items():
        if name and is_lru_layer(module):  # SSM state groups: cut by balanced truncation, no coupling outside
            covered.add(name)
            candidates.append((PrunableGroup(name, (Slice(name, SSM_STATE),), round_to=1), None))
    for module, name in names.items():
        if isinstance(module, nn.MultiheadAttention):
            skipped[name] = attn.MHA_REASON
            covered.update(n for n in order if n.startswith(name + "."))

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
            skipped[n] = ("not coupled" if isinstance(m, ROOT_TYPES + attn_types(layouts))
                          else f"unsupported layer type {type(m).__name__}")
    return (sorted(groups, key=lambda g: order[g.name]),
            sorted(skipped.items(), key=lambda kv: order.get(kv[0], -1)))


def attn_types(layouts: Mapping[nn.Module, attn.HeadLayout]) -> tuple[type, ...]:
    return tuple({type(m) for m in layouts})
