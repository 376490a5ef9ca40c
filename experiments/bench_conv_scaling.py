"""How a training step's time scales with width, against its FLOPs: is the step compute- or memory-bound?

A width-pruned run can follow its FLOPs only where the step time falls with the FLOPs. This times one bare
training step (forward, backward, AdamW; no Lightning) of the suite's ResNet-20 and MLP at uniform width scales,
and prints time ÷ dense beside FLOPs ÷ dense. FLOPs fall with the square of the scale; a step whose time falls only
in proportion to the scale (activations' memory traffic, not arithmetic) cannot do better than
wall ÷ FLOPs = 1 / scale = 1 / √(FLOPs ÷ dense).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_conv_scaling.py --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from ctprune_lightning.accounting import count_training_flops
from ctprune_lightning.models.resnet import ResNet


def resnet(scale: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    widths = [max(8, round(w * scale / 8) * 8) for w in (16, 32, 64)]
    return ResNet(20, widths, 10, 1), torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))


def mlp(scale: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    h = max(8, round(1024 * scale / 8) * 8)
    net = nn.Sequential(nn.Linear(784, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    return net, torch.randn(256, 784), torch.randint(0, 10, (256,))


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int, channels_last: bool) -> float:
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    times = []
    for i in range(repeats + 3):  # three warm-up steps
        t = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--scales", default="1,0.75,0.5,0.25")
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of {args.repeats} steps")
    print("| model | scale | widths | FLOPs ÷ dense | time ÷ dense | wall ÷ FLOPs | 1 / scale |")
    print("|---|---|---|---|---|---|---|")
    for name, build, layouts in (("ResNet-20", resnet, (False, True)), ("MLP", mlp, (False,))):
        for channels_last in layouts:
            base_flops = base_time = None
            for s in scales:
                torch.manual_seed(0)
                model, x, y = build(s)
                flops = count_training_flops(model, (x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1]))[0]
                t = step_time(model, x, y, args.repeats, channels_last)
                base_flops, base_time = base_flops or flops, base_time or t
                widths = [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                          for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
                label = f"{name}{' (channels_last)' if channels_last else ''}"
                f, w = flops / base_flops, t / base_time
                print(f"| {label} | {s:.2f} | {sorted(set(widths[:-1]))} | {f:.3f} | {w:.3f} ({t * 1e3:.1f} ms) "
                      f"| {w / f:.2f} | {1 / s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
