"""Does a sampled trajectory integral pick the same units to cut? (why the tracking runs on every step)

    .venv/bin/python experiments/stride_check.py                      # MLP on Fashion-MNIST, 3 seeds (~3 min)
    .venv/bin/python experiments/stride_check.py --window 10 --strides 1,2,4,8

The 784-1024-1024-10 MLP of the reference run trains with AdamW (lr 1e-3) on Fashion-MNIST. At several
points of training, one control window (``--window`` optimizer steps, the reference run's interval is 20)
is tracked by trajectory importances of every stride side by side, on the same trajectory: stride ``k``
sees only every ``k``-th optimizer step (the tracking would cost ``1/k``; the ranking is the same with or
without the ``k`` weight). At the window's
end each score picks the ``--cut`` least important units of both hidden layers, and the cut is read, with
nothing committed (:func:`~ctprune_lightning.trial.read_cut`), on held-out batches: its log-jump of the loss.
Magnitude and a random pick are the references a stride must stay close to. Printed: the mean jump per
criterion and the overlap of its cut with stride 1's.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from torch import nn

from ctprune_lightning.data import FashionMNISTDataModule
from ctprune_lightning.importance import build_importance
from ctprune_lightning.planning import select_units
from ctprune_lightning.surgery import discover_groups
from ctprune_lightning.trial import read_cut
from ctprune_lightning.models.mlp import build_mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--strides", default="1,2,4,8")
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--at", default="20,200,600", help="the steps the windows start at")
    ap.add_argument("--cut", type=float, default=0.3, help="share of each group's units cut")
    args = ap.parse_args()
    torch.set_num_threads(1)
    strides = [int(s) for s in args.strides.split(",")]
    starts = [int(s) for s in args.at.split(",")]
    dm = FashionMNISTDataModule(batch_size=256, seed=0)
    dm.setup("fit")
    held = [b for _, b in zip(range(4), dm.val_dataloader())]
    jumps: dict[str, list[float]] = {}
    overlap: dict[str, list[float]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        torch.manual_seed(seed)
        model = build_mlp(784, (1024, 1024), 10)
        groups, _ = discover_groups(model, held[0][0][:2])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        loader = iter(dm.train_dataloader())
        loss_of = lambda m: statistics.fmean(float(nn.functional.cross_entropy(m(x), y).detach()) for x, y in held)  # noqa: E731
        step = 0
        for start in starts:
            imps = {k: build_importance("trajectory") for k in strides}
            for imp in imps.values():
                imp.attach(model, groups)
            while step < start + args.window:
                try:
                    x, y = next(loader)
                except StopIteration:
                    loader = iter(dm.train_dataloader())
                    x, y = next(loader)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                sampled = [imp for k, imp in imps.items() if step >= start and (step - start) % k == 0]
                for imp in sampled:
                    imp.before_optimizer_step(model)
                opt.step()
                for imp in sampled:
                    imp.after_optimizer_step(model)
                step += 1
            scores = {f"stride {k}": {g.name: imp.scores(model, g) for g in groups} for k, imp in imps.items()}
            gen = torch.Generator().manual_seed(seed * 1000 + start)
            scores["magnitude"] = {g.name: build_importance("magnitude").scores(model, g) for g in groups}
            scores["random"] = {g.name: torch.rand(g.width(model), generator=gen) for g in groups}
            base = loss_of(model)
            ref = None
            for name, s in scores.items():
                keep = {g.name: select_units(s[g.name], g.width(model) - round(args.cut * g.width(model))).tolist()
                        for g in groups}
                kept = {n: set(v) for n, v in keep.items()}
                ref = ref or kept
                cut_ref = sum(len(set(range(g.width(model))) - ref[g.name]) for g in groups)
                same = sum(len((set(range(g.width(model))) - ref[g.name]) - kept[g.name]) for g in groups)
                with torch.no_grad():
                    jumps.setdefault(name, []).append(math.log(read_cut(model, groups, keep, loss_of) / base))
                overlap.setdefault(name, []).append(same / cut_ref)
            print(f"seed {seed} window at step {start}: loss {base:.4f}, jumps "
                  + ", ".join(f"{n} {jumps[n][-1]:+.4f}" for n in scores), flush=True)
    print(f"\n{len(jumps['random'])} windows of {args.window} steps, cut {args.cut:.0%} of each group\n")
    print("| criterion | mean log-jump of the cut | median | overlap with stride 1's cut |")
    print("|---|---|---|---|")
    for name in jumps:
        print(f"| {name} | {statistics.fmean(jumps[name]):+.4f} | {statistics.median(jumps[name]):+.4f} "
              f"| {statistics.fmean(overlap[name]):.2f} |")


if __name__ == "__main__":
    main()
