"""experiments/bench_width_scaling.py: every suite model cut to a share of its width by the product's surgery."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import bench_width_scaling as bench  # noqa: E402

from ctprune_lightning.accounting import count_training_flops  # noqa: E402


@pytest.mark.parametrize("name", ["MLP", "ResNet-20", "char-GPT"])
def test_half_the_width_is_about_a_quarter_to_a_half_of_the_flops_and_a_step_runs(name: str) -> None:
    """Half of every group's width: a quarter of the FLOPs where both sides of most matmuls are cut (MLP hidden
    to hidden, ResNet convs), half where one side stays (the GPT's residual width is not cut); then a step trains."""
    build, batch, loss_fn = bench.tasks(False)[name]
    dense = count_training_flops(build(), batch, loss_fn)[0]
    model = build()
    widths = bench.cut_to(model, batch[0][:2], 0.5)
    ratio = count_training_flops(model, batch, loss_fn)[0] / dense
    expected = {"MLP": (0.30, 0.37), "ResNet-20": (0.24, 0.27), "char-GPT": (0.49, 0.52)}[name]
    assert expected[0] < ratio < expected[1], (widths, ratio)
    assert bench.step_time(model, batch, loss_fn, repeats=1) > 0
