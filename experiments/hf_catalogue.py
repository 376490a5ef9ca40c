"""The Hugging Face catalogue: `transformers` families built from tiny configs, each fitted with ControlPruning.

python experiments/hf_catalogue.py [--only gpt2,llama] [--out experiments/results/hf_catalogue]

For every family: a LightningModule that wraps the model the way a user does (no ``forward`` of its own,
dict batches, ``training_step`` returns ``self.lm(**batch).loss``), a short fit with
``ControlPruning(controller="gmp", target=0.5)``, then the checks of ``tests/integration/test_hf_catalogue.py``
(the same list and runner). Writes ``<out>.md`` (the README's table of supported families) and ``<out>.json``.
No download: every model comes from a config (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctprune_lightning import ControlPruning, load_pruned  # noqa: E402
from ctprune_lightning.surgery.optim import live_parameters_missing  # noqa: E402

VOCAB, SEQ, HIDDEN, INNER, HEADS, LAYERS, IMAGE, LABELS = 64, 8, 32, 64, 4, 2, 32, 4
BATCH, N_BATCHES, EPOCHS, EVERY = 8, 4, 4, 2  # 16 steps, a cut decision every 2
RESULTS = Path(__file__).resolve().parent / "results" / "hf_catalogue"
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- hf-catalogue:start -->", "<!-- hf-catalogue:end -->"


@dataclass(frozen=True)
class Family:
    """One `transformers` family: how to build it, what kind of batch it eats, what its layout exercises."""

    name: str
    kind: str  # "causal" | "masked" | "seq2seq" | "image"
    layout: str
    build: Callable[[], nn.Module]
    options: dict[str, Any] = field(default_factory=dict)  # extra ControlPruning arguments


def _lm(model: str, config: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(T, model)(getattr(T, config)(**kw))


_DEC = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=32, pad_token_id=0, bos_token_id=0, eos_token_id=0)
_ENC = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=32, pad_token_id=0, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
_IMG = dict(image_size=IMAGE, num_labels=LABELS)

FAMILIES: dict[str, Family] = {f.name: f for f in [
    # decoder LMs
    Family("gpt2", "causal", "fused qkv (Conv1D), MHA", _lm(
        "GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=LAYERS,
        n_head=HEADS, n_inner=INNER, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
        eos_token_id=0)),
    Family("llama", "causal", "separate q/k/v, GQA, rotary", _lm(
        "LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, **_DEC)),
    Family("mistral", "causal", "separate q/k/v, MQA (1 kv head), rotary", _lm(
        "MistralForCausalLM", "MistralConfig", num_key_value_heads=1, sliding_window=None, **_DEC)),
    Family("qwen2", "causal", "separate q/k/v with bias, GQA", _lm(
        "Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2, **_DEC)),
    Family("gemma", "causal", "separate q/k/v, MQA, GeGLU, scaled embeddings", _lm(
        "GemmaForCausalLM", "GemmaConfig", num_key_value_heads=1, head_dim=HIDDEN // HEADS, **_DEC)),
    Family("phi", "causal", "partial rotary, parallel attention+MLP", _lm(
        "PhiForCausalLM", "PhiConfig", partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0, **_DEC)),
    Family("stablelm", "causal", "partial rotary (0.25), separate q/k/v", _lm(
        "StableLmForCausalLM", "StableLmConfig", partial_rotary_factor=0.25, num_key_value_heads=HEADS, **_DEC)),
    Family("gpt_neox", "causal", "fused qkv (head-interleaved), partial rotary, parallel residual", _lm(
        "GPTNeoXForCausalLM", "GPTNeoXConfig", rotary_pct=0.25, use_parallel_residual=True, hidden_dropout=0.0,
        attention_dropout=0.0, **_DEC)),
    Family("gptj", "causal", "parallel attention+MLP, partial rotary (rotary_dim)", _lm(
        "GPTJForCausalLM", "GPTJConfig", vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=LAYERS,
        n_head=HEADS, n_inner=INNER, rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    Family("falcon", "causal", "fused qkv, MQA, parallel attention+MLP", _lm(
        "FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, multi_query=True, parallel_attn=True, new_decoder_architecture=False,
        alibi=False, hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    Family("bloom", "causal", "fused qkv (head-interleaved), ALiBi", _lm(
        "BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
        hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    Family("mpt", "causal", "fused Wqkv, ALiBi", _lm(
        "MptForCausalLM", "MptConfig", vocab_size=VOCAB, d_model=HIDDEN, n_heads=HEADS, n_layers=LAYERS,
        expansion_ratio=2, max_seq_len=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    Family("opt", "causal", "separate q/k/v, learned positions", _lm(
        "OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=INNER,
        num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    Family("gpt_bigcode", "causal", "fused qkv, MQA", _lm(
        "GPTBigCodeForCausalLM", "GPTBigCodeConfig", vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN,
        n_layer=LAYERS, n_head=HEADS, n_inner=INNER, multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
    Family("codegen", "causal", "fused qkv (mp-interleaved), parallel, partial rotary", _lm(
        "CodeGenForCausalLM", "CodeGenConfig", vocab_size=VOCAB, n_positions=32, n_ctx=32, n_embd=HIDDEN,
        n_layer=LAYERS, n_head=HEADS, n_inner=INNER, rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0)),
    # mixture of experts
    Family("mixtral", "causal", "MoE: 4 experts top-2, GQA", _lm(
        "MixtralForCausalLM", "MixtralConfig", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=None, **_DEC)),
    Family("qwen2_moe", "causal", "MoE: 4 experts top-2 + shared expert", _lm(
        "Qwen2MoeForCausalLM", "Qwen2MoeConfig", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=INNER // 2, shared_expert_intermediate_size=INNER, **_DEC)),
    # state space
    Family("mamba", "causal", "selective SSM (HF Mamba)", _lm(
        "MambaForCausalLM", "MambaConfig", vocab_size=VOCAB, hidden_size=HIDDEN, state_size=4, num_hidden_layers=LAYERS,
        expand=2, conv_kernel=4, bos_token_id=0, eos_token_id=0, pad_token_id=0, use_mambapy=False)),
    # encoders
    Family("bert", "masked", "encoder, separate q/k/v", _lm("BertForMaskedLM", "BertConfig", **_ENC)),
    Family("roberta", "masked", "encoder, separate q/k/v", _lm(
        "RobertaForMaskedLM", "RobertaConfig", **{**_ENC, "max_position_embeddings": 40, "pad_token_id": 1})),
    Family("distilbert", "masked", "encoder, q_lin/k_lin/v_lin", _lm(
        "DistilBertForMaskedLM", "DistilBertConfig", vocab_size=VOCAB, dim=HIDDEN, hidden_dim=INNER, n_layers=LAYERS,
        n_heads=HEADS, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, pad_token_id=0)),
    Family("electra", "masked", "encoder, embedding projection", _lm(
        "ElectraForMaskedLM", "ElectraConfig", embedding_size=16, **_ENC)),
    Family("albert", "masked", "encoder, one layer shared by all (tied weights)", _lm(
        "AlbertForMaskedLM", "AlbertConfig", embedding_size=16, **_ENC)),
    # encoder-decoders
    Family("t5", "seq2seq", "encoder-decoder, relative position bias, cross-attention", _lm(
        "T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INNER,
        num_layers=LAYERS, num_heads=HEADS, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)),
    Family("bart", "seq2seq", "encoder-decoder, learned positions, cross-attention", _lm(
        "BartForConditionalGeneration", "BartConfig", vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS,
        decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=INNER,
        decoder_ffn_dim=INNER, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)),
    # vision
    Family("vit", "image", "vision transformer (patch embedding conv)", _lm(
        "ViTForImageClassification", "ViTConfig", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INNER, patch_size=8, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **_IMG)),
    Family("resnet", "image", "CNN, bottleneck residual stages", _lm(
        "ResNetForImageClassification", "ResNetConfig", embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
        layer_type="bottleneck", num_labels=LABELS)),
    Family("convnext", "image", "CNN, depthwise 7x7, LayerNorm, layer scale", _lm(
        "ConvNextForImageClassification", "ConvNextConfig", num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
        num_labels=LABELS)),
]}


def batches(kind: str) -> list[dict[str, Tensor]]:
    """``N_BATCHES`` fixed batches (learnable, so the loss falls within a few epochs)."""
    g = torch.Generator().manual_seed(0)
    n = BATCH * N_BATCHES
    if kind == "image":
        labels = torch.randint(0, LABELS, (n,), generator=g)
        pixels = torch.randn(n, 3, IMAGE, IMAGE, generator=g) * 0.5 + labels.view(-1, 1, 1, 1).float() * 0.5
        rows = [{"pixel_values": pixels[i], "labels": labels[i]} for i in range(n)]
    else:
        start = torch.randint(3, VOCAB, (n, 1), generator=g)
        ids = [start]
        for _ in range(SEQ - 1):  # token t is followed by (t * 3 + 1) mod VOCAB, never a special token
            ids.append((ids[-1] * 3 + 1) % (VOCAB - 3) + 3)
        ids = torch.cat(ids, dim=1)
        rows = []
        for i in range(n):
            row = {"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids[i]}
            if kind == "seq2seq":  # the target is the next tokens of the pattern
                row["labels"] = (ids[i] * 3 + 1) % (VOCAB - 3) + 3
            rows.append(row)
    return rows


class CatalogueModule(L.LightningModule):
    """What a Hugging Face user writes: no forward; the HF model computes the loss on a dict batch."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lm = FAMILIES[family].build()
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.lm(**batch).loss
        if self.training:
            self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(batches(FAMILIES[self.hparams.family].kind), batch_size=BATCH, shuffle=False)


