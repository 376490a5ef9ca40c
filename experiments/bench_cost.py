"""Issue 19, the measured cost model: what it costs to measure, what its frontier drops, and how close its
modelled step time is to a measured one when every group is cut at once.

    .venv/bin/python experiments/bench_cost.py                        # MLP and ResNet-20, 1 thread, 3 s budget
    .venv/bin/python experiments/bench_cost.py --models mlp --max-seconds 1 --repeats 5

Per model: :func:`~ctprune_lightning.cost.measure_cost` on one training batch (reference MLP 784-1024-1024-10,
batch 256; ResNet-20 on 28x28, batch 128) with ``round_to=8``; then, at each of a few levels, every group at
the frontier width nearest that share of its dense width, the modelled time next to a measured training step
(forward + backward, median of ``--repeats``, the model cut temporarily with ``read_cut``) and the FLOPs ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ctprune_lightning.accounting import count_training_flops
from ctprune_lightning.cost import StepTimer, measure_cost
from ctprune_lightning.models import MLPClassifier, ResNetClassifier
from ctprune_lightning.planning import predict_flops
from ctprune_lightning.surgery import discover_groups
from ctprune_lightning.trial import read_cut


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    if name == "mlp":
        return MLPClassifier(hidden=(1024, 1024)), (torch.randn(256, 784), torch.randint(0, 10, (256,)))
    return ResNetClassifier(depth=20), (torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet")
    parser.add_argument("--max-seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--levels", default="0.75,0.5,0.35")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        model, batch = build(name)
        groups, _ = discover_groups(model, batch[0], min_width=8, round_to=8)
        t0 = time.perf_counter()
        cost = measure_cost(model, groups, batch, loss_fn, min_width=8, round_to=8, max_seconds=args.max_seconds,
                            repeats=args.repeats, cache={})
        wall = time.perf_counter() - t0
        d = cost.describe()
        dropped = {n: g["dropped"] for n, g in d["groups"].items() if g["dropped"]}
        measured = sum(len(g["measured"]) - 1 for g in d["groups"].values()) + 1
        print(f"\n## {name}: {len(groups)} groups, dense step {1e3 * cost.dense_time:.1f} ms; measured {measured} "
              f"widths in {wall:.2f} s (budget {args.max_seconds} s, complete={cost.complete})")
        print(f"dropped (slower than a wider width): {dropped or 'none'}")
        total, per_module = count_training_flops(model, batch, loss_fn)
        dense = {g.name: g.width(model) for g in groups}
        timer = StepTimer(batch, loss_fn, warmup=1, repeats=args.repeats)
        real_dense = timer(model)
        print("| level | FLOPs ÷ dense | modelled time ÷ dense | measured time ÷ dense | modelled ÷ measured |")
        print("|---|---|---|---|---|")
        for level in (float(x) for x in args.levels.split(",")):
            widths = {n: min(cost.frontier(n), key=lambda w, n=n: abs(w - level * dense[n])) for n in dense}
            flops = predict_flops(dense, widths, per_module, total, groups) / total
            modelled = cost.fraction(widths)
            real = read_cut(model, groups, {n: range(w) for n, w in widths.items()}, timer) / real_dense
            print(f"| {level:.2f} | {flops:.3f} | {modelled:.3f} | {real:.3f} | {modelled / real:.2f} |")


if __name__ == "__main__":
    main()
