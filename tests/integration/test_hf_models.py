"""Hugging Face models built from tiny configs (no download): GPT-2, Llama with GQA, BERT.

At the surgery level (discover_groups / apply_plan_ / capture_arch / apply_arch_) on a LightningModule
that wraps the HF model: which groups are found, that cutting function-irrelevant units keeps the
logits, that the optimizer follows, that training continues, and that a rebuilt model matches.
"""

from __future__ import annotations

import ast
import functools
import os
from pathlib import Path
from typing import Any, Callable

import lightning as L
import pytest
import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402  (the `hf` extra, included in `dev`: a missing install fails here)

from ctprune_lightning.importance import MagnitudeImportance  # noqa: E402
from ctprune_lightning.surgery import hf  # noqa: E402
from ctprune_lightning.surgery.arch import apply_arch_, capture_arch  # noqa: E402
from ctprune_lightning.surgery.groups import apply_plan_, discover_groups  # noqa: E402

VOCAB, HIDDEN, INNER, LAYERS, SEQ = 100, 64, 128, 2, 8
PACKAGE = Path(hf.__file__).resolve().parents[1]


def _gpt2(**kw: Any) -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=HIDDEN, n_layer=LAYERS, n_head=4,
                                  n_inner=INNER, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INNER,
                                   num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INNER,
                                  num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=16,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return transformers.BertForMaskedLM(cfg)


# family -> (builder, attention module of layer i, MLP group name of layer i, units per layer)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], str, str, int]] = {
    "gpt2": (_gpt2, "model.transformer.h.{}.attn", "model.transformer.h.{}.mlp.c_fc", 4),
    "llama": (_llama, "model.model.layers.{}.self_attn", "model.model.layers.{}.mlp.gate_proj", 2),
    "bert": (_bert, "model.bert.encoder.layer.{}.attention", "model.bert.encoder.layer.{}.intermediate.dense", 4),
}
# the embedding whose group (the residual width) stays dense
RESIDUAL = {"gpt2": "model.transformer.wte", "llama": "model.model.embed_tokens",
            "bert": "model.bert.embeddings.word_embeddings"}


class HFLM(L.LightningModule):
    """The usual wrapper: a dict batch, the HF model computes the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _build(family: str, seed: int = 0) -> HFLM:
    torch.manual_seed(seed)
    return HFLM(FAMILIES[family][0]()).eval()


def _ids(seed: int = 1) -> Tensor:
    return torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _discover(module: HFLM) -> tuple[dict[str, Any], dict[str, str]]:
    groups, skipped = discover_groups(module, {"input_ids": _ids()})
    return {g.name: g for g in groups}, dict(skipped)


@functools.lru_cache(maxsize=None)
def _groups(family: str) -> dict[str, Any]:
    """The groups of a family's (unmodified) model, found once: groups name modules, not objects."""
    return _discover(_build(family))[0]


def _dead_units_(module: HFLM, family: str, layer: int, heads: list[int], mlp_units: list[int]) -> None:
    """Zero the output-projection weights of some heads (kv groups) and MLP units: they stop mattering."""
    attn = module.get_submodule(FAMILIES[family][1].format(layer))
    with torch.no_grad():
        if family == "gpt2":  # Conv1D weight is [in, out]
            for h in heads:
                attn.c_proj.weight[h * 16:(h + 1) * 16] = 0
            for j in mlp_units:
                attn_mlp = module.get_submodule(f"model.transformer.h.{layer}.mlp")
                attn_mlp.c_proj.weight[j] = 0
        elif family == "llama":  # a unit = a kv group = 2 query heads of 16
            for g in heads:
                attn.o_proj.weight[:, g * 32:(g + 1) * 32] = 0
            mlp = module.get_submodule(f"model.model.layers.{layer}.mlp")
            for j in mlp_units:
                mlp.down_proj.weight[:, j] = 0
        else:
            for h in heads:
                attn.output.dense.weight[:, h * 16:(h + 1) * 16] = 0
            out = module.get_submodule(f"model.bert.encoder.layer.{layer}.output.dense")
            for j in mlp_units:
                out.weight[:, j] = 0


