"""A measured cost model: the time of one training step at candidate widths of each prunable group.

FLOPs do not say what a width costs: a GEMM or a convolution whose width is not a multiple of the
kernel's block runs at the speed of the next multiple, and small layers are bound by overheads that
do not shrink. At set-up, :func:`measure_cost` times one training step (forward + backward of the
probe loss) with each group cut, alone, to a ladder of candidate widths (the others dense), and keeps
per group the **cost frontier**: the widths that are faster than every wider candidate. The planner
(:func:`~ctprune_lightning.planning.plan_widths`) steps only to frontier widths when given the model,
so a plan never picks a width slower than a wider one.

Measurement: warm-up steps, then the median of a few repeats, ``torch.cuda.synchronize`` around each
on a GPU; the live model is cut and restored exactly (:func:`~ctprune_lightning.trial.read_cut`), its
buffers (BatchNorm statistics) and the random number generators are left as they were. Times are
cached in memory per (device type, dtype, model shape, batch shape, group), and in a JSON file when a
``cache_dir`` is given. ``max_seconds`` bounds the measurement (the dense step is always timed): each
group's narrowest candidate first, then further ladder points round-robin over the groups while the
budget lasts. A group the budget did not reach is *assumed* to save its share of the dense step in proportion
to its width (:attr:`GroupCost.assumed`). ``shares`` gives that share: the loop passes each group's share of the
step's FLOPs, and without it the share is the whole step. :meth:`CostModel.describe` says what was measured.

The modelled time of a width assignment is first order in each group:
``dense × Π_g t_g(w_g) / dense``, where ``t_g`` interpolates group ``g``'s measured times linearly in
width. It is exact for a module cut by two groups (a hidden Linear between two cut layers) and
optimistic about the fixed per-step overhead when several groups are cut at once.

``round_to="auto"`` picks the width alignment from :data:`AUTO_ALIGNMENT` (a documented table, not a
measurement): CPU fp32 8 (oneDNN's fp32 blocks on AVX2; 12/20/36 channels measured as slow as
16/24/48), CPU half precisions 16, CUDA fp32 32 (128-byte rows; TF32 tensor cores), CUDA bf16/fp16 64
(tensor cores need multiples of 8 and run best at multiples of 64).

Example::

    cost = measure_cost(model, groups, batch, loss_fn, min_width=8, round_to=8, max_seconds=2.0)
    cost.frontier("net.1")                     # (1024, 768, 512, ...): widest first
    cost.allowed("net.1", 1016)                # False when 1016 runs no faster than a wider width
    cost.fraction({"net.1": 512, "net.3": 1024})   # modelled time per step / dense
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, MutableMapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .surgery.groups import PrunableGroup
from .trial import read_cut

__all__ = ["AUTO", "AUTO_ALIGNMENT", "COSTS", "CostModel", "GroupCost", "StepTimer", "TimeLedger", "auto_round_to",
           "candidate_widths", "check_cost", "check_round_to", "frontier", "measure_cost", "precision_dtype"]

#: what the controller's "compute" reading is: FLOPs per step ÷ dense, or the modelled time per step ÷ dense
COSTS = ("flops", "time")
#: the ``round_to`` value that picks the alignment for the device and dtype
AUTO = "auto"
#: ``(device type, dtype) -> width alignment`` for ``round_to="auto"`` (see the module docstring)
AUTO_ALIGNMENT: dict[tuple[str, torch.dtype], int] = {
    ("cpu", torch.float32): 8, ("cpu", torch.float64): 8, ("cpu", torch.bfloat16): 16, ("cpu", torch.float16): 16,
    ("cuda", torch.float32): 32, ("cuda", torch.float64): 32, ("cuda", torch.bfloat16): 64, ("cuda", torch.float16): 64,
}
#: the alignment of a device or dtype the table does not list
DEFAULT_ALIGNMENT = 8
#: Lightning precision names -> the dtype the layers compute in
PRECISION_DTYPES = {"32": torch.float32, "32-true": torch.float32, "64": torch.float64, "64-true": torch.float64,
                    "16": torch.float16, "16-mixed": torch.float16, "16-true": torch.float16,
                    "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16}
#: the in-memory cache of measured times: ``{key: {width: seconds}}`` (see :func:`measure_cost`)
MEMORY_CACHE: dict[str, dict[int, float]] = {}
CACHE_FILE = "ctprune_cost_cache.json"


def check_cost(cost: Any, where: str = "cost") -> str:
    """``cost`` if it is one of :data:`COSTS`, else ``ValueError`` naming the allowed values."""
    if not isinstance(cost, str) or cost not in COSTS:
        raise ValueError(f"`{where}` must be one of {', '.join(COSTS)}, got {cost!r}")
    return cost


def check_round_to(value: Any, where: str = "round_to") -> int | str:
    """An integer >= 1 or ``"auto"``, else ``ValueError`` naming the allowed values."""
    if value == AUTO and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{where}` must be an integer >= 1 or '{AUTO}', got {value!r}")
    return value


def auto_round_to(device_type: str, dtype: torch.dtype) -> int:
    """The width alignment for ``round_to="auto"`` on this device type and compute dtype (:data:`AUTO_ALIGNMENT`).

    >>> auto_round_to("cpu", torch.float32), auto_round_to("cuda", torch.bfloat16)
    (8, 64)
    """
    return AUTO_ALIGNMENT.get((str(device_type), dtype), DEFAULT_ALIGNMENT)


def precision_dtype(precision: Any) -> torch.dtype:
    """The dtype the layers compute in under a Lightning ``precision`` (``"bf16-mixed"`` -> bfloat16).

    Raises ``ValueError`` naming the known precisions for any other value.
    """
    key = str(precision)
    if key not in PRECISION_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[key]


def candidate_widths(dense: int, lo: int, step: int) -> list[int]:
    """Every width the planner can step to from ``dense``, widest first: the multiples of ``step`` in
    ``[lo, dense)`` and ``lo``.

    >>> candidate_widths(30, 8, 8)
    [30, 24, 16, 8]
    """
    lo = min(lo, dense)
    widths = {dense, lo} | {w for w in range(step * (lo // step), dense, step) if lo <= w < dense}
    return sorted(widths, reverse=True)


#: a width joins the frontier only when it is measured this much faster than every wider one kept: timings are
#: noisy (a few % on a shared CPU), and a width as fast as a wider one must be dropped every time, not at random
FRONTIER_MARGIN = 0.02


def frontier(times: Callable[[int], float], widths: Sequence[int], margin: float = FRONTIER_MARGIN) -> tuple[int, ...]:
    """The widths (widest first) each faster by ``margin`` (a fraction) than every wider one kept; the widest stays.

    >>> frontier({64: 10.0, 56: 9.9, 48: 8.0}.__getitem__, [64, 56, 48])
    (64, 48)
    """
    kept, best = [], float("inf")
    for w in sorted(widths, reverse=True):
        t = times(w)
        if t < best * (1.0 - margin) or not kept:
            kept.append(w)
            best = t
    return tuple(kept)


@dataclass
class GroupCost:
    """One group's measured step times (the other groups dense) and its cost frontier.

    Attributes:
        name: the group.
        dense_width: its width when measured.
        times: ``{width: seconds per step}`` measured (the dense width's is the dense step time).
        candidates: every width the planner may step to, widest first.
        share: the share of the dense step time assumed to scale with the width where only the dense width was
            measured (:attr:`assumed`): the group's share of the step's FLOPs (1: the whole step).
    """

    name: str
    dense_width: int
    times: dict[int, float]
    candidates: tuple[int, ...]
    share: float = 1.0
    _frontier: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        self.times = {int(w): float(t) for w, t in self.times.items()}
        self._frontier = frontier(self.time, self.candidates)

    @property
    def assumed(self) -> bool:
        """No width but the dense one was measured (the budget ran out): the time is assumed proportional."""
        return len(self.times) < 2

    def time(self, width: int) -> float:
        """Seconds per step at ``width``: linear between measured widths, flat beyond them; when only the dense
        width was measured (:attr:`assumed`), its :attr:`share` of the step in proportion to the width."""
        xs = sorted(self.times)
        if len(xs) < 2:
            return self.times[xs[0]] * (1.0 - self.share * (1.0 - width / xs[0]))
        return float(np.interp(width, xs, [self.times[x] for x in xs]))

    @property
    def frontier(self) -> tuple[int, ...]:
        return self._frontier

    def allowed(self, width: int) -> bool:
        """Whether ``width`` is on the frontier: strictly faster than every wider candidate."""
        if width in self.candidates:
            return width in self._frontier
        t = self.time(width)
        return all(t < self.time(c) for c in self.candidates if c > width)


@dataclass
class CostModel:
    """Measured step times per group (see the module docstring); plain data, picklable.

    Attributes:
        dense_time: seconds per training step of the model as measured (every group dense).
        groups: ``{group name: GroupCost}``.
        device / dtype: where and in what it was measured.
        seconds: the time the measurement took (cached widths cost nothing).
        max_seconds: the budget it was given; ``complete``: whether every ladder point fit in it.
        warmup / repeats: steps run before timing, and steps timed (the median is kept).
    """

    dense_time: float
    groups: dict[str, GroupCost]
    device: str = "cpu"
    dtype: str = "torch.float32"
    seconds: float = 0.0
    max_seconds: float = 0.0
    complete: bool = True
    warmup: int = 1
    repeats: int = 3
    cached: int = 0

    def frontier(self, name: str) -> tuple[int, ...]:
        return self.groups[name].frontier

    def allowed(self, name: str, width: int) -> bool:
        """Whether group ``name`` may run at ``width`` (True for a group the model has not measured)."""
        g = self.groups.get(name)
        return True if g is None else g.allowed(width)

    def step_time(self, widths: Mapping[str, int]) -> float:
        """Modelled seconds per step at these widths: ``dense × Π_g t_g(w_g) / dense`` (groups not measured: 1)."""
        t = self.dense_time
        for name, w in widths.items():
            g = self.groups.get(name)
            if g is not None:
                t *= g.time(w) / self.dense_time
        return t

    def fraction(self, widths: Mapping[str, int]) -> float:
        """Modelled time per step ÷ dense."""
        return self.step_time(widths) / self.dense_time

    def describe(self) -> dict[str, Any]:
        """What was measured, as plain Python (for the summary)."""
        return {"device": self.device, "dtype": self.dtype, "dense_time_s": self.dense_time,
                "seconds": self.seconds, "max_seconds": self.max_seconds, "complete": self.complete,
                "warmup": self.warmup, "repeats": self.repeats, "cached_widths": self.cached,
                "groups": {n: {"measured": dict(sorted(g.times.items(), reverse=True)), "frontier": list(g.frontier),
                               "dropped": [w for w in g.candidates if w not in g.frontier], "assumed": g.assumed,
                               "share": g.share}
                           for n, g in self.groups.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"dense_time": self.dense_time, "device": self.device, "dtype": self.dtype, "seconds": self.seconds,
                "max_seconds": self.max_seconds, "complete": self.complete, "warmup": self.warmup,
                "repeats": self.repeats, "cached": self.cached,
                "groups": {n: {"dense_width": g.dense_width, "times": dict(g.times), "candidates": list(g.candidates),
                               "share": g.share} for n, g in self.groups.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "CostModel":
        groups = {n: GroupCost(n, int(g["dense_width"]), dict(g["times"]), tuple(int(c) for c in g["candidates"]),
                               float(g.get("share", 1.0))) for n, g in state["groups"].items()}
        return cls(**{k: v for k, v in state.items() if k != "groups"}, groups=groups)


@dataclass
class TimeLedger:
    """Cumulative modelled training time against the dense model's (the time counterpart of ComputeLedger)."""

    time_s: float = 0.0
    dense_time_s: float = 0.0

    def add(self, step_time: float, dense_time: float, scale: float = 1.0) -> None:
        self.time_s += step_time * scale
        self.dense_time_s += dense_time * scale

    @property
    def saved(self) -> float:
        return 1.0 - self.time_s / self.dense_time_s if self.dense_time_s else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"time_s": self.time_s, "dense_time_s": self.dense_time_s}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.time_s, self.dense_time_s = float(state.get("time_s", 0.0)), float(state.get("dense_time_s", 0.0))


