"""Distributed step time and communication volume, dense vs shrunk (2 ranks, gloo, CPU).

    .venv/bin/python experiments/bench_distributed.py                     # ~1-2 min on 2 cores
    .venv/bin/python experiments/bench_distributed.py --repeats 7 --steps 20 --width 424

Part 1, plain torch.distributed (no Lightning, so the time is the training step alone): two ranks
(``torch.multiprocessing.spawn``, gloo, one thread each) train the Fashion-MNIST MLP 784-1024-1024-10
(AdamW, global batch 256 = 2 x 128, synthetic inputs) and the same MLP shrunk to ``--width`` by the
real surgery (``discover_groups`` + ``apply_plan_``, the units with the largest weight rows kept),
under ``DistributedDataParallel`` and under FSDP2 (``fully_shard`` on each Linear and on the
Sequential, over ``init_device_mesh("cpu", (2,))``). The four variants are timed side by side:
each repeat runs ``--steps`` steps of every variant (the order rotates between repeats), and the
table gives min / median over the repeats and the shrunk / dense ratios.

Bytes per step and rank: DDP, the gradient buckets handed to all-reduce (a communication hook that
wraps ``allreduce_hook`` and sums ``bucket.buffer().numel() * element_size()``); FSDP2, the bytes
all-gathered (unsharded parameter buffers, forward + backward re-gather) and reduce-scattered
(unsharded gradient buffers), computed from the shard sizes and checked against a count of the
collectives FSDP2 issues during one step.

Part 2, through Lightning (``--no-lightning`` skips it): one run per strategy (``ctprune_ddp`` and
``ctprune_fsdp``, 2 CPU processes) whose callback cuts 1024 -> 848 -> 636 -> 424 at steps 2, 4 and 6
via ``strategy.actuate_`` (unwrap, cut with the AdamW moments sliced, agree, re-wrap, verify), and
times each event on rank 0, with the re-wrap part separately.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ctprune_lightning.models.mlp import build_mlp
from ctprune_lightning.surgery.groups import apply_plan_, discover_groups

IN, HIDDEN, CLASSES = 784, (1024, 1024), 10
GLOBAL_BATCH = 256
WORLD = 2


# ---------------------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def magnitude_plan(model: nn.Module, groups: list, width: int) -> dict[str, torch.Tensor]:
    """Keep the ``width`` units of every group whose producer Linear rows have the largest L2 norm."""
    plan = {}
    for g in groups:
        weight = model.get_submodule(g.name).weight.detach()
        plan[g.name] = weight.norm(dim=1).topk(width).indices.sort().values
    return plan


def shrunk_copy(model: nn.Module, width: int) -> nn.Module:
    """The real surgery on a copy: discover the coupled groups, cut every hidden group to ``width``."""
    out = copy.deepcopy(model)
    groups, _ = discover_groups(out, torch.zeros(2, IN))
    apply_plan_(out, groups, magnitude_plan(out, groups, width))
    return out


def widths(model: nn.Module) -> str:
    """The hidden widths, e.g. ``1024/1024`` (the output layer left out)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return "/".join(str(m.out_features) for m in linears[:-1])


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ByteCounter:
    def __init__(self) -> None:
        self.bytes = 0


def counting_allreduce_hook(state, bucket):  # no annotations: DDP checks them against real types
    """``allreduce_hook`` that first adds the bucket's bytes to ``state.bytes``."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state.bytes += nbytes(bucket.buffer())
    return allreduce_hook(None, bucket)  # None: the default process group


def fsdp_unit_bytes(module: nn.Module) -> list[int]:
    """Unsharded (padded) bytes of each FSDP unit's parameters: local shard x world size."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    for m in module.modules():
        if isinstance(m, FSDPModule):
            local = sum(nbytes(p.to_local()) for p in m.parameters(recurse=False))
            if local:
                out.append(local * dist.get_world_size())
    return out


