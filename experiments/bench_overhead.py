"""Issue 11, "Wall-clock must follow FLOPs": what the callback costs per step, what one surgery costs, and
whether step time follows training FLOPs as the networks shrink.

    .venv/bin/python experiments/bench_overhead.py                      # all three sections, 1 thread, 5 repeats
    .venv/bin/python experiments/bench_overhead.py --sections overhead --repeats 7
    .venv/bin/python experiments/bench_overhead.py --sections width --models mlp,gpt --threads 2

Sections (every comparison runs its variants side by side in this one process, interleaved round-robin
with the order rotated each repeat; each table gives min and median over the repeats, and ratios):

1. ``overhead`` -- the reference MLP (784-1024-1024-10, batch 256, AdamW) trained through a Lightning
   ``Trainer`` on synthetic Fashion-MNIST-shaped data (``SyntheticDataModule``, logger=False, no
   checkpointing, no validation): no callback vs ``ControlPruning(controller="none")`` vs
   ``ControlPruning(controller="lqr", start_step=10**9)`` (attached, waiting for its start step) vs an lqr
   callback tracking its trajectory importance every step with no control interval in the window (what
   the cutting phase costs between decisions), plus a bare PyTorch loop over the same in-memory batches. Step time = wall-clock between
   consecutive ``on_train_batch_start`` hooks (data fetch, every hook, logging, optimizer), warm-up excluded;
   the measured window spans whole control intervals (every 20 steps).
2. ``surgery`` -- per model: build, ``discover_groups``, one AdamW step (so the optimizer has state), then
   time ``apply_plan_`` of a 30% width cut of every group (fresh model each repeat), and the FLOP recount
   of the new architecture (``count_training_flops``) that the loop does once per new architecture.
3b. ``align`` -- ResNet-20 at stage channel counts that are, or are not, multiples of 8 (the SIMD width
   of fp32 AVX2 convolution kernels): is a width-4 rounding a wall-clock trap on CPU?
3. ``width`` -- per model: bare PyTorch training step (forward + backward + AdamW) at 100/75/50/35/25% of
   every group's dense width (shrunk with the real surgery) next to the training-FLOPs ratio.

Set ``--threads`` to the number of cores you own: on a shared 2-core machine, 2 intra-op threads wait on
the busy core and step times get 2-8x slower and far noisier (see bench_overhead.md).
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("mlp", "resnet", "gpt", "lru")
FRACTIONS = (1.0, 0.75, 0.5, 0.35, 0.25)


# ------------------------------------------------------------------------------------------ helpers
def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    if hasattr(model, "compute_loss"):
        return model.compute_loss(batch)
    x, y = batch
    return F.cross_entropy(model(x), y)


def stats(values: list[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def interleaved(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every variant once per repeat, order rotated each repeat; each call returns one measurement."""
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            gc.collect()
            out[n].append(variants[n]())
    return out


def build(name: str, batch: int | None = None, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A model (the experiments' configs) and one random batch of its data shape."""
    from ctprune_lightning.models import GPTLanguageModel, LRUClassifier, MLPClassifier, ResNetClassifier

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":  # conf/model/mlp.yaml on Fashion-MNIST
        b = batch or 256
        model = MLPClassifier(input_dim=784, hidden=(1024, 1024), num_classes=10)
        data = (torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g))
    elif name == "resnet":  # conf/experiment/resnet_fmnist.yaml (batch 256 there)
        b = batch or 64
        model = ResNetClassifier(depth=20, widths=(16, 32, 64), num_classes=10)
        data = (torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g))
    elif name == "gpt":  # conf/experiment/gpt_shakespeare.yaml: 4 x 4 heads x 192, context 128 (batch 64 there)
        b = batch or 32
        model = GPTLanguageModel(vocab_size=84, block_size=128, n_layer=4, n_head=4, n_embd=192)
        data = (torch.randint(0, 84, (b, 128), generator=g), torch.randint(0, 84, (b, 128), generator=g))
    elif name == "lru":  # conf/experiment/lru_sfmnist.yaml: H=64, N=128, 2 blocks, 49 steps, batch 64
        b = batch or 64
        model = LRUClassifier(input_dim=49, d_input=1, num_classes=10, d_model=64, d_state=128, num_blocks=2)
        data = (torch.randn(b, 49, 1, generator=g), torch.randint(0, 10, (b,), generator=g))
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return model, data