class StepTimer:
    """Seconds of one training step (forward + backward of ``loss_fn(model, batch)``): ``warmup`` untimed steps,
    then the median of ``repeats``; ``torch.cuda.synchronize`` around each on a GPU. Gradients are taken with
    ``torch.autograd.grad``, so no ``.grad`` is touched."""

    def __init__(self, batch: Any, loss_fn: Callable[[nn.Module, Any], Tensor], warmup: int = 1, repeats: int = 3,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.batch, self.loss_fn, self.warmup, self.repeats, self.clock = batch, loss_fn, warmup, repeats, clock

    def __call__(self, model: nn.Module) -> float:
        params = [p for p in model.parameters() if p.requires_grad]
        cuda = bool(params) and params[0].device.type == "cuda"
        times = []
        with torch.enable_grad():
            for i in range(self.warmup + self.repeats):
                if cuda:
                    torch.cuda.synchronize(params[0].device)
                t0 = self.clock()
                loss = self.loss_fn(model, self.batch)
                if params and loss.requires_grad:
                    torch.autograd.grad(loss, params, allow_unused=True)
                if cuda:
                    torch.cuda.synchronize(params[0].device)
                if i >= self.warmup:
                    times.append(self.clock() - t0)
        return float(statistics.median(times))


@contextmanager
def _left_as_it_was(model: nn.Module) -> Iterator[None]:
    """Buffers (BatchNorm statistics) and the random number generators are restored on exit."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


def _ladder_order(n: int) -> list[int]:
    """Indices ``0..n-1`` of a ladder (widest first) in the order to measure: the narrowest, then bisections."""
    if n <= 0:
        return []
    order, seen, parts = [n - 1], {n - 1}, [(-1, n - 1)]
    while len(order) < n:
        nxt = []
        for a, b in parts:
            m = (a + b + 1) // 2
            if a < m < b and m not in seen:
                order.append(m)
                seen.add(m)
                nxt += [(a, m), (m, b)]
        if not nxt:
            order += [i for i in range(n) if i not in seen]
            break
        parts = nxt
    return order


def _subsample(widths: Sequence[int], points: int) -> list[int]:
    """At most ``points`` of ``widths`` (widest first), the first and last included, evenly by index."""
    if len(widths) <= points:
        return list(widths)
    idx = sorted({round(i * (len(widths) - 1) / (points - 1)) for i in range(points)})
    return [widths[i] for i in idx]


def _shape_key(model: nn.Module, groups: Sequence[PrunableGroup], batch: Any, device: str, dtype: str) -> str:
    shapes = [tuple(t.shape) for t in tree_flatten(batch)[0] if isinstance(t, Tensor)]
    widths = [(g.name, g.width(model)) for g in groups]
    return f"{device}|{dtype}|{type(model).__name__}|{widths}|{shapes}"


def _load_disk(cache_dir: str | Path | None, cache: MutableMapping[str, dict[int, float]]) -> Path | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir) / CACHE_FILE
    if path.exists():
        for key, times in json.loads(path.read_text()).items():
            cache.setdefault(key, {}).update({int(w): float(t) for w, t in times.items()})
    return path


def measure_cost(
    model: nn.Module,
    groups: Sequence[PrunableGroup],
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    min_width: int = 1,
    round_to: int = 1,
    max_seconds: float = 2.0,
    points: int = 7,
    warmup: int = 1,
    repeats: int = 3,
    step_time: Callable[[nn.Module], float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    cache: MutableMapping[str, dict[int, float]] | None = None,
    cache_dir: str | Path | None = None,
    shares: Mapping[str, float] | None = None,
) -> CostModel:
    """Time a training step with each group cut alone to a ladder of widths; the per-group cost frontiers.

    Args:
        model / groups / batch / loss_fn: the live model (restored exactly), its groups, a batch on its device,
            and ``loss_fn(model, batch) -> scalar`` (the probe loss).
        min_width / round_to: the planner's defaults (a group's own limits win): the ladder is the widths the
            planner can reach, subsampled to ``points`` per group (the dense and the narrowest included).
        max_seconds: the budget for the ladder (the dense step is always timed; see the module docstring).
        warmup / repeats: untimed steps, then timed steps per width (the median is kept).
        step_time: ``step_time(model) -> seconds`` instead of :class:`StepTimer` (tests inject a fake one).
        clock: the clock the budget is read on.
        cache: ``{key: {width: seconds}}`` (default: :data:`MEMORY_CACHE`); ``cache_dir``: also a JSON file there.
        shares: ``{group: share of the dense step}`` assumed to scale with a width the budget did not measure (the
            loop passes each group's share of the step's FLOPs); 1, the whole step, for a group not in it.

    Example::

        cost = measure_cost(model, groups, batch, loss_fn, round_to=8, max_seconds=1.0)
        cost.describe()["groups"]["net.1"]["frontier"]
    """
    for name, value, low in (("points", points, 2), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"measure_cost: `{name}` must be an integer >= {low}, got {value!r}")
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not max_seconds >= 0:
        raise ValueError(f"measure_cost: `max_seconds` must be a number >= 0, got {max_seconds!r}")
    bad = {n: v for n, v in (shares or {}).items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError(f"measure_cost: every share must be a number in [0, 1], got {bad}")
    cache = MEMORY_CACHE if cache is None else cache
    disk = _load_disk(cache_dir, cache)
    param = next(model.parameters())
    device = param.device.type
    dtype = str(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else param.dtype)
    timer = step_time or StepTimer(batch, loss_fn, warmup, repeats, clock)
    shape = _shape_key(model, groups, batch, device, dtype)
    widths = {g.name: g.width(model) for g in groups}
    ladders = {}
    for g in groups:
        lo = int(min_width if g.min_width is None else g.min_width)
        step = int(round_to if g.round_to is None else g.round_to)
        cands = candidate_widths(widths[g.name], lo, step)
        ladders[g.name] = (tuple(cands), _subsample(cands, points)[1:])  # the dense point is shared
    start, cached = clock(), 0
    with _left_as_it_was(model):
        dense_times = cache.setdefault(f"{shape}|", {})
        if 0 not in dense_times:
            dense_times[0] = timer(model)
        else:
            cached += 1
        per_point = clock() - start  # the cost of one more width: the longest so far (narrower ones are cheaper)
        times: dict[str, dict[int, float]] = {n: {widths[n]: dense_times[0]} for n in widths}
        orders = {n: [ladder[i] for i in _ladder_order(len(ladder))] for n, (_, ladder) in ladders.items()}
        complete = True
        for r in range(max((len(o) for o in orders.values()), default=0)):
            for g in groups:
                if r >= len(orders[g.name]):
                    continue
                w, key = orders[g.name][r], f"{shape}|{g.name}"
                known = cache.setdefault(key, {})
                if w in known:
                    cached += 1
                elif clock() - start + per_point > max_seconds:
                    complete = False
                    continue
                else:
                    t0 = clock()
                    known[w] = read_cut(model, groups, {g.name: range(w)}, timer)
                    per_point = max(per_point, clock() - t0)
                times[g.name][w] = known[w]
    if disk is not None:
        disk.parent.mkdir(parents=True, exist_ok=True)
        mine = {k: v for k, v in cache.items() if k.startswith(shape + "|")}
        old = json.loads(disk.read_text()) if disk.exists() else {}
        disk.write_text(json.dumps(old | {k: {str(w): t for w, t in v.items()} for k, v in mine.items()}))
    shares = shares or {}
    groups_cost = {n: GroupCost(n, widths[n], times[n], ladders[n][0], float(shares.get(n, 1.0))) for n in widths}
    return CostModel(dense_time=dense_times[0], groups=groups_cost, device=device, dtype=dtype,
                     seconds=clock() - start, max_seconds=float(max_seconds), complete=complete, warmup=warmup,
                     repeats=repeats, cached=cached)
