"""Which incoming weights should grown units get? A small measurement (CPU, ~1 min).

An MLP (32-128-128-10, AdamW) on 10 overlapping Gaussian classes with 30% random labels (capacity matters:
the training loss is how much the network memorises) trains 150 steps dense, is cut to width 16 in both
hidden groups (magnitude), trains 100 steps, then grows both groups back by 112 units and trains 150 more
steps; the training loss on all samples is reported. Policies for the new units (outgoing weights are zero in all of them, so the outputs
do not change at the moment of growth):

- ``default``: incoming weights drawn like nn.Linear's init, U(±1/sqrt(fan_in)) (GrowInit("default"));
- ``match``: N(0, σ²) with σ the std of the layer's current weights (GrowInit("match"));
- ``restore``: the units' last pruned incoming weights (their rows before the cut);
- ``zero``: zero incoming weights too (the control: new units that never train);
- ``none``: no growth (stays at width 16).

Prints the mean final training loss and accuracy over seeds. Run: ``python experiments/grow_init.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctprune_lightning.surgery import GrowInit, apply_plan_, discover_groups

SEEDS, DIM, CLASSES, N = (0, 1, 2), 32, 10, 2048


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = 0.5 * torch.randn(CLASSES, DIM, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    x = centers[y] + torch.randn(N, DIM, generator=g)
    noisy = torch.rand(N, generator=g) < 0.3
    return x, torch.where(noisy, torch.randint(0, CLASSES, (N,), generator=g), y)


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
          g: torch.Generator) -> tuple[float, float]:
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(0, N, (128,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y)), float((model(x).argmax(1) == y).float().mean())


def run(policy: str, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    x, y = data(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(DIM, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, CLASSES))
    groups, _ = discover_groups(model, x[:4])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train(model, opt, x, y, 150, g)
    keep = {gr.name: model.get_submodule(gr.name).weight.norm(dim=1).argsort(descending=True)[:16].sort().values
            for gr in groups}
    pruned = {n: [i for i in range(128) if i not in set(k.tolist())] for n, k in keep.items()}
    rows = {n: model.get_submodule(n).weight.detach()[pruned[n]].clone() for n in keep}
    apply_plan_(model, groups, keep, [opt])
    train(model, opt, x, y, 100, g)
    if policy == "none":
        return train(model, opt, x, y, 150, g)
    apply_plan_(model, groups, {}, [opt], grow={n: 112 for n in keep},
                init=GrowInit("match" if policy == "match" else "default", seed=seed))
    order = torch.cat([keep["0"], torch.tensor(pruned["0"])])  # group 0's units as the grown layer 2 reads them
    with torch.no_grad():
        for n in keep:
            w = model.get_submodule(n).weight
            if policy == "restore":  # the new units are the pruned ones, in order, with their old incoming rows
                w[16:] = rows[n] if n == "0" else rows[n][:, order]
            elif policy == "zero":
                w[16:] = 0
                model.get_submodule(n).bias[16:] = 0
    return train(model, opt, x, y, 150, g)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for policy in ("default", "match", "restore", "zero", "none"):
        res = torch.tensor([run(policy, s) for s in SEEDS])
        print(f"{policy:8s} loss {res[:, 0].mean():.4f} ± {res[:, 0].std():.4f}   acc {res[:, 1].mean():.4f}")