def discover(model: nn.Module, name: str):
    from ctprune_lightning.surgery.groups import discover_groups

    kwargs = {"round_to": 1}
    groups, _ = discover_groups(model, model.example_input_array, min_width=1, **kwargs)
    return groups


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Any) -> None:
    opt.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    opt.step()


def keep_plan(model: nn.Module, groups, fraction: float) -> dict[str, torch.Tensor]:
    """Every group down to round(fraction x its width) units (at least 1); SSM states keep the first r
    (the largest Hankel singular values after balancing), other units the first r indices."""
    plan = {}
    for g in groups:
        w = g.width(model)
        r = max(1, int(round(fraction * w)))
        if r < w:
            plan[g.name] = torch.arange(r)
    return plan


def widths_str(model: nn.Module, groups) -> str:
    ws = [g.width(model) for g in groups]
    distinct = sorted(set(ws), reverse=True)
    return "/".join(str(w) for w in distinct[:4]) + ("/..." if len(distinct) > 4 else "")


# -------------------------------------------------------------------------- 1. callback overhead
def section_overhead(args: argparse.Namespace) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from ctprune_lightning import ControlPruning
    from ctprune_lightning.data import SyntheticDataModule
    from ctprune_lightning.models import MLPClassifier

    warm, n = args.warmup, args.steps  # measure steps [warm, warm + n)

    class StepClock(Callback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self.t.append(time.perf_counter())

        def per_step(self) -> float:
            return (self.t[warm + n] - self.t[warm]) / n

    dm = SyntheticDataModule(num_samples=256 * (warm + n + 1), input_shape=(1, 28, 28), num_classes=10,
                             batch_size=256, seed=0)
    dm.setup("fit")

    def lightning_run(callback_factory: Callable[[], list[Any]]) -> Callable[[], float]:
        def run() -> float:
            torch.manual_seed(0)
            model = MLPClassifier(input_dim=784, hidden=(1024, 1024), num_classes=10)
            clock = StepClock()
            trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=warm + n + 1, max_epochs=1, logger=False,
                                enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                                enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[clock, *callback_factory()])
            trainer.fit(model, datamodule=dm)
            return clock.per_step()
        return run

    def bare_loop() -> float:
        torch.manual_seed(0)
        model = MLPClassifier(input_dim=784, hidden=(1024, 1024), num_classes=10)
        opt = adamw(model)
        x_all, y_all = dm.data_train.tensors
        perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
        t = []
        for i in range(warm + n + 1):
            t.append(time.perf_counter())
            idx = perm[i * 256:(i + 1) * 256]
            x, y = x_all[idx], y_all[idx]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return (t[warm + n] - t[warm]) / n

    variants = {
        "bare PyTorch loop": bare_loop,
        "Lightning, no callback": lightning_run(lambda: []),
        "+ ControlPruning(controller='none')": lightning_run(lambda: [ControlPruning(controller="none")]),
        "+ ControlPruning('lqr', start_step beyond run)": lightning_run(
            lambda: [ControlPruning(controller="lqr", target=0.25, round_to=8, start_step=10**9)]),
        "+ ControlPruning('lqr') tracking trajectory, no interval in window": lightning_run(
            lambda: [ControlPruning(controller="lqr", target=0.25, round_to=8, every_n_steps=1000)]),
    }
    res = interleaved(variants, args.repeats)
    base = statistics.median(res["Lightning, no callback"])
    base_min = min(res["Lightning, no callback"])
    print(f"\n## 1. Per-step overhead, MLP 784-1024-1024-10, batch 256, AdamW ({args.repeats} repeats x {n} steps "
          f"after {warm} warm-up, {torch.get_num_threads()} thread(s))\n")
    print("| variant | ms/step min | ms/step median | ratio vs Lightning no-callback (min / median) |")
    print("|---|---|---|---|")
    for name, v in res.items():
        lo, med = stats(v)
        print(f"| {name} | {lo * 1e3:.2f} | {med * 1e3:.2f} | {lo / base_min:.3f} / {med / base:.3f} |")
    # paired ratios: each repeat's callback run over the same repeat's no-callback run
    print("\nPaired per-repeat ratios (variant / Lightning no-callback, same repeat):")
    for name, v in res.items():
        r = [a / b for a, b in zip(v, res["Lightning, no callback"])]
        print(f"  {name:<48} min {min(r):.3f}  median {statistics.median(r):.3f}  all {[round(x, 3) for x in r]}")