class CollectiveCounter:
    """Counts the bytes of the all-gathers and reduce-scatters FSDP2 issues (patched while counting)."""

    names = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor")

    def __init__(self) -> None:
        self.all_gather = 0
        self.reduce_scatter = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> "CollectiveCounter":
        for name in self.names:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def wrapped(*args: Any, _fn: Callable = fn, _name: str = name, **kwargs: Any) -> Any:
                if "gather" in _name:
                    out = kwargs.get("output_tensor", args[0] if args else None)
                    self.all_gather += nbytes(out)
                else:
                    inp = kwargs.get("input", kwargs.get("input_tensor", args[1] if len(args) > 1 else None))
                    self.reduce_scatter += nbytes(inp)
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


# ---------------------------------------------------------------------------------------------- part 1
def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def bench_rank(rank: int, port: int, args: argparse.Namespace, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    info = _bench(rank, args)
    gc.collect()  # the DDP reducers and FSDP states go before their process group
    if rank == 0:
        Path(result).write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()


def _bench(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)  # identical models on both ranks (DDP broadcasts rank 0's anyway)
    dense = build_mlp(IN, HIDDEN, CLASSES)
    models = {"dense": dense, "shrunk": shrunk_copy(dense, args.width)}
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own half of the global batch
    local = GLOBAL_BATCH // WORLD
    x, y = torch.randn(local, IN, generator=g), torch.randint(0, CLASSES, (local,), generator=g)
    mesh = init_device_mesh("cpu", (WORLD,))

    def fsdp(base: nn.Module) -> nn.Module:
        m = copy.deepcopy(base)
        for sub in m:
            if isinstance(sub, nn.Linear):
                fully_shard(sub, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m

    steps: dict[tuple[str, str], Callable[[], None]] = {}
    info: dict[str, Any] = {"widths": {k: widths(m) for k, m in models.items()},
                            "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
                            "ddp_bytes": {}, "fsdp_bytes": {}}
    for name, base in models.items():
        steps[("ddp", name)] = make_step(DDP(copy.deepcopy(base)), x, y)
        steps[("fsdp", name)] = make_step(fsdp(base), x, y)

        # bytes: separate instances, so the timed ones run without hook or patch
        counter = ByteCounter()
        ddp = DDP(copy.deepcopy(base))
        ddp.register_comm_hook(counter, counting_allreduce_hook)
        count_step = make_step(ddp, x, y)
        per_step = []
        for _ in range(3):  # the first step rebuilds the buckets; all must agree
            counter.bytes = 0
            count_step()
            per_step.append(counter.bytes)
        info["ddp_bytes"][name] = per_step

        sharded = fsdp(base)
        units = fsdp_unit_bytes(sharded)
        count_step = make_step(sharded, x, y)
        count_step()  # lazy init
        with CollectiveCounter() as cc:
            count_step()
        info["fsdp_bytes"][name] = {
            "computed_all_gather": 2 * sum(units),  # forward + backward re-gather (every unit reshards)
            "computed_reduce_scatter": sum(units),
            "counted_all_gather": cc.all_gather, "counted_reduce_scatter": cc.reduce_scatter,
            "units": units}

    for step in steps.values():  # warm-up
        for _ in range(args.warmup):
            step()
    keys = list(steps)
    times: dict[str, list[float]] = {f"{s}/{n}": [] for s, n in keys}
    for r in range(args.repeats):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[key]()
            dist.barrier()
            elapsed = torch.tensor([(time.perf_counter() - t0) / args.steps])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slower rank's time
            times[f"{key[0]}/{key[1]}"].append(float(elapsed))
    info["times"] = times
    dist.barrier()
    return info


# ---------------------------------------------------------------------------------------------- part 2
def lightning_surgery(strategy_name: str, result: str) -> None:
    """One Lightning fit under a pruning strategy; a callback cuts 1024 -> 848 -> 636 -> 424 and times it."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from ctprune_lightning import PruningDDPStrategy, PruningFSDPStrategy
    from ctprune_lightning.models import MLPClassifier

    torch.set_num_threads(1)
    cuts = {2: 848, 4: 636, 6: 424}

    class Cutter(L.Callback):
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            self.groups, _ = discover_groups(pl_module, torch.zeros(2, IN))
            strategy = trainer.strategy
            self.rewrap_s = 0.0
            original = strategy._rewrap_

            def timed_rewrap(*a: Any) -> None:
                t0 = time.perf_counter()
                original(*a)
                self.rewrap_s = time.perf_counter() - t0

            strategy._rewrap_ = timed_rewrap

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            width = cuts.get(trainer.global_step)
            if width is None:
                return

            def surgery(model: nn.Module, optimizers: Any) -> None:  # plain Parameters here (unwrapped)
                apply_plan_(model, self.groups, magnitude_plan(model, self.groups, width), optimizers)

            trainer.strategy.barrier()
            t0 = time.perf_counter()
            trainer.strategy.actuate_(surgery)
            total = time.perf_counter() - t0
            self.events.append({"step": trainer.global_step, "width": width, "total_s": total,
                                "rewrap_s": self.rewrap_s, "widths": widths(pl_module.net)})

    L.seed_everything(0)
    n = GLOBAL_BATCH * 8
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, IN, generator=g), torch.randint(0, CLASSES, (n,), generator=g))
    strategy = {"ddp": PruningDDPStrategy(), "fsdp": PruningFSDPStrategy(shard_modules=[nn.Linear])}[strategy_name]
    model = MLPClassifier(input_dim=IN, hidden=HIDDEN, num_classes=CLASSES, optimizer="adamw", scheduler="none")
    cutter = Cutter()
    trainer = L.Trainer(max_steps=8, accelerator="cpu", devices=WORLD, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[cutter])
    trainer.fit(model, DataLoader(data, batch_size=GLOBAL_BATCH // WORLD))
    if trainer.global_rank == 0:
        Path(result).write_text(json.dumps({"events": cutter.events,
                                            "hashes_equal": all(len(set(h)) == 1 for h in strategy.surgery_hashes)}))


# ---------------------------------------------------------------------------------------------- report
def stats(xs: list[float]) -> tuple[float, float]:
    return min(xs), statistics.median(xs)


def report(info: dict[str, Any], surgery: dict[str, Any], args: argparse.Namespace) -> str:
    w = info["widths"]
    t = info["times"]
    lines = [f"MLP {IN}-{'-'.join(map(str, HIDDEN))}-{CLASSES} dense vs shrunk to {w['shrunk']} "
             f"({info['params']['shrunk'] / info['params']['dense']:.3f} of the parameters); 2 ranks, gloo, "
             f"1 thread each, global batch {GLOBAL_BATCH}, AdamW; {args.repeats} repeats x {args.steps} steps, "
             f"ms per step (slower rank)", "",
             "| strategy | dense min | dense median | shrunk min | shrunk median | ratio (min) | ratio (median) |",
             "|---|---|---|---|---|---|---|"]
    for s in ("ddp", "fsdp"):
        (dmin, dmed), (smin, smed) = stats(t[f"{s}/dense"]), stats(t[f"{s}/shrunk"])
        label = {"ddp": "DDP", "fsdp": "FSDP2 (fully_shard)"}[s]
        lines.append(f"| {label} | {1e3 * dmin:.1f} | {1e3 * dmed:.1f} | {1e3 * smin:.1f} | {1e3 * smed:.1f} | "
                     f"{smin / dmin:.3f} | {smed / dmed:.3f} |")
    lines += ["", "Bytes per step and rank (MB = 1e6 bytes)", "",
              "| collective | dense | shrunk | ratio |", "|---|---|---|---|"]
    dd, sd = info["ddp_bytes"]["dense"], info["ddp_bytes"]["shrunk"]
    if len(set(dd)) != 1 or len(set(sd)) != 1:
        lines.append(f"(DDP bytes differed between steps: dense {dd}, shrunk {sd}; the last step's shown)")
    lines.append(f"| DDP all-reduce (gradient buckets, comm hook) | {dd[-1] / 1e6:.3f} | {sd[-1] / 1e6:.3f} | "
                 f"{sd[-1] / dd[-1]:.3f} |")
    fd, fs = info["fsdp_bytes"]["dense"], info["fsdp_bytes"]["shrunk"]
    for key, label in (("all_gather", "FSDP2 all-gather (params, fwd + bwd)"),
                       ("reduce_scatter", "FSDP2 reduce-scatter (grads)")):
        a, b = fd[f"computed_{key}"], fs[f"computed_{key}"]
        check = "counted = computed" if (fd[f"counted_{key}"], fs[f"counted_{key}"]) == (a, b) else (
            f"counted {fd[f'counted_{key}'] / 1e6:.3f} / {fs[f'counted_{key}'] / 1e6:.3f}")
        lines.append(f"| {label} ({check}) | {a / 1e6:.3f} | {b / 1e6:.3f} | {b / a:.3f} |")
    if surgery:
        lines += ["", "One surgery event through Lightning (rank 0; unwrap + cut + agree + re-wrap + verify)", "",
                  "| strategy | cut | event (ms) | of which re-wrap (ms) | event / dense step (part 1 median) |",
                  "|---|---|---|---|---|"]
        for s, res in surgery.items():
            dense_step = statistics.median(t[f"{s.removeprefix('ctprune_')}/dense"])
            prev = "1024/1024"
            for e in res["events"]:
                lines.append(f"| {s} | {prev} -> {e['widths']} | {1e3 * e['total_s']:.1f} | {1e3 * e['rewrap_s']:.1f} |"
                             f" {e['total_s'] / dense_step:.2f} |")
                prev = e["widths"]
            ev = [e["total_s"] for e in res["events"]]
            lines.append(f"| {s} | min / median of {len(ev)} | {1e3 * min(ev):.1f} / {1e3 * statistics.median(ev):.1f} |"
                         f" ranks identical after each: {res['hashes_equal']} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=424, help="hidden width of the shrunk model")
    ap.add_argument("--steps", type=int, default=20, help="steps per variant and repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-lightning", action="store_true", help="skip the surgery-event timing")
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    ap.add_argument("--lightning-surgery", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lightning_surgery:  # a Lightning child (its rank 1 re-runs this same command line)
        lightning_surgery(args.lightning_surgery, args.result)
        return
    if args.repeats < 1 or args.steps < 1 or not 1 <= args.width <= min(HIDDEN):
        ap.error("need --repeats >= 1, --steps >= 1 and 1 <= --width <= 1024")
    with tempfile.TemporaryDirectory() as tmp:
        result = str(Path(tmp) / "bench.json")
        try:
            mp.spawn(bench_rank, args=(free_port(), args, result), nprocs=WORLD, join=True)
        except mp.ProcessExitedException as err:  # a rank killed at exit (gloo teardown) after all was measured
            if not Path(result).exists():
                raise
            print(f"(warning: {err}; the results were complete)", file=sys.stderr)
        info = json.loads(Path(result).read_text())
        surgery: dict[str, Any] = {}
        if not args.no_lightning:
            for s in ("ddp", "fsdp"):
                out = str(Path(tmp) / f"surgery_{s}.json")
                env = os.environ | {"MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore"}
                subprocess.run([sys.executable, __file__, "--lightning-surgery", s, "--result", out],
                               check=True, env=env, stdout=subprocess.DEVNULL)
                surgery[f"ctprune_{s}"] = json.loads(Path(out).read_text())
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": info, "surgery": surgery, "args": vars(args)}, indent=1))
    print(report(info, surgery, args))


if __name__ == "__main__":
    main()