def _plan(family: str) -> dict[str, Tensor]:
    """Layers cut differently (per-layer sizes must be per-module): layer 0 loses more than layer 1."""
    _, attn, mlp, n = FAMILIES[family]
    dead0 = [0, 2][: n // 2]  # gpt2/bert: heads 0 and 2; llama: kv group 0
    keep = lambda width, dead: torch.tensor([i for i in range(width) if i not in dead])  # noqa: E731
    return {attn.format(0): keep(n, dead0), attn.format(1): keep(n, [n - 1]),
            mlp.format(0): keep(INNER, list(range(0, INNER, 2))), mlp.format(1): keep(INNER, [5, 77])}


def _kill_planned_units_(module: HFLM, family: str) -> None:
    _, attn, mlp, n = FAMILIES[family]
    for layer in range(LAYERS):
        plan = _plan(family)
        heads = sorted(set(range(n)) - set(plan[attn.format(layer)].tolist()))
        units = sorted(set(range(INNER)) - set(plan[mlp.format(layer)].tolist()))
        _dead_units_(module, family, layer, heads, units)


def _sizes(module: HFLM, family: str, layer: int) -> dict[str, int]:
    """The per-layer attributes the forward (or the bookkeeping) reads."""
    attn = module.get_submodule(FAMILIES[family][1].format(layer))
    if family == "gpt2":
        mlp = module.get_submodule(f"model.transformer.h.{layer}.mlp")
        return {"num_heads": attn.num_heads, "split_size": attn.split_size, "head_dim": attn.head_dim,
                "c_attn.nf": attn.c_attn.nf, "c_proj.nx": attn.c_proj.nx, "c_fc.nf": mlp.c_fc.nf,
                "mlp.c_proj.nx": mlp.c_proj.nx}
    if family == "llama":
        mlp = module.get_submodule(f"model.model.layers.{layer}.mlp")
        return {"q": attn.q_proj.out_features, "k": attn.k_proj.out_features, "v": attn.v_proj.out_features,
                "o_in": attn.o_proj.in_features, "groups": attn.num_key_value_groups, "head_dim": attn.head_dim,
                "intermediate_size": mlp.intermediate_size, "down_in": mlp.down_proj.in_features}
    return {"num_attention_heads": attn.self.num_attention_heads, "all_head_size": attn.self.all_head_size,
            "attention_head_size": attn.self.attention_head_size, "query": attn.self.query.out_features,
            "dense_in": attn.output.dense.in_features,
            "intermediate": module.get_submodule(f"model.bert.encoder.layer.{layer}.intermediate.dense").out_features}


EXPECTED_SIZES = {  # after _plan: layer 0, layer 1
    "gpt2": ({"num_heads": 2, "split_size": 32, "head_dim": 16, "c_attn.nf": 96, "c_proj.nx": 32, "c_fc.nf": 64,
              "mlp.c_proj.nx": 64},
             {"num_heads": 3, "split_size": 48, "head_dim": 16, "c_attn.nf": 144, "c_proj.nx": 48, "c_fc.nf": 126,
              "mlp.c_proj.nx": 126}),
    "llama": ({"q": 32, "k": 16, "v": 16, "o_in": 32, "groups": 2, "head_dim": 16, "intermediate_size": 64,
               "down_in": 64},
              {"q": 32, "k": 16, "v": 16, "o_in": 32, "groups": 2, "head_dim": 16, "intermediate_size": 126,
               "down_in": 126}),
    "bert": ({"num_attention_heads": 2, "all_head_size": 32, "attention_head_size": 16, "query": 32, "dense_in": 32,
              "intermediate": 64},
             {"num_attention_heads": 3, "all_head_size": 48, "attention_head_size": 16, "query": 48, "dense_in": 48,
              "intermediate": 126}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_discovers_head_and_mlp_groups_and_leaves_the_residual_dense(family: str) -> None:
    module = _build(family)
    groups, skipped = _discover(module)
    _, attn, mlp, n = FAMILIES[family]
    expected = {attn.format(i) for i in range(LAYERS)} | {mlp.format(i) for i in range(LAYERS)}
    assert set(groups) == expected, (sorted(groups), skipped)
    for i in range(LAYERS):
        assert groups[attn.format(i)].unit == "head" and groups[attn.format(i)].width(module) == n
        assert groups[mlp.format(i)].unit == "channel" and groups[mlp.format(i)].width(module) == INNER
    kinds = {s.kind for s in groups[mlp.format(0)].slices}
    assert kinds == ({hf.CONV1D_OUT, hf.CONV1D_IN} if family == "gpt2" else {"linear_out", "linear_in"})
    if family == "llama":  # gate and up are cut together with down's inputs
        assert [s.module.rsplit(".", 1)[-1] for s in groups[mlp.format(0)].slices] == ["gate_proj", "up_proj",
                                                                                         "down_proj"]
    assert RESIDUAL[family] in skipped, skipped


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cutting_dead_heads_and_units_keeps_the_logits_and_sets_per_layer_sizes(family: str) -> None:
    module = _build(family)
    groups = _groups(family)
    _kill_planned_units_(module, family)
    ids = _ids(seed=7)
    with torch.no_grad():
        before = module(ids)
    params_before = sum(p.numel() for p in module.parameters())
    apply_plan_(module, list(groups.values()), _plan(family))
    with torch.no_grad():
        after = module(ids)
    assert after.shape == before.shape
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4), (after - before).abs().max()
    assert sum(p.numel() for p in module.parameters()) < params_before
    for layer in range(LAYERS):
        assert _sizes(module, family, layer) == EXPECTED_SIZES[family][layer]
    _, attn, _, n = FAMILIES[family]
    assert groups[attn.format(0)].width(module) == n // 2 and groups[attn.format(1)].width(module) == n - 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_head_scores_map_every_slice_to_its_head(family: str) -> None:
    """Zero every weight of head (kv group) 1 by the known layout: only its magnitude score is 0."""
    module = _build(family)
    attn_name = FAMILIES[family][1].format(0)
    attn = module.get_submodule(attn_name)
    with torch.no_grad():
        if family == "gpt2":
            for s in range(3):
                attn.c_attn.weight[:, s * 64 + 16:s * 64 + 32] = 0
                attn.c_attn.bias[s * 64 + 16:s * 64 + 32] = 0
            attn.c_proj.weight[16:32] = 0
        elif family == "llama":  # kv group 1 = query heads 2, 3 (rows 32:64), k/v head 1 (rows 16:32)
            attn.q_proj.weight[32:64] = 0
            attn.k_proj.weight[16:32] = 0
            attn.v_proj.weight[16:32] = 0
            attn.o_proj.weight[:, 32:64] = 0
        else:
            for lin in (attn.self.query, attn.self.key, attn.self.value):
                lin.weight[16:32] = 0
                lin.bias[16:32] = 0
            attn.output.dense.weight[:, 16:32] = 0
    group = _groups(family)[attn_name]
    for u in group.unit_slices(module):
        assert u.units is not None and u.units.numel() == u.param.shape[u.dim], u.name
    scores = MagnitudeImportance().scores(module, group)
    assert scores.shape == (FAMILIES[family][3],)
    assert scores[1] == 0 and bool((scores[torch.arange(len(scores)) != 1] > 0).all()), scores


def test_cutting_live_units_changes_the_logits() -> None:
    """The preservation test above is not vacuous: cutting units that matter changes the output."""
    module = _build("gpt2")
    groups = _groups("gpt2")
    ids = _ids(seed=7)
    with torch.no_grad():
        before = module(ids)
    apply_plan_(module, list(groups.values()), _plan("gpt2"))
    with torch.no_grad():
        assert not torch.allclose(module(ids), before, atol=1e-3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_optimizer_follows_the_cut_and_training_continues(family: str) -> None:
    module = _build(family).train()
    groups = _groups(family)
    opt = module.configure_optimizers()
    ids = _ids(seed=3)
    batch = {"input_ids": ids, "labels": ids}
    for _ in range(3):
        opt.zero_grad()
        module.training_step(batch, 0).backward()
        opt.step()
    _, attn_name, mlp_name, _ = FAMILIES[family]
    q_name = {"gpt2": "c_attn", "llama": "q_proj", "bert": "self.query"}[family]
    q = module.get_submodule(f"{attn_name.format(0)}.{q_name}")
    moment = opt.state[q.weight]["exp_avg"].clone()
    apply_plan_(module, list(groups.values()), _plan(family), [opt])

    held = [p for g in opt.param_groups for p in g["params"]]
    live = [p for p in module.parameters() if p.requires_grad]
    assert {id(p) for p in held} == {id(p) for p in live} and len(held) == len(live)
    for p in live:
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        assert int(state["step"]) == 3
    # the kept rows of the query projection keep their first moments (layer 0)
    keep = _plan(family)[attn_name.format(0)]
    if family == "gpt2":  # Conv1D: heads are columns of every [q | k | v] section
        cols = torch.cat([(keep[:, None] * 16 + torch.arange(16)).flatten() + s * 64 for s in range(3)])
        expected = moment[:, cols]
    else:
        block = 32 if family == "llama" else 16
        expected = moment[(keep[:, None] * block + torch.arange(block)).flatten()]
    new_q = module.get_submodule(f"{attn_name.format(0)}.{q_name}")
    assert torch.equal(opt.state[new_q.weight]["exp_avg"], expected)
    cut = {n: p.detach().clone() for n, p in module.named_parameters()
           if n.startswith((attn_name.format(0), mlp_name.format(1).rsplit(".", 1)[0]))}

    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    now = dict(module.named_parameters())  # the cut layers' new Parameters are the ones being trained
    moved = [n for n, old in cut.items() if not torch.equal(now[n].detach(), old)]
    assert len(cut) >= 4 and sorted(moved) == sorted(n for n in cut if now[n].requires_grad), (sorted(cut), moved)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_arch_spec_round_trip_rebuilds_per_layer_sizes(family: str) -> None:
    module = _build(family)
    groups = _groups(family)
    apply_plan_(module, list(groups.values()), _plan(family))
    ids = _ids(seed=11)
    with torch.no_grad():
        expected = module(ids)
    spec = capture_arch(module)
    fresh = _build(family, seed=5)
    apply_arch_(fresh, spec)
    fresh.load_state_dict(module.state_dict())  # strict: every key and shape fits
    with torch.no_grad():
        assert torch.allclose(fresh(ids), expected, atol=1e-6)
    for layer in range(LAYERS):
        assert _sizes(fresh, family, layer) == EXPECTED_SIZES[family][layer]


def test_refused_layouts_name_the_reason() -> None:
    module = _build("gpt2")
    attn = module.model.transformer.h[0].attn
    attn.num_heads = 3  # a stale head count (GPT-2's forward reads split_size and head_dim, not num_heads)
    _, skipped = _discover(module)
    assert "num_heads=3" in skipped["model.transformer.h.0.attn"], skipped

    llama = _build("llama")
    llama.model.model.layers[1].self_attn.hidden_size = HIDDEN  # an older transformers' reshape target
    groups, skipped = _discover(llama)
    assert "model.model.layers.1.self_attn" not in groups and "model.model.layers.0.self_attn" in groups
    assert "hidden_size" in skipped["model.model.layers.1.self_attn"]

    cross = HFLM(_gpt2(add_cross_attention=True)).eval()
    groups, skipped = _discover(cross)
    assert "cross-attention" in skipped["model.transformer.h.0.crossattention"]
    assert "model.transformer.h.0.attn" in groups


def test_the_package_never_imports_transformers() -> None:
    """``transformers`` is optional: no module of the package imports it (HF modules are duck-typed).

    (``import lightning`` itself imports it through torchmetrics when it is installed, so this reads the
    sources instead of ``sys.modules``.)
    """
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] == "transformers"]
    assert offenders == []
    assert hf.is_conv1d(transformers.pytorch_utils.Conv1D(3, 2)) and not hf.is_conv1d(nn.Linear(2, 3))
