"""The Hugging Face catalogue (``experiments/hf_catalogue.py``): every family builds, shrinks or says why.

Each family is wrapped the way a user does it (no ``forward``, dict batches, ``self.lm(**batch).loss``),
fitted with ``ControlPruning(controller="gmp", target=0.5)``, and checked: no exception, finite falling
loss, at least one group shrinks or every dense layer has a reason, every live parameter in the optimizer,
``load_pruned`` gives equal outputs, and for the causal LMs ``generate`` (KV cache) equals a cache-free
greedy loop. The fits are slow (a few minutes in all): ``-m slow``, run by ``.ci/run``. The fast tests
check that the catalogue builds on the installed ``transformers`` and that the README's table lists it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import hf_catalogue as catalogue  # noqa: E402

KINDS = {"causal", "masked", "seq2seq", "image"}


def test_the_catalogue_covers_the_layouts_the_issue_asks_for() -> None:
    fams = catalogue.FAMILIES.values()
    assert len(catalogue.FAMILIES) >= 20 and {f.kind for f in fams} == KINDS
    layouts = " ".join(f.layout for f in fams)
    for needed in ("fused qkv", "separate q/k/v", "GQA", "MQA", "partial rotary", "parallel", "ALiBi", "MoE",
                   "encoder-decoder", "CNN", "vision transformer", "SSM"):
        assert needed in layouts, needed


@pytest.mark.parametrize("family", list(catalogue.FAMILIES))
def test_every_family_builds_on_the_installed_transformers(family: str) -> None:
    """A family missing from the installed version fails here: the catalogue must be fixed, not skipped."""
    module = catalogue.CatalogueModule(family)
    assert sum(p.numel() for p in module.parameters()) > 0


def test_the_readme_table_is_the_catalogues_result() -> None:
    table = (catalogue.RESULTS.with_suffix(".md")).read_text()
    assert "written by experiments/hf_catalogue.py" in table
    for family in catalogue.FAMILIES:
        assert f"| {family} |" in table, family
    assert "**crash**" not in table
    readme = (ROOT / "README.md").read_text()
    assert table.strip().splitlines()[1] in readme  # the README embeds the committed table


@pytest.mark.slow
@pytest.mark.parametrize("family", list(catalogue.FAMILIES))
def test_family_fits_shrinks_or_says_why_and_still_works(family: str, tmp_path: Path) -> None:
    row = catalogue.run_family(family, tmp_path)
    assert row["error"] is None, row.get("traceback")
    assert row["problems"] == [], row["problems"]
    assert row["shrunk"] or all(row["dense"].values()), row
    assert all(isinstance(r, str) and r for r in row["dense"].values())
    if catalogue.FAMILIES[family].kind == "causal" and row["shrunk"]:  # a model refused before its fit
        assert row["generate"] is True                                  # (nothing prunable) has nothing to run


@pytest.mark.slow
@pytest.mark.parametrize("family", list(catalogue.FAMILIES))
def test_the_flop_meter_predicts_each_familys_cut_architectures_exactly(family: str) -> None:
    """The meter predicts an architecture instead of counting it once a count confirmed its changed groups
    (``FlopMeter``): across three cuts of different groups, every count it returns equals a whole-batch count,
    in total and per module. A false confirmation (a cost the width ratios do not scale, seen as scaling at one
    cut) would show here as a wrong ledger."""
    import torch
    from torch.utils.data import default_collate

    from ctprune_lightning.accounting import FlopMeter, count_training_flops
    from ctprune_lightning.surgery import apply_plan_, discover_groups
    from ctprune_lightning.surgery.slices import arch_spec

    kind = catalogue.FAMILIES[family].kind
    torch.manual_seed(0)
    lm = catalogue.FAMILIES[family].build()
    batch = default_collate(catalogue.batches(kind)[:16])  # 16 samples: the dense count extrapolates from 2, 4, 8

    def loss_fn(model, b):
        return model(**b).loss

    example = {k: v[:4] for k, v in batch.items()} if kind == "seq2seq" else catalogue._inputs(kind)  # T5: labels
    groups, _ = discover_groups(lm, example, min_width=4)                                              # feed the decoder
    if not groups:  # the catalogue's fit checks that such a family says why
        return
    halves = [groups[: max(1, len(groups) // 2)], groups, groups[len(groups) // 2:]]
    meter, archs = FlopMeter(loss_fn), 1
    meter.measure(lm, batch, arch_spec(lm, groups), {g.name: g.width(lm) for g in groups}, groups)
    for cut in halves:
        plan = {}
        for g in cut:
            w, step = g.width(lm), g.round_to or 1
            if w - step >= (g.min_width or 1):
                plan[g.name] = torch.arange(w - step)
        if not plan:
            continue
        apply_plan_(lm, groups, plan)
        archs += 1
        widths = {g.name: g.width(lm) for g in groups}
        got = meter.measure(lm, batch, arch_spec(lm, groups), widths, groups)
        assert got == count_training_flops(lm, batch, loss_fn), (family, widths)
    assert meter.counted < archs or not meter.predictable  # the last cut's groups were confirmed: predicted