def _inputs(kind: str) -> dict[str, Tensor]:
    rows = batches(kind)[:4]
    keys = ("pixel_values",) if kind == "image" else ("input_ids", "attention_mask")
    return {k: torch.stack([r[k] for r in rows]) for k in keys}


def _outputs(module: CatalogueModule, kind: str) -> Tensor:
    inputs = _inputs(kind)
    with torch.no_grad():
        if kind == "seq2seq":
            return module.lm(**inputs, decoder_input_ids=inputs["input_ids"]).logits
        if kind == "causal":
            return module.lm(**inputs, use_cache=False).logits
        return module.lm(**inputs).logits


def check_generate(lm: nn.Module, steps: int = 4) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy ``generate`` (KV cache) and a cache-free greedy loop of full forwards: their tokens."""
    prompt = _inputs("causal")["input_ids"][:2, :4]
    lm.eval()
    with torch.no_grad():
        out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, use_cache=True, pad_token_id=0)
        ids = prompt
        for _ in range(steps):
            logits = lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out[:, prompt.shape[1]:].tolist(), ids[:, prompt.shape[1]:].tolist()


def run_family(name: str, workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Fit one family with GMP to 50 % and check it; a plain-Python row (``error`` set when something failed)."""
    fam = FAMILIES[name]
    row: dict[str, Any] = {"family": name, "kind": fam.kind, "layout": fam.layout, "error": None, "problems": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(workdir or tmp)
        try:
            L.seed_everything(0, verbose=False)
            module = CatalogueModule(name)
            cb = ControlPruning(controller="gmp", target=0.5, every_n_steps=EVERY, importance="magnitude",
                                min_width=4, controller_kwargs={"start": 0.0, "end": 0.5}, **fam.options)
            trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False, callbacks=[cb],
                                default_root_dir=tmp)
            t_fit = time.perf_counter()
            before = {k: v.clone() for k, v in module.state_dict().items()}
            try:
                trainer.fit(module)
            except ValueError as err:  # set-up found layers but nothing prunable: refused before the first step
                if "has nothing prunable" not in str(err):
                    raise
                row["refused"], row["groups"], row["shrunk"], row["dense"] = str(err)[:300], {}, {}, dict(cb.skipped)
                after = module.state_dict()
                if set(after) != set(before) or any(not torch.equal(after[k], v) for k, v in before.items()):
                    row["problems"].append("refused at set-up but the model changed")
                if not row["dense"] or not all(row["dense"].values()):
                    row["problems"].append("refused at set-up without a reason for every layer")
                row["seconds"] = round(time.perf_counter() - t0, 2)
                return row
            row["fit_s"] = round(time.perf_counter() - t_fit, 2)
            s = cb.summary()
            row["groups"] = {g.name: g.unit for g in cb.groups}
            row["shrunk"] = {g: [s["dense_widths"][g], w] for g, w in s["widths"].items() if w < s["dense_widths"][g]}
            row["dense"] = dict(cb.skipped)
            row["discovery_s"] = round(getattr(cb.loop, "discovery_s", float("nan")), 3)
            losses = torch.tensor(module.losses)
            row["loss_first"], row["loss_last"] = float(losses[:3].mean()), float(losses[-3:].mean())
            if not torch.isfinite(losses).all():
                row["problems"].append("a loss is not finite")
            if not row["loss_last"] < row["loss_first"]:
                row["problems"].append(f"loss did not fall ({row['loss_first']:.3f} -> {row['loss_last']:.3f})")
            if not row["shrunk"] and not row["dense"]:
                row["problems"].append("nothing shrank and no layer is reported dense")
            missing = live_parameters_missing(module, trainer.optimizers)
            if missing:
                row["problems"].append(f"live parameters missing from the optimizer: {missing[:3]}")
            trainer.save_checkpoint(tmp / "last.ckpt")
            rebuilt = load_pruned(CatalogueModule, tmp / "last.ckpt")
            module.eval()
            if not torch.allclose(_outputs(module, fam.kind), _outputs(rebuilt, fam.kind), atol=1e-5, rtol=1e-4):
                row["problems"].append("load_pruned: outputs differ")
            if fam.kind == "causal":
                cached, plain = check_generate(rebuilt.lm)
                row["generate"] = cached == plain
                if cached != plain:
                    row["problems"].append(f"generate with KV cache {cached} != cache-free {plain}")
        except Exception as err:  # noqa: BLE001 - the catalogue records crashes, the test fails on them
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            row["traceback"] = traceback.format_exc(limit=-6)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _short(reason: str) -> str:
    return reason.replace("|", "/").replace("\n", " ")[:110]


