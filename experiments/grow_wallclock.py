"""Wall-clock of one growth event vs one cut event of the same size (``ControlLoop.apply_``), with AdamW state, on
CPU: every group cut to half its units, then grown back by as many. ``--model mlp``: the 784-1024-1024-10 MLP;
``--model gpt``: the suite's CPU-scale char-GPT (4 layers, 4 heads, 128 wide, block 64: heads and MLP widths).

    PYTHONPATH=. python experiments/grow_wallclock.py [--model mlp|gpt] [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ctprune_lightning.controllers import build_controller
from ctprune_lightning.importance import build_importance
from ctprune_lightning.loop import ControlLoop, Plan
from ctprune_lightning.models import GPTLanguageModel, MLPClassifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "mlp":
        model = MLPClassifier()
        batch = (torch.randn(64, 784), torch.randint(0, 10, (64,)))
        example = batch[0]
    else:
        model = GPTLanguageModel(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
        x = torch.randint(0, 65, (32, 64))
        batch, example = (x, torch.roll(x, -1, 1)), x
    loop = ControlLoop(build_controller("lqr", 0.1), build_importance("magnitude"), 0.1, min_width=1)
    loop.discover(model, example)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.training_step(batch, 0).backward()
    opt.step()  # Adam moments exist: both surgeries swap optimizer slots
    dense = loop.widths(model)
    names = list(dense)
    cut_t, grow_t = [], []
    for _ in range(args.reps):
        half = {n: list(range(0, w, 2)) for n, w in dense.items()}
        plan = Plan(step=0, widths={n: len(k) for n, k in half.items()}, keep=half)
        t = time.perf_counter()
        loop.apply_(model, plan, [opt])
        cut_t.append(time.perf_counter() - t)
        plan = Plan(step=1, widths=dict(dense), grow={n: w - len(half[n]) for n, w in dense.items()})
        t = time.perf_counter()
        loop.apply_(model, plan, [opt])
        grow_t.append(time.perf_counter() - t)
    assert loop.widths(model) == dense
    for what, ts in (("cut to half", cut_t), ("grow back", grow_t)):
        print(f"{what:16s} median {1e3 * statistics.median(ts):7.1f} ms  min {1e3 * min(ts):7.1f} ms  "
              f"(reps {args.reps}, threads {args.threads}, groups {names})")


if __name__ == "__main__":
    main()