# ------------------------------------------------------------------------------------ 1b. logging
def section_logging(args: argparse.Namespace) -> None:
    """Lightning's per-step cost at a pruned width: a bare loop, a module that logs nothing, the experiments'
    classifier (``train/loss`` on the steps the loggers write, ``train/acc`` at the epoch's end) and the same
    logging on every step (what the classifier did before)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from ctprune_lightning.data import SyntheticDataModule
    from ctprune_lightning.models import MLPClassifier

    warm, n, hidden = args.warmup, 3 * args.steps, (256, 256)

    class StepClock(Callback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self.t.append(time.perf_counter())

    class Silent(MLPClassifier):
        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            return F.cross_entropy(self(batch[0]), batch[1])

    class EveryStep(MLPClassifier):
        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            logits = self(batch[0])
            loss = F.cross_entropy(logits, batch[1])
            self.train_acc.update(logits.detach(), batch[1])
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
            return loss

        def on_train_epoch_end(self) -> None:
            pass

    dm = SyntheticDataModule(num_samples=256 * (warm + n + 2) * 5 // 4, input_shape=(1, 28, 28), num_classes=10,
                             batch_size=256, seed=0)
    dm.setup("fit")

    def fit(cls: type) -> Callable[[], float]:
        def run() -> float:
            torch.manual_seed(0)
            clock = StepClock()
            L.Trainer(accelerator="cpu", devices=1, max_steps=warm + n + 1, max_epochs=1, logger=False,
                      enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                      enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=20,
                      callbacks=[clock]).fit(cls(input_dim=784, hidden=hidden, num_classes=10), datamodule=dm)
            return (clock.t[warm + n] - clock.t[warm]) / n
        return run

    def bare() -> float:
        torch.manual_seed(0)
        model = MLPClassifier(input_dim=784, hidden=hidden, num_classes=10)
        opt = adamw(model)
        x_all, y_all = dm.data_train.tensors
        t = []
        for i in range(warm + n + 1):
            t.append(time.perf_counter())
            train_step(model, opt, (x_all[i * 256:(i + 1) * 256], y_all[i * 256:(i + 1) * 256]))
        return (t[warm + n] - t[warm]) / n

    variants = {"bare PyTorch loop": bare, "Lightning, module logs nothing": fit(Silent),
                "Lightning, the experiments' classifier": fit(MLPClassifier),
                "Lightning, self.log on every step (before)": fit(EveryStep)}
    res = interleaved(variants, args.repeats)
    base = statistics.median(res["Lightning, module logs nothing"])
    print(f"\n## 1b. Logging, MLP 784-256-256-10 (a pruned width), batch 256, AdamW ({args.repeats} repeats x {n} "
          f"steps after {warm} warm-up, log_every_n_steps=20, {torch.get_num_threads()} thread(s))\n")
    print("| variant | ms/step min | ms/step median | vs the module that logs nothing (median) |")
    print("|---|---|---|---|")
    for name, v in res.items():
        lo, med = stats(v)
        print(f"| {name} | {lo * 1e3:.2f} | {med * 1e3:.2f} | {med / base:.3f} |")


# ------------------------------------------------------------------------------------ 2. surgery
def section_surgery(args: argparse.Namespace) -> None:
    from ctprune_lightning.accounting import count_training_flops
    from ctprune_lightning.surgery.groups import apply_plan_

    print(f"\n## 2. One surgery event (30% of every group's width), {args.repeats} repeats, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("| model | params | groups | widths before -> after | discover_groups (s) | apply_plan_ ms min / median "
          "| FLOP recount ms min / median | train step ms (median) | surgery in steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        t_apply, t_flops, t_step, t_disc = [], [], [], []
        info = ""
        for r in range(args.repeats):
            model, batch = build(name, seed=r)
            t0 = time.perf_counter()
            groups = discover(model, name)
            t_disc.append(time.perf_counter() - t0)
            opt = adamw(model)
            for _ in range(2):
                train_step(model, opt, batch)
            t0 = time.perf_counter()
            for _ in range(3):
                train_step(model, opt, batch)
            t_step.append((time.perf_counter() - t0) / 3)
            plan = keep_plan(model, groups, 0.7)
            before = widths_str(model, groups)
            params = sum(p.numel() for p in model.parameters())
            gc.collect()
            t0 = time.perf_counter()
            apply_plan_(model, groups, plan, [opt])
            t_apply.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            count_training_flops(model, batch, loss_fn)
            t_flops.append(time.perf_counter() - t0)
            train_step(model, opt, batch)  # the optimizer still steps the new Parameters
            info = (f"{params / 1e6:.2f} M | {len(groups)} | {before} -> {widths_str(model, groups)}")
        a, f, s = stats(t_apply), stats(t_flops), statistics.median(t_step)
        print(f"| {name} | {info} | {statistics.median(t_disc):.2f} | {a[0] * 1e3:.1f} / {a[1] * 1e3:.1f} | "
              f"{f[0] * 1e3:.0f} / {f[1] * 1e3:.0f} | {s * 1e3:.1f} | {(a[1] + f[1]) / s:.1f} |")


# -------------------------------------------------------------------------------------- 3. width
def shrunk(name: str, plan_of: Callable[[nn.Module, Any], dict[str, torch.Tensor]]):
    """A fresh model with AdamW state, cut by ``plan_of(model, groups)`` and warmed up:
    ``(model, groups, optimizer, batch, train FLOPs per step)``."""
    from ctprune_lightning.accounting import count_training_flops
    from ctprune_lightning.surgery.groups import apply_plan_

    model, batch = build(name)
    groups = discover(model, name)
    opt = adamw(model)
    train_step(model, opt, batch)
    plan = plan_of(model, groups)
    if plan:
        apply_plan_(model, groups, plan, [opt])
    flops = count_training_flops(model, batch, loss_fn)[0]
    for _ in range(2):
        train_step(model, opt, batch)
    return model, groups, opt, batch, flops


def block_timer(model: nn.Module, opt: torch.optim.Optimizer, batch: Any, steps: Callable[[], int]) -> Callable[[], float]:
    """Seconds per training step over a block of ``steps()`` steps (read at each call)."""
    def run() -> float:
        n = steps()
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(model, opt, batch)
        return (time.perf_counter() - t0) / n
    return run


RESNET_CHANNELS = ((16, 32, 64), (12, 24, 48), (12, 20, 36), (8, 16, 32), (8, 16, 24), (8, 8, 16), (4, 8, 16))
RESNET_STAGE = {16: 0, 32: 1, 64: 2}  # dense width of a ResNet-20 group -> its stage


def section_align(args: argparse.Namespace) -> None:
    """ResNet-20 step time at stage channel counts that are, or are not, multiples of 8."""
    variants: dict[str, Callable[[], float]] = {}
    flops: dict[str, int] = {}
    for channels in RESNET_CHANNELS:
        def plan_of(model, groups, channels=channels):  # noqa: ANN001
            return {g.name: torch.arange(channels[RESNET_STAGE[g.width(model)]]) for g in groups
                    if channels[RESNET_STAGE[g.width(model)]] < g.width(model)}

        model, _, opt, batch, fl = shrunk("resnet", plan_of)
        label = "/".join(map(str, channels))
        flops[label] = fl
        variants[label] = block_timer(model, opt, batch, lambda: 5)
    res = interleaved(variants, args.repeats)
    dense = "16/32/64"
    print(f"\n## 3b. ResNet-20 channel alignment (batch 64, 5 steps per block, {args.repeats} repeats, "
          f"{torch.get_num_threads()} thread(s))\n")
    print("| stage channels | all multiples of 8 | FLOPs ratio | ms/step median | time ratio | time ratio / FLOPs ratio |")
    print("|---|---|---|---|---|---|")
    for label, v in res.items():
        fr, tr = flops[label] / flops[dense], statistics.median(v) / statistics.median(res[dense])
        aligned = all(int(c) % 8 == 0 for c in label.split("/"))
        print(f"| {label} | {'yes' if aligned else 'no'} | {fr:.3f} | {statistics.median(v) * 1e3:.1f} | {tr:.3f} | "
              f"{tr / fr:.2f} |")


def section_width(args: argparse.Namespace) -> None:
    print(f"\n## 3. Step time vs width (bare PyTorch forward + backward + AdamW; {args.repeats} repeats, "
          f"interleaved; {torch.get_num_threads()} thread(s))\n")
    for name in args.models:
        variants: dict[str, Callable[[], float]] = {}
        rows = {}
        for frac in FRACTIONS:
            model, groups, opt, batch, flops = shrunk(name, lambda m, g, frac=frac: keep_plan(m, g, frac))
            rows[frac] = (widths_str(model, groups), flops, sum(p.numel() for p in model.parameters()))
            variants[f"{frac:.2f}"] = block_timer(model, opt, batch, lambda: args.width_steps)
        # steps per timing block: about args.block_s seconds of the dense model
        dense = variants["1.00"]
        args_steps = args.width_steps
        args.width_steps = 1
        t1 = dense()
        args.width_steps = max(2, min(20, round(args.block_s / t1))) if args_steps <= 0 else args_steps
        res = interleaved(variants, args.repeats)
        steps = args.width_steps
        args.width_steps = args_steps
        dense_f = rows[1.0][1]
        d_lo, d_med = stats(res["1.00"])
        print(f"\n### {name} (batch {batch[0].shape[0]}, {steps} steps per timing block)\n")
        print("| width | widths | params | train GFLOPs/step | FLOPs ratio | ms/step min | ms/step median | "
              "time ratio (min / median) | time ratio / FLOPs ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for frac in FRACTIONS:
            w, fl, p = rows[frac]
            lo, med = stats(res[f"{frac:.2f}"])
            fr, tr = fl / dense_f, med / d_med
            print(f"| {frac:.0%} | {w} | {p / 1e6:.3f} M | {fl / 1e9:.3f} | {fr:.3f} | {lo * 1e3:.2f} | {med * 1e3:.2f} | "
                  f"{lo / d_lo:.3f} / {tr:.3f} | {tr / fr:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="overhead,surgery,width", help="comma list of overhead,logging,surgery,width,align")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {','.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see the docstring)")
    p.add_argument("--warmup", type=int, default=5, help="overhead: warm-up steps excluded from each run")
    p.add_argument("--steps", type=int, default=60, help="overhead: measured steps per run (multiple of 20)")
    p.add_argument("--width-steps", type=int, default=0, help="width: steps per timing block (0: ~--block-s of dense)")
    p.add_argument("--block-s", type=float, default=0.6, help="width: seconds of dense steps per timing block")
    args = p.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), repeats {args.repeats}")
    sections = {"overhead": section_overhead, "logging": section_logging, "surgery": section_surgery,
                "width": section_width, "align": section_align}
    for s in args.sections.split(","):
        if s not in sections:
            p.error(f"unknown section {s!r}; choose from {list(sections)}")
        t0 = time.perf_counter()
        sections[s](args)
        print(f"\n(section {s}: {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
