"""Step time of a compiled MLP after N surgeries vs a freshly compiled one of the same widths (CPU).

    python experiments/bench_compile.py --surgeries 20 --backend inductor     # writes nothing, prints a table

Variants, all at the final widths and timed side by side (median of ``--repeats`` rounds of ``--steps`` steps):
  reset    compiled once, shrunk ``--surgeries`` times with CompileWatch.after_surgery after each (our path)
  noreset  the same surgeries without the reset: past Dynamo's recompile_limit (8) the frame runs eagerly
  dynamic  no reset, ``torch._dynamo.config.force_parameter_static_shapes=False`` (what Dynamo's guard message
           suggests): on torch 2.13 / aot_eager it still recompiled once per width (12 compilations for 5 surgeries)
  fresh    a new model of the final widths, compiled once
  eager    the final model, not compiled
One training step = forward, cross-entropy, backward, AdamW step; batch ``--batch``, MLP 784-h-h-10.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo
from torch import nn

from ctprune_lightning.compiled import CompileWatch, compile_module_, eager


class MLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def shrink_(model: MLP, width: int) -> None:
    """Keep the first ``width`` hidden units of both layers (new Linear modules, weights sliced)."""
    old = model.net
    new = [nn.Linear(784, width), nn.Linear(width, width), nn.Linear(width, 10)]
    with torch.no_grad():
        new[0].weight.copy_(old[0].weight[:width]); new[0].bias.copy_(old[0].bias[:width])
        new[1].weight.copy_(old[2].weight[:width, :width]); new[1].bias.copy_(old[2].bias[:width])
        new[2].weight.copy_(old[4].weight[:, :width]); new[2].bias.copy_(old[4].bias)
    model.net[0], model.net[2], model.net[4] = new


def steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int) -> float:
    """Seconds for ``n`` training steps."""
    start = time.perf_counter()
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - start


def widths(dense: int, final: int, surgeries: int) -> list[int]:
    return [round(dense - (dense - final) * (k + 1) / surgeries) for k in range(surgeries)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--surgeries", type=int, default=20)
    ap.add_argument("--dense", type=int, default=1024)
    ap.add_argument("--final", type=int, default=400)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="reset,noreset,dynamic,fresh,eager")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 784), torch.randint(0, 10, (args.batch,))
    plan = widths(args.dense, args.final, args.surgeries)

    models: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    info: dict[str, str] = {}
    chosen = args.variants.split(",")
    for name, reset in (("reset", True), ("noreset", False), ("dynamic", False)):
        if name not in chosen:
            continue
        torch._dynamo.reset()
        static = torch._dynamo.config.force_parameter_static_shapes
        torch._dynamo.config.force_parameter_static_shapes = name != "dynamic"
        model = compile_module_(MLP(args.dense), backend=args.backend)
        watch = CompileWatch().install()
        start = time.perf_counter()
        for width in plan:
            steps(model, torch.optim.AdamW(model.parameters()), x, y, 2)
            shrink_(model, width)
            if reset:
                watch.after_surgery(model)
        opt = torch.optim.AdamW(model.parameters())
        steps(model, opt, x, y, 3)  # the final architecture's compile
        watch.close()
        torch._dynamo.config.force_parameter_static_shapes = static
        s = watch.summary()
        info[name] = (f"{s['compile_count']} compilations in {s['compile_time_s']:.1f} s; "
                      f"{args.surgeries} surgeries took {time.perf_counter() - start:.1f} s in all")
        models[name] = (model, opt)
    if "fresh" in chosen:
        fresh = compile_module_(MLP(args.final), backend=args.backend)
        opt = torch.optim.AdamW(fresh.parameters())
        steps(fresh, opt, x, y, 3)
        models["fresh"] = (fresh, opt)
    if "eager" in chosen:
        eager_model = MLP(args.final)
        models["eager"] = (eager_model, torch.optim.AdamW(eager_model.parameters()))

    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):  # interleaved rounds: the machine's noise hits every variant alike
        for name, (model, opt) in models.items():
            times[name].append(steps(model, opt, x, y, args.steps) / args.steps)
    ref = statistics.median(times["fresh" if "fresh" in times else next(iter(times))])
    print(f"MLP 784-{args.dense}-{args.dense}-10 -> {args.final} in {args.surgeries} surgeries, batch {args.batch}, "
          f"backend {args.backend}, {args.threads} thread(s), median of {args.repeats} x {args.steps} steps")
    print(f"{'variant':<8} {'ms/step':>8} {'vs fresh':>9}  notes")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<8} {1e3 * med:8.2f} {med / ref:9.2f}  {info.get(name, '')}")
    for name in ("reset", "dynamic"):
        if name in models:
            model = models[name][0]
            with eager(model):
                eager_out = model(x)
            torch.testing.assert_close(model(x), eager_out, rtol=1e-4, atol=1e-4)
            print(f"{name}: compiled output matches eager after the last surgery")


if __name__ == "__main__":
    main()