def _dense_summary(dense: dict[str, str]) -> str:
    """Dense layers grouped by reason (the reason's first words), with a count and one example."""
    by: dict[str, list[str]] = {}
    for layer, reason in dense.items():
        by.setdefault(_short(reason), []).append(layer)
    return "<br>".join(f"{len(v)}× {k} (e.g. `{v[0].removeprefix('lm.')}`)" for k, v in sorted(by.items(),
                                                                                            key=lambda kv: -len(kv[1])))


def table(rows: list[dict[str, Any]]) -> str:
    """The README's table: family, groups that shrink, layers left dense and why."""
    shrink = sum(1 for r in rows if r.get("shrunk"))
    crashes = sum(1 for r in rows if r["error"])
    total = sum(r["seconds"] for r in rows)
    out = ["<!-- written by experiments/hf_catalogue.py; do not edit by hand -->",
           f"{len(rows)} families (transformers {T.__version__}, torch {torch.__version__}); {shrink} shrink, "
           f"{len(rows) - shrink - crashes} leave everything dense (with reasons), {crashes} crash; "
           f"{total:.0f} s in all on CPU. GMP to 50 %, {EPOCHS * N_BATCHES} steps, min_width 4.", "",
           "| family | layout | groups (shrunk / found) | shrunk groups (dense → final width) | layers left dense and why | "
           "generate after pruning |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            out.append(f"| {r['family']} | {r['layout']} | **crash** | {_short(r['error'])} | | |")
            continue
        shrunk = ", ".join(f"`{g.removeprefix('lm.')}` {a}→{b}" for g, (a, b) in list(r["shrunk"].items())[:4])
        more = len(r["shrunk"]) - 4
        shrunk += f" (+{more} more)" if more > 0 else ""
        gen = {True: "yes (= cache-free)", False: "**differs**"}.get(r.get("generate"), "n/a")
        if r.get("refused"):
            shrunk, gen = "none: set-up refuses before the first step (nothing prunable), model unchanged", "n/a"
        out.append(f"| {r['family']} | {r['layout']} | {len(r['shrunk'])} / {len(r['groups'])} | {shrunk or '—'} | "
                   f"{_dense_summary(r['dense']) or '—'} | {gen} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated families (default: all)")
    p.add_argument("--out", default=str(RESULTS), help="output path without extension")
    args = p.parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    names = [n for n in args.only.split(",") if n] or list(FAMILIES)
    rows = []
    for name in names:
        row = run_family(name)
        rows.append(row)
        status = row["error"] or ("; ".join(row["problems"]) or "ok")
        print(f"{name:<12} {row['seconds']:6.1f}s  shrunk {len(row.get('shrunk', {})):>2}/{len(row.get('groups', {})):<2}"
              f" dense {len(row.get('dense', {})):>3}  {status}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.only:
        out.with_suffix(".md").write_text(table(rows))
        readme = README.read_text()
        if START in readme and END in readme:  # the README embeds the committed table
            head, rest = readme.split(START, 1)
            README.write_text(head + START + "\n" + table(rows) + END + rest.split(END, 1)[1])
        out.with_suffix(".json").write_text(json.dumps([{k: v for k, v in r.items() if k != "traceback"}
                                                        for r in rows], indent=1) + "\n")
    for r in rows:
        if r["error"]:
            print(f"--- {r['family']}\n{r['traceback']}", file=sys.stderr)
    return int(any(r["error"] or r["problems"] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
