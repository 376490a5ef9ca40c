"""torch.compile across surgeries: no recompile-limit fallback, no fullgraph error, outputs equal eager.

CPU, a tiny MLP, ``backend="aot_eager"`` (Dynamo + AOTAutograd without inductor's C++ codegen: the
same guards and recompiles, seconds instead of minutes on two cores).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch._dynamo
from torch import nn

from ctprune_lightning import ControlPruning
from ctprune_lightning.compiled import CompileWatch, compile_module_, eager, is_compiled, watching
from ctprune_lightning.data import SyntheticDataModule
from ctprune_lightning.models import MLPClassifier

SURGERIES = 12  # more than Dynamo's default recompile_limit (8 per frame)


class TinyMLP(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def shrink_(model: TinyMLP, width: int) -> None:
    """A surgery: new, narrower Linear layers (the first ``width`` units kept)."""
    old = model.net
    new = [nn.Linear(16, width), nn.Linear(width, width), nn.Linear(width, 4)]
    with torch.no_grad():
        new[0].weight.copy_(old[0].weight[:width]); new[0].bias.copy_(old[0].bias[:width])
        new[1].weight.copy_(old[2].weight[:width, :width]); new[1].bias.copy_(old[2].bias[:width])
        new[2].weight.copy_(old[4].weight[:, :width]); new[2].bias.copy_(old[4].bias)
    model.net[0], model.net[2], model.net[4] = new


def run_surgeries(model: TinyMLP, watch: CompileWatch | None) -> None:
    x = torch.randn(8, 16)
    for k in range(SURGERIES):
        model(x).sum().backward()              # training variant
        with torch.no_grad():
            model.eval(); model(x); model.train()  # evaluation variant: a second cache entry per architecture
        shrink_(model, 64 - 4 * (k + 1))
        if watch is not None:
            watch.after_surgery(model)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_module_survives_more_surgeries_than_the_recompile_limit() -> None:
    torch.manual_seed(0)
    model = compile_module_(TinyMLP(), backend="aot_eager", fullgraph=True)
    assert is_compiled(model)
    with watching(CompileWatch()) as watch:
        run_surgeries(model, watch)
        x = torch.randn(8, 16)
        compiled_out = model(x)
    with eager():
        eager_out = model(x)
    assert model.net[0].out_features == 64 - 4 * SURGERIES
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    s = watch.summary()
    assert s["compiled"] and s["compile_resets"] == SURGERIES
    # per architecture: forward+eval frames and the lazily compiled backward; the last call compiles once more
    assert s["compile_recompiles"] >= 2 * (SURGERIES - 1) + 1
    assert s["compile_count"] > s["compile_recompiles"] and s["compile_time_s"] > 0


def test_without_the_reset_fullgraph_hits_the_recompile_limit() -> None:
    """The failure the watch prevents (so the test above can fail)."""
    model = compile_module_(TinyMLP(), backend="aot_eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        run_surgeries(model, None)


def test_eager_model_is_left_alone() -> None:
    model = TinyMLP()
    watch = CompileWatch()
    assert not is_compiled(model) and watch.after_surgery(model) is False and watch.resets == 0


def test_compile_options_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown option"):
        compile_module_(TinyMLP(), backend="aot_eager", fullgrpah=True)


@pytest.mark.parametrize("model_summary", [False, True])
def test_callback_resets_a_compiled_lightning_module_and_reports_it(model_summary: bool) -> None:
    """Also with Lightning's ModelSummary, which runs the example input under FlopCounterMode at fit start
    (without the watch's clear at train start the model then stays eager: no compilation before the first cut)."""
    L.seed_everything(0)
    dm = SyntheticDataModule(num_samples=1024, input_shape=(32,), batch_size=32)
    model = compile_module_(MLPClassifier(input_dim=32, hidden=(64, 64), num_classes=10),  # ModelSummary's
                            backend="aot_eager", fullgraph=not model_summary)  # FlopCounterMode breaks fullgraph
    cb = ControlPruning(controller="linear", target=0.2, every_n_steps=1, round_to=1, min_width=4,
                        importance="magnitude", controller_kwargs={"end": 0.6})  # a cut at every step
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=model_summary, limit_val_batches=2)
    trainer.callbacks.append(cb)
    trainer.fit(model, datamodule=dm)
    s = cb.summary()
    assert s["surgeries"] > 8, s["surgeries"]
    assert s["compiled"] and s["compile_resets"] == s["surgeries"]
    assert s["compile_recompiles"] >= s["surgeries"]
    assert s["compile_count"] - s["compile_recompiles"] >= 2  # the dense net compiled: forward and backward
    x = torch.randn(16, 32)
    model.eval()
    with torch.no_grad():
        compiled_out = model(x)
        with eager():
            eager_out = model(x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
