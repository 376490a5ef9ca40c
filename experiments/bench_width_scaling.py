"""How a bare training step's time scales with width, against its FLOPs: can a pruned run follow its FLOPs at all?

A width-pruned run can follow its FLOPs only where the step time falls with the FLOPs. This builds the suite's MLP,
ResNet-20 and char-GPT (their CPU-scale sizes), cuts every prunable group to a share of its dense width with the
product's own surgery (``discover_groups`` + ``apply_plan_``), and times one bare training step (forward, backward,
AdamW; no Lightning, no callback) at each share, printing time ÷ dense beside FLOPs ÷ dense. A step whose time falls
only in proportion to the width (the activations' memory traffic, not arithmetic; or a fixed per-op cost) cannot do
better than wall ÷ FLOPs = 1 / √(FLOPs ÷ dense) where the FLOPs fall with the square of the width.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_width_scaling.py --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctprune_lightning.accounting import count_training_flops
from ctprune_lightning.models import GPTLanguageModel, MLPClassifier, ResNetClassifier
from ctprune_lightning.planning import group_floor
from ctprune_lightning.surgery import apply_plan_, discover_groups

LossFn = Callable[[nn.Module, Any], Tensor]


def classify(model: nn.Module, batch: Any) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def language(model: nn.Module, batch: Any) -> Tensor:
    return model.compute_loss(batch)


def tasks(channels_last: bool) -> dict[str, tuple[Callable[[], nn.Module], Any, LossFn]]:
    """name -> (build, batch, loss) at the evidence suite's CPU scale (``experiments/suite.sh``)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {
        "MLP": (lambda: MLPClassifier(784, (1024, 1024), 10),
                (torch.randn(256, 784), torch.randint(0, 10, (256,))), classify),
        f"ResNet-20{' (channels_last)' if channels_last else ''}": (
            lambda: ResNetClassifier(20, (16, 32, 64), 10, 1, channels_last=channels_last),
            (torch.randn(64, 1, 28, 28).contiguous(memory_format=fmt), torch.randint(0, 10, (64,))), classify),
        "char-GPT": (lambda: GPTLanguageModel(65, 64, 4, 4, 128),
                     (torch.randint(0, 65, (32, 64)), torch.randint(0, 65, (32, 64))), language),
    }


def cut_to(model: nn.Module, example: Any, share: float) -> dict[str, int]:
    """Cut every group to ``share`` of its width (rounded down to its step, at least its floor); the widths."""
    groups, _ = discover_groups(model, example, min_width=1)
    plan = {}
    for g in groups:
        w, step = g.width(model), g.round_to or 1
        new = max(group_floor(g, 1), int(w * share) // step * step, step)
        if new < w:
            plan[g.name] = torch.arange(new)
    apply_plan_(model, groups, plan)
    return {g.name: g.width(model) for g in groups}


def step_time(model: nn.Module, batch: Any, loss_fn: LossFn, repeats: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    times = []
    for i in range(repeats + 3):  # three warm-up steps
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shares", default="1,0.75,0.5,0.25")
    args = parser.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of {args.repeats} steps")
    print("| model | width share | widths | FLOPs ÷ dense | time ÷ dense | wall ÷ FLOPs | 1 / √(FLOPs ÷ dense) |")
    print("|---|---|---|---|---|---|---|")
    runs = {**tasks(False), **{k: v for k, v in tasks(True).items() if "ResNet" in k}}
    for name, (build, batch, loss_fn) in runs.items():
        base_flops = base_time = None
        for share in shares:
            torch.manual_seed(0)
            model = build()
            example = batch[0][:2]
            widths = cut_to(model, example, share) if share < 1 else {}
            flops = count_training_flops(model, batch, loss_fn)[0]
            t = step_time(model, batch, loss_fn, args.repeats)
            base_flops, base_time = base_flops or flops, base_time or t
            f, w = flops / base_flops, t / base_time
            shown = sorted(set(widths.values())) if widths else "dense"
            print(f"| {name} | {share:.2f} | {shown} | {f:.3f} | {w:.3f} ({t * 1e3:.1f} ms) | {w / f:.2f} "
                  f"| {f ** -0.5:.2f} |", flush=True)


if __name__ == "__main__":
    main()
