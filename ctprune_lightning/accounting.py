"""Training-compute accounting: FLOPs per training step, cumulative and saved FLOPs, wall-clock.

FLOPs of one training step (forward + backward) are counted with ``torch.utils.flop_counter`` on the
example batch, once per architecture (cached by its spec). Per-module counts let the callback predict
the FLOPs of a candidate width assignment before cutting (a Linear's cost scales with in × out).

Example::

    meter = FlopMeter(loss_fn)
    total, per_module = meter.measure(model, batch, key=arch_spec(model, groups))
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .planning import predict_count
from .probe import batch_size
from .surgery.groups import PrunableGroup


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,  # noqa: ANN001
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    """``aten._grouped_mm`` (mixture-of-experts kernels): every row of ``a`` meets one group's ``[K, N]``
    matrix, so 2·rows·K·N whichever operand is grouped (2-D x 3-D forward, 2-D x 2-D weight gradient); a
    batched 3-D x 3-D call is that times the batch."""
    flops = 2 * a_shape[-2] * a_shape[-1] * b_shape[-1]
    return flops * (a_shape[0] if len(a_shape) == 3 and len(b_shape) == 3 else 1)


# torch's FlopCounterMode counts the CUDA attention kernels but not the CPU one that
# F.scaled_dot_product_attention dispatches to on a CPU, which would make attention look free; nor does it
# count grouped matmuls (transformers' default MoE experts), which would make the experts look free.
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
}
if hasattr(torch.ops.aten, "_grouped_mm"):
    EXTRA_FLOP_FORMULAS[torch.ops.aten._grouped_mm] = _grouped_mm_flop


class AutogradModuleTracker:
    """Which modules an op belongs to, exact in backward too (a drop-in for FlopCounterMode's tracker).

    torch's ``ModuleTracker`` enters a module's backward when its output's gradient is ready and leaves
    it when its input's gradient is: an identity module (``nn.Identity``, ``Dropout`` in eval) or an
    input shared by two branches (a residual block) leaves modules "entered", and later backward ops
    are charged to them. Here each module claims the autograd nodes its own forward created (by
    sequence number); node hooks set the current modules while a node's backward runs.
    """

    def __init__(self, root: nn.Module) -> None:
        prefix = type(root).__name__
        self.names = {m: f"{prefix}.{n}" if n else prefix for n, m in root.named_modules()}
        self.parents: set[str] = {"Global"}
        self._stack: list[tuple[str, int]] = []
        self._handles: list[Any] = []
        self._claimed: set[Any] = set()

    def _set_parents(self, names: list[str]) -> None:
        parents = {"Global"}
        for n in names:
            parts = n.split(".")
            parents.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        self.parents = parents

    @staticmethod
    def _next_sequence_nr() -> int:
        if not torch.is_grad_enabled():
            return -1
        return torch.zeros((), requires_grad=True).clone().grad_fn._sequence_nr() + 1

    def _pre(self, module: nn.Module, args: Any) -> None:
        if module in self.names:
            self._stack.append((self.names[module], self._next_sequence_nr()))
            self._set_parents([n for n, _ in self._stack])

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if module not in self.names or not self._stack:
            return
        name, start = self._stack.pop()
        self._set_parents([n for n, _ in self._stack])
        if start < 0:
            return
        owners = [n for n, _ in self._stack] + [name]
        todo = [t.grad_fn for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.grad_fn is not None]
        seen: set[Any] = set()
        while todo:  # every node created since this module's forward began; children's nodes are kept
            node = todo.pop()
            if node is None or node in seen or not (start <= node._sequence_nr() < 2**63):
                continue
            seen.add(node)
            todo.extend(f for f, _ in node.next_functions)
            if node not in self._claimed:
                self._claimed.add(node)
                self._handles.append(node.register_prehook(lambda grads, o=owners: self._set_parents(o)))
                self._handles.append(node.register_hook(lambda gi, go: self._set_parents([])))

    def __enter__(self) -> "AutogradModuleTracker":
        self._handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *args: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._claimed, self._stack = [], set(), []
        self.parents = {"Global"}


def count_training_flops(
    model: nn.Module, batch: object, loss_fn: Callable[[nn.Module, object], Tensor]
) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward + backward of ``loss_fn(model, batch)``; also per module (qualified name).

    Gradients are taken with ``torch.autograd.grad`` so no ``.grad`` is touched, in eval mode so no
    BatchNorm statistic moves. CPU scaled-dot-product attention is counted like the CUDA kernels (the
    full T×T score matrix, causal or not).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
        counter.mod_tracker = AutogradModuleTracker(model)
        with counter:
            loss = loss_fn(model, batch)
            if params and loss.requires_grad:
                torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.train(was_training)
    root = type(model).__name__
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name.startswith(root + "."):
            per_module[name[len(root) + 1 :]] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


def _head(batch: object, n: int, k: int) -> object:
    """The first ``k`` samples: every tensor whose leading dimension is the batch size ``n`` is sliced."""
    return apply_to_collection(batch, Tensor, lambda t: t[:k] if t.dim() > 0 and t.shape[0] == n else t)


Count = tuple[int, dict[str, int]]  # (FLOPs of a training step, per module)


def _scaled(count: Count, k: int) -> Count:
    return count[0] * k, {name: flops * k for name, flops in count[1].items()}


def _line(two: Count, four: Count, n: int) -> Count:
    """The count at ``n`` samples, per module as in total, on the line through the counts at 2 and 4."""
    def line(a: int, b: int) -> int:
        return a + (b - a) * (n - 2) // 2

    (t2, m2), (t4, m4) = two, four
    return line(t2, t4), {name: line(m2.get(name, 0), m4.get(name, 0)) for name in {**m2, **m4}}


@dataclass
class FlopMeter:
    """Caches the per-step FLOPs of each architecture the run visits, counting as few of them as it can exactly.

    **Fewer samples.** The first architecture is counted on its first 2, 4 and 8 samples (the whole batch as
    the third when it holds at most 8). When the line through the counts at 2 and 4 gives exactly the third
    count, per module as in total (the counted ops -- matmul, conv, attention -- are linear in the batch size
    for almost every model), that line at the whole batch is the count, and later architectures are counted
    on 2 and 4 samples and extrapolated. When the
    line also passes through zero, per module (no op whose cost is the same for any batch, such as a product
    of two weights), one count on 2 samples, scaled, is the line: one pass instead of two. A model whose
    count is not linear in the batch (a loss over pairs of samples) is counted on whole batches, always.

    **Fewer architectures.** Given the widths and the groups (``measure(..., widths=, groups=)``), each count
    of a new architecture is compared with what :func:`~ctprune_lightning.planning.predict_count` predicts
    from the last count; a group whose width differed there becomes *verified* when every module's count
    and the total equal the prediction. An architecture whose groups differ from the last count only in
    verified groups is then predicted, not counted (a count costs about a training step's Python dispatch;
    the char-GPT's lqr run counts 3 of its 11 architectures). One mismatch (a cost the width ratios do not
    scale, such as a functional matmul on a cut dimension outside every module) and every architecture is
    counted again.
    """

    loss_fn: Callable[[nn.Module, object], Tensor]
    cache: dict[Hashable, Count] = field(default_factory=dict)
    batch_linear: bool | None = None  # None: not checked yet
    proportional: bool = False  # the line through zero: one count on 2 samples, scaled
    verified: set[str] = field(default_factory=set)  # groups whose width changes the prediction got exactly right
    predictable: bool = True  # False after a prediction missed a count: count every architecture
    counted: int = 0  # architectures counted (the others were predicted)
    _last: tuple[dict[str, int], Count] | None = None  # the widths and count of the last architecture counted

    def measure(self, model: nn.Module, batch: object, key: Hashable, widths: Mapping[str, int] | None = None,
                groups: Sequence[PrunableGroup] = ()) -> Count:
        if key in self.cache:
            return self.cache[key]
        last, widths = self._last, dict(widths) if widths is not None else None
        predicted = None
        if last is not None and widths is not None and groups and last[0].keys() == widths.keys():
            predicted = predict_count(last[0], last[1][1], last[1][0], groups, widths)
            changed = {n for n, w in widths.items() if w != last[0][n]}
            if self.predictable and changed <= self.verified:
                self.cache[key] = predicted
                return predicted
        counted = self.cache[key] = self._count(model, batch)
        self.counted += 1
        if predicted is not None:
            if predicted == counted:
                self.verified |= changed
            else:
                self.predictable = False
        if widths is not None:
            self._last = (widths, counted)
        return counted

    def _count(self, model: nn.Module, batch: object) -> Count:
        n = batch_size(batch)  # 1 when the batch holds no tensor: then whole-batch counts, always
        if self.batch_linear and n > 4:
            two = count_training_flops(model, _head(batch, n, 2), self.loss_fn)
            four = _scaled(two, 2) if self.proportional else count_training_flops(model, _head(batch, n, 4),
                                                                                self.loss_fn)
            return _line(two, four, n)
        if self.batch_linear is None:
            self.batch_linear = False  # unless the counts on 2, 4 and min(n, 8) samples lie on one line
            k = min(n, 8)
            if n > 4:
                try:
                    two, four, third = (count_training_flops(model, _head(batch, n, j), self.loss_fn)
                                        for j in (2, 4, k))
                except Exception:  # noqa: BLE001 -- a model that cannot run on a few samples: whole batches, always
                    two = four = third = None
                if third is not None and _line(two, four, k) == third:
                    self.batch_linear, self.proportional = True, four == _scaled(two, 2)
                    return _line(two, four, n)
                if third is not None and k == n:  # the whole batch, counted already
                    return third
        return count_training_flops(model, batch, self.loss_fn)


@dataclass
class ComputeLedger:
    """Cumulative training FLOPs against a dense run of the same schedule, and wall-clock."""

    dense_step_flops: int = 0
    train_flops: float = 0.0
    dense_train_flops: float = 0.0
    batches: int = 0
    train_time_s: float = 0.0
    overhead_s: float = 0.0  # the callback's own time inside the fit: probe, trials, planning, surgery, importance
    overhead_parts: dict[str, float] = field(default_factory=dict)  # overhead_s by part (exclusive of nested parts)
    sensing_flops: float = 0.0  # the forwards of the probe readings and trial cuts (not in train_flops)
    _t0: float | None = None
    _open: list[float] = field(default_factory=list)  # time of the parts nested in each open block

    def add_batch(self, step_flops: int, scale: float = 1.0) -> None:
        """One forward/backward at the current architecture (``scale`` = batch size / probe size)."""
        self.train_flops += step_flops * scale
        self.dense_train_flops += self.dense_step_flops * scale
        self.batches += 1

    @property
    def saved(self) -> float:
        return 1.0 - self.train_flops / self.dense_train_flops if self.dense_train_flops else 0.0

    def start_clock(self) -> None:
        self._t0 = time.perf_counter()

    def stop_clock(self) -> None:
        if self._t0 is not None:
            self.train_time_s += time.perf_counter() - self._t0
            self._t0 = None

    @contextlib.contextmanager
    def overhead(self, part: str = "control") -> Iterator[None]:
        """Charge the wall-clock of the block to :attr:`overhead_s` (the pruning's own share of the fit) and to
        ``overhead_parts[part]``; a nested block is charged to its own part only (the outer one's time excludes it)."""
        t0 = time.perf_counter()
        self._open.append(0.0)
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            nested = self._open.pop()
            self.overhead_parts[part] = self.overhead_parts.get(part, 0.0) + dt - nested
            if self._open:
                self._open[-1] += dt
            else:
                self.overhead_s += dt

    def spent(self, *parts: str) -> float:
        """Seconds charged so far to ``parts``."""
        return sum(self.overhead_parts.get(p, 0.0) for p in parts)

    @property
    def overhead_share(self) -> float | None:
        """:attr:`overhead_s` as a share of the fit's wall-clock (None before the clock has run)."""
        return self.overhead_s / self.train_time_s if self.train_time_s > 0 else None

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("dense_step_flops", "train_flops", "dense_train_flops", "batches", "train_time_s",
                                                "overhead_s", "sensing_flops")} | {"overhead_parts": dict(self.overhead_parts)}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.state_dict().items():
            setattr(self, k, type(v)(state.get(k, v)))
