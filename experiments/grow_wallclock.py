"""Wall-clock of one growth event vs one cut event of the same size (``ControlLoop.apply_``) on the 784-1024-1024-10
MLP with AdamW state, on CPU: both hidden groups 1024 -> 512 (cut) and 512 -> 1024 (growth).

    PYTHONPATH=. python experiments/grow_wallclock.py [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ctprune_lightning.controllers import build_controller
from ctprune_lightning.importance import build_importance
from ctprune_lightning.loop import ControlLoop, Plan
from ctprune_lightning.models import MLPClassifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MLPClassifier()
    loop = ControlLoop(build_controller("lqr", 0.1), build_importance("magnitude"), 0.1)
    batch = (torch.randn(64, 784), torch.randint(0, 10, (64,)))
    loop.discover(model, batch[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.training_step(batch, 0).backward()
    opt.step()  # Adam moments exist: both surgeries swap optimizer slots
    names = [g.name for g in loop.groups]
    cut_t, grow_t = [], []
    for _ in range(args.reps):
        half = {n: list(range(0, 1024, 2)) for n in names}
        plan = Plan(step=0, widths={n: 512 for n in names}, keep=half)
        t = time.perf_counter()
        loop.apply_(model, plan, [opt])
        cut_t.append(time.perf_counter() - t)
        plan = Plan(step=1, widths={n: 1024 for n in names}, grow={n: 512 for n in names})
        t = time.perf_counter()
        loop.apply_(model, plan, [opt])
        grow_t.append(time.perf_counter() - t)
    assert loop.widths(model) == {n: 1024 for n in names}
    for what, ts in (("cut 1024->512", cut_t), ("grow 512->1024", grow_t)):
        print(f"{what:16s} median {1e3 * statistics.median(ts):7.1f} ms  min {1e3 * min(ts):7.1f} ms  "
              f"(reps {args.reps}, threads {args.threads}, groups {names})")


if __name__ == "__main__":
    main()
